"""Fleet-wide key work: rotating the key-encryption key, and shredding a tenant.

Rotation rewraps each tenant's data key under another KEK (one small compare-and-swap write
per tenant, no data rewritten); once every tenant is rewrapped the old KEK can leave the
keyring. Shredding deletes a tenant's wrapped key first and then its replica: from the
first step on, whatever copy of its objects remains anywhere is ciphertext under a key
nobody holds. Then it deletes every old version and delete marker the bucket keeps under
the tenant's prefix (``Storage.delete_all_versions``), the wrapped key's included. A copy
of the *wrapped key* kept where shred cannot reach (a backup or replication of the bucket,
or versions an object lock refuses to delete) still opens with the KEK that wrapped it, so
erasure that must survive such copies ends with a rotation and the old KEK's removal (README).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone

from . import tenant_key
from .catalogue import TenantState
from .errors import ObjectNotFound, StillLocal, StorageError, VersionsRemain, WrongState
from .keyring import load_keyring
from .fence import SIDE_FILES
from .tenants import check_name

log = logging.getLogger(__name__)

#: Tenants rewrapped at once: each is a read and a conditional write, round trips on S3.
ROTATE_THREADS = 16
#: States a tenant may be shredded from: not while another process restores or archives it.
_SHRED_FROM = {TenantState.active, TenantState.idle, TenantState.error, TenantState.archived, TenantState.frozen,
               TenantState.shredded}


@dataclass(frozen=True)
class Erased:
    """What a shred deleted: the replica's objects, then the old versions and delete
    markers the bucket kept under the tenant's prefix (0 where the store keeps none)."""

    objects: int
    versions: int


@dataclass
class Rotation:
    """What a rotation did: tenants rewrapped, already under the KEK, without a key yet."""

    kek: str
    rewrapped: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    keyless: list[str] = field(default_factory=list)


def rotate(fleet, to: str | None = None) -> Rotation:  # noqa: ANN001 - a Fleet
    """Rewrap every catalogued tenant's data key under KEK ``to`` (default: the keyring's
    current one). Idempotent: a second run finds every tenant already rewrapped."""
    keyring = load_keyring(fleet.config.keyring)
    target = keyring.get(to).key_id if to else keyring.current.key_id
    done = Rotation(target)
    names = [r.name for r in fleet.catalogue.records() if r.state is not TenantState.shredded]

    def one(name: str) -> tuple[str, str]:
        storage = fleet.storage.child(name)
        try:
            before = tenant_key.load(storage, name, keyring)
        except ObjectNotFound:
            return name, "keyless"
        if before.kek == target:
            return name, "already"
        tenant_key.rewrap(storage, name, keyring, target, current=before)
        fleet.forget_key(name)
        return name, "rewrapped"

    with ThreadPoolExecutor(ROTATE_THREADS) as pool:
        for name, what in pool.map(one, names):
            getattr(done, what).append(name)
    log.info("rotated to key %s: %d rewrapped, %d already, %d without a key", target, len(done.rewrapped),
             len(done.already), len(done.keyless))
    return done


def shred(fleet, name: str) -> Erased:  # noqa: ANN001 - a Fleet
    """Erase tenant ``name``: its wrapped key, then every object of its replica; the catalogue
    records it as shredded; then every old version and delete marker the bucket keeps under
    ``<name>/`` (a versioned S3 bucket), so no stored copy of its key is left to open.
    Refused while its database is on this host (archive or delete it first: shredding never
    touches local files) or while it is being hydrated or archived. Safe to repeat after a
    failure part-way. Raises VersionsRemain, after all the rest is done, if the bucket
    refuses to delete some old versions (an object lock)."""
    name = check_name(name)
    path = fleet.resolve(name)
    local = [p for p in (path, *(path + s for s in SIDE_FILES)) if os.path.exists(p)]
    if local:
        raise StillLocal(f"tenant {name}: its database is still here ({local[0]}): archive or delete it "
                              "first; shred erases the replica only")
    with fleet.tenant_lock(name):
        if fleet.catalogue.get(name) is None:
            fleet.catalogue.discover(name, path, fleet.config.host)
        if not fleet.catalogue.transition(name, TenantState.shredded, expected=_SHRED_FROM):
            state = fleet.catalogue.get(name).state.value
            raise WrongState(f"tenant {name}: cannot shred it while it is {state}")
        storage = fleet.storage.child(name)
        tenant_key.delete(storage)  # first: from here on nothing of it can be decrypted
        fleet.forget_key(name)
        keys = [info.key for info in storage.list("")]
        storage.delete(keys)
        fleet.catalogue.record_shredded(name, datetime.now(timezone.utc))
        try:
            # The trailing "/" keeps tenant "a" off the objects of tenant "ab".
            versions = fleet.storage.delete_all_versions(name + "/")
        except StorageError as e:  # the one report of it: the CLI prints it as its one line
            if fleet.config.encrypt:
                done, then = "its key and ", (", or rotate the KEK (tenantsync keys rotate) and remove the old one "
                                              "from the keyring (README, Encryption at rest)")
            else:
                done, then = "", " (they are not encrypted: until then they hold its data)"
            raise VersionsRemain(
                f"tenant {name}: {done}{len(keys)} objects are deleted and it is recorded as shredded, but old "
                f"versions remain ({e}): run shred again once the bucket lets them go{then}"
            ) from e
    log.warning("shredded tenant %s: its key, %d objects and %d old versions deleted", name, len(keys), versions)
    return Erased(len(keys), versions)
