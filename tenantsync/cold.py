"""Cold tenants: an archived tenant's replica as one zstd bundle, and back.

Most tenants of a SaaS sit archived for months as a handful of LTX files each. ``freeze``
turns such a replica into one bundle object (bundle.py; sealed like every other object
when the fleet encrypts, compressed first): it restores the newest state to a temporary
file, writes the bundle, verifies it by reading it back against the LTX chain's own
state restored from the LTX files, and only then deletes them. ``thaw_into`` reverses it in
a hydration: the bundle's image is restored to the tenant's path and becomes a level-9
snapshot (TXIDs 1..N, as Litestream's layout wants), so restore and the next sync go on
exactly as for any replica, at the next TXID; the bundle goes once the snapshot is stored.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from datetime import datetime, timezone

from . import layout
from .bundle import BundleInfo, restore_bundle, verify_bundle, write_bundle
from .dictionary import Dictionaries
from .catalogue import TenantState
from .errors import NotATenant, ObjectNotFound, ReplicaEmpty, TargetUnavailable, TenantSyncError
from .job_scope import tenant_job
from .lease import decode_lease
from .ltx import HEADER_FLAG_NO_CHECKSUM, Encoder, Header, database_checksum, lock_pgno
from .outcome import Frozen, Skip, Skipped
from .owner import this_process
from .replica import Replica
from .output import remove_quietly
from .restore import RestoreResult, restore
from .tenants import check_name, header_page_size

log = logging.getLogger(__name__)

#: Pages read from the thawed image per call while encoding the snapshot.
_PAGES_PER_READ = 256


def bundle_keys(replica: Replica) -> list[str]:
    """The replica's bundle objects, oldest TXID first."""
    return sorted(info.key for info in replica.storage.list(layout.BUNDLE_PREFIX + "/")
                  if layout.parse_bundle_key(info.key) is not None)


def freeze(replica: Replica, *, dictionary=None, dictionaries: Dictionaries | None = None,  # noqa: ANN001
           work_dir: str | None = None) -> BundleInfo:
    """Replace the replica's LTX files by one bundle of its newest state; returns it.

    The LTX files are deleted only after the stored bundle verified against the state the
    LTX chain restores to (read back from the store, dictionary included): a failure at any
    step leaves every LTX file in place; the lease object goes with them once it has lapsed.
    Safe to repeat: a bundle already stored for that TXID is verified and kept."""
    with tempfile.TemporaryDirectory(prefix="tenantsync-freeze-", dir=work_dir) as tmp:
        image = os.path.join(tmp, "image.db")
        result = restore(replica, image)  # ReplicaEmpty for a replica with nothing to freeze
        expected = image_checksum(image)
        info = write_bundle(replica.storage, image, result.txid, dictionary=dictionary)
    verify_bundle(replica.storage, info.key, result.txid, expected, dictionaries=dictionaries)
    files = [f for level in replica.all_files().values() for f in level]
    replica.delete(files)
    _drop_lapsed_lease(replica.storage)
    log.info("%s: frozen at txid %016x into %s (%d bytes), %d LTX files deleted", replica, info.txid, info.key,
             info.size, len(files))
    return info


def _drop_lapsed_lease(storage) -> None:  # noqa: ANN001 - the replica's Storage
    """Delete the replica's lease object if it has lapsed (an archived tenant's was given
    up), so a frozen replica is its bundle alone (and its key). The next writer creates a new
    lease, as after Litestream's own release, which deletes it. A lease someone holds, or one
    this version cannot read, stays."""
    try:
        _, expires_at, _ = decode_lease(storage.read(layout.LEASE_KEY))
    except (ObjectNotFound, ValueError):
        return
    if expires_at < datetime.now(timezone.utc):
        storage.delete([layout.LEASE_KEY])


def thaw_into(replica: Replica, output: str, *, dictionaries: Dictionaries | None = None,
              txid: int | None = None, timestamp: datetime | None = None) -> RestoreResult | None:
    """Put a frozen replica back into Litestream's layout, restoring its state into ``output``
    on the way; None when the replica holds no bundle.

    The bundle is decoded once, straight into ``output`` (checked as ``restore_bundle``
    checks it), and the level-9 snapshot 1..TXID is encoded from that file, so a hydration of
    a frozen tenant costs about what one from a snapshot does; the bundle goes once the
    snapshot is stored (replication then resumes at TXID+1). A frozen tenant keeps no
    history: a ``timestamp``, or a ``txid`` other than the bundle's, is refused (TargetUnavailable)
    and the replica stays frozen. A replica holding LTX files beside its bundle (a freeze
    that stopped before its deletions) keeps them: only the bundle goes. The result's
    ``timestamp`` is the bundle's creation (a bundle keeps no transaction time)."""
    keys = bundle_keys(replica)
    if not keys:
        return None
    if timestamp is not None:
        raise TargetUnavailable(f"{replica}: frozen into {keys[-1]}, it keeps no point in time: "
                             "restore its newest state (no target)")
    info = restore_bundle(replica.storage, keys[-1], output, dictionaries=dictionaries)
    if txid is not None and txid != info.txid:
        remove_quietly(output)
        raise TargetUnavailable(f"{replica}: frozen at txid {info.txid:016x} into {keys[-1]}, it keeps no "
                             f"earlier or later state: txid {txid:016x} cannot be restored")
    if not any(replica.all_files().values()):
        header, data = snapshot_of(output, info.txid, info.page_size, info.page_count)
        replica.write(layout.SNAPSHOT_LEVEL, header, data, len(data))
    replica.storage.delete(keys)
    log.info("%s: thawed txid %016x from %s into %s", replica, info.txid, keys[-1], output)
    return RestoreResult(txid=info.txid, files=1, pages=info.page_count, size=info.page_count * info.page_size,
                         page_size=info.page_size, commit=info.page_count, timestamp=info.created)


def restore_any_tier(replica: Replica, output: str, *, force: bool = False, progress=None,  # noqa: ANN001
                     dictionaries: Dictionaries | None = None) -> int:
    """The newest state into ``output``, from the LTX levels or, for a frozen replica, from
    its bundle read in place (the replica stays frozen); returns its TXID."""
    try:
        return restore(replica, output, force=force, progress=progress).txid
    except ReplicaEmpty:
        keys = bundle_keys(replica)
        if not keys:
            raise
        return restore_bundle(replica.storage, keys[-1], output, dictionaries=dictionaries, force=force).txid


def image_checksum(image: str) -> int:
    """LTX's checksum of the database file ``image`` (the post-apply checksum of its state),
    computed from the restored file itself: a bundle must hold exactly these pages."""
    page_size = _page_size(image)
    with open(image, "rb") as f:
        return database_checksum(enumerate(iter(lambda: f.read(page_size), b""), 1))


def _page_size(image: str) -> int:
    """The page size of ``image``, a database tenantsync itself restored (so a valid one)."""
    with open(image, "rb") as f:
        return header_page_size(f.read(100))


def snapshot_of(image: str, txid: int, page_size: int, page_count: int) -> tuple[Header, bytes]:
    """The level-9 LTX file (TXIDs 1..``txid``) of the database file ``image``, with no
    post-apply checksum, as the snapshots compaction writes (superfly/ltx's compactor)."""
    header = Header(flags=HEADER_FLAG_NO_CHECKSUM, page_size=page_size, commit=page_count, min_txid=1,
                    max_txid=txid, timestamp=int(datetime.now(timezone.utc).timestamp() * 1000))
    buf = io.BytesIO()
    encoder = Encoder(buf, header)
    skip = lock_pgno(page_size)
    with open(image, "rb") as f:
        pgno = 1
        while chunk := f.read(page_size * _PAGES_PER_READ):
            for offset in range(0, len(chunk), page_size):
                if pgno != skip:
                    encoder.add_page(pgno, chunk[offset:offset + page_size])
                pgno += 1
    encoder.close()
    return header, buf.getvalue()


# -- a fleet's tenants -----------------------------------------------------------------------


@tenant_job("freeze")
def freeze_tenant(fleet, name: str) -> Frozen | Skipped:  # noqa: ANN001 - a Fleet
    """``freeze`` tenant ``name``'s replica: Frozen, or Skipped when it is frozen already or
    not archived (hydrated since the schedule chose it, or never archived).

    The tenant is marked ``freezing`` by this process for the while (the catalogue's
    compare-and-set from ``archived``): a hydration waits for the mark instead of restoring
    from LTX files this freeze is about to delete, and a mark left by a process that died
    is undone as an archival's is. The bundle is compressed with the fleet's current
    dictionary (``tenantsync dictionary train``), except in an encrypted fleet: a
    dictionary is trained on tenants' pages and is stored once for the fleet, in the clear."""
    name = check_name(name)
    catalogue = fleet.catalogue
    record = catalogue.get(name)
    if record is None:
        raise NotATenant(f"tenant {name}: unknown to the catalogue")
    if record.state is TenantState.frozen:
        return Skipped(name, Skip.ALREADY_FROZEN)
    owner = this_process(fleet.config.host)
    if not catalogue.mark(name, TenantState.freezing, expected={TenantState.archived}, owner=owner):
        state = (catalogue.get(name) or record).state.value
        return Skipped(name, Skip.NOT_ARCHIVED, f"tenant {name} is {state}: only archived tenants are frozen")
    try:
        dictionaries = Dictionaries(fleet.storage)
        dictionary = None if fleet.config.encrypt else dictionaries.current()
        info = freeze(fleet.replica(name), dictionary=dictionary, dictionaries=dictionaries)
    except BaseException as e:
        catalogue.unmark(name, owner, error=f"freeze: {e}" if isinstance(e, TenantSyncError) else None)
        raise
    if not catalogue.unmark(name, owner, state=TenantState.frozen):
        # Recovered as dead meanwhile (back to archived): still right, as a hydration thaws
        # whatever the replica holds.
        log.warning("tenant %s: frozen, but its freezing mark was taken over; left archived", name)
    return Frozen(name, info.txid, info.key, info.size)


def export(fleet, name: str, output: str | None, *, replica_url: str | None = None,  # noqa: ANN001
           force: bool = False, progress=None) -> int:  # noqa: ANN001
    """Tenant ``name``'s newest state from any tier (LTX levels or bundle, sealed or not) as a
    plain SQLite file at ``output``, or with ``replica_url`` as a plain Litestream replica
    there (one level-9 snapshot); returns its TXID. ``progress`` as restore's (LTX tier)."""
    replica = fleet.replica(check_name(name))
    dictionaries = Dictionaries(fleet.storage)
    if replica_url is None:
        return restore_any_tier(replica, output, force=force, progress=progress, dictionaries=dictionaries)
    from .storage import open_storage

    target = Replica(open_storage(replica_url))
    with tempfile.TemporaryDirectory(prefix="tenantsync-export-") as tmp:
        image = os.path.join(tmp, "image.db")
        txid = restore_any_tier(replica, image, progress=progress, dictionaries=dictionaries)
        page_size = _page_size(image)
        count = os.path.getsize(image) // page_size
        header, body = snapshot_of(image, txid, page_size, count)
        target.write(layout.SNAPSHOT_LEVEL, header, body, len(body))
    return txid
