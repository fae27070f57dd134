"""Tenants on demand: archive idle tenants to the replica, hydrate them back when called.

Archival never loses a write: the local files go only after the replica verifiably
holds everything, and only if no other process has the database open; a tenant that
wakes up in the middle keeps its files and the archival is abandoned. Hydration
restores into a temporary file renamed into place (never a partial file at the
tenant's path) and records a position proving the restored file *is* the replica's
newest state, so replication resumes at the next TXID with no re-upload.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from concurrent.futures import Future
from datetime import datetime, timezone

from . import cold, compactor
from .dictionary import Dictionaries
from .job_scope import tenant_job
from .catalogue import MARKED, REPLICATED, TenantState
from .fence import SIDE_FILES, move_aside, move_back
from .errors import ArchiveAborted, Fenced, InvalidArgument, NotATenant, ReplicaEmpty, Shredded, TenantSyncError
from .outcome import Archived, Failed, Hydrated, Skip, Skipped
from .owner import is_alive, this_process
from .position import DBStat, Position
from .process import RELEASE_EVERY
from .restore import Progress, restore
from .targets import MAX_TXID, check_timestamp
from .tenants import check_name

log = logging.getLogger(__name__)

COMPARE_CHUNK = 8 << 20
WAIT_FOR_OTHER = 120.0
# A fleet process (of this host) holding a tenant that another process archives lets go of it
# at its release thread's next tick (Fleet.release_archiving); the archival waits two ticks,
# and a little more, before it refuses.
HOLDERS_WAIT = 2 * RELEASE_EVERY + 2.0


class Busy(TenantSyncError):
    """Another live process has been hydrating or archiving the tenant for too long."""


class _InUse(TenantSyncError):
    """Another process has the tenant's files open: the archival is abandoned, a Skipped outcome."""


def open_by_others(paths: list[str]) -> list[int]:
    """PIDs of processes holding any of ``paths`` open (Linux /proc scan).

    This process is included: archival closes its own handles first, so a descriptor
    found here belongs to the application (embedded mode runs inside it)."""
    targets = set()
    for p in paths:
        try:
            st = os.stat(p)
            targets.add((st.st_dev, st.st_ino))
        except FileNotFoundError:
            pass
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in targets:
                found.append(int(pid))
                break
    return found


def same_pages(a: str, b: str) -> bool:
    """Byte equality of two database files, read in large chunks."""
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(COMPARE_CHUNK), fb.read(COMPARE_CHUNK)
            if x != y:
                return False
            if not x:
                return True


class OnDemand:
    """Hydration and archival for one process; coalesces concurrent hydrations.

    Every call first checks that the name is a tenant of the fleet at the path its globs
    give (``Fleet.resolve``) and that its arguments are valid; only then does it mark the
    tenant (hydrating or archiving, one catalogue write naming this process), and any
    failure puts the tenant back in the state it was in. Marks a dead process left behind
    are undone by :meth:`recover` (at start-up) and by a call that finds one.
    """

    def __init__(self, fleet, max_parallel: int = 8):
        self.fleet = fleet
        self.catalogue = fleet.catalogue
        self.owner = this_process(fleet.config.host)
        self._inflight: dict[str, Future] = {}
        self._guard = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_parallel)

    # -- hydration -----------------------------------------------------------------

    @tenant_job("hydrate")
    def hydrate(self, name: str, *, txid: int | None = None, timestamp: datetime | None = None,
                source: str | None = None, progress: Progress | None = None,
                failover_from: str | None = None, dead_since: str | None = None) -> Hydrated | Skipped:
        """Return once tenant ``name`` is local, complete and registered for replication.

        Calls for the same tenant share one restore (the first does it, the others
        wait for its result); different tenants restore in parallel up to the limit.
        ``source``/``txid``/``timestamp`` make it a fork of another tenant's state.
        ``progress(done, total)`` is told the bytes restored, as ``restore`` tells them.
        ``failover_from`` (the failover plan's jobs): the dead host the tenant is taken
        from, last seen at ``dead_since`` (RFC 3339 text, a job argument); Skipped
        ``HOST_BACK`` unless its row is still that host's and active and the host not seen
        since (a job queued behind others, or redelivered after its worker died, can run
        after the host came back, and would take a tenant its application is using).
        """
        _check_target(txid, timestamp)
        path = self.fleet.resolve(name, take_over=True)
        self._refuse_fenced(name)
        if source is not None:
            source = check_name(source)
        with self._guard:
            future = self._inflight.get(name)
            owner = future is None
            if owner:
                future = self._inflight[name] = Future()
        if not owner:
            return future.result()
        try:
            with self._slots, self.fleet.tenant_lock(name):
                if failover_from is not None and not self._still_orphaned(name, failover_from, dead_since):
                    result = Skipped(name, Skip.HOST_BACK)
                else:
                    result = self._hydrate(name, path, txid, timestamp, source, progress=progress)
            future.set_result(result)
            return result
        except BaseException as e:
            future.set_exception(e)
            raise
        finally:
            with self._guard:
                self._inflight.pop(name, None)

    def _still_orphaned(self, name: str, host: str, dead_since: str | None) -> bool:
        """Whether tenant ``name`` is still ``host``'s, active, and ``host`` not seen since
        ``dead_since``, when the plan that sent the job judged it dead (not seen for
        ``failover-after``): nothing since then can have made it less dead. A job without
        ``dead_since`` (queued by a version before it) takes nothing: the plan sends its own."""
        record = self.catalogue.get(name)
        if record is None or record.host != host or record.state != TenantState.active or dead_since is None:
            return False
        seen = self.catalogue.hosts_seen().get(host)
        return seen is not None and seen <= datetime.fromisoformat(dead_since)

    def _refuse_fenced(self, name: str) -> None:
        """A name fenced on this host is not synced here (Fleet.sync): hydrated, it would
        look replicated and ship nothing. The operator unfences it first, having dealt with
        the fenced files."""
        host = self.fleet.config.host
        for copy in self.catalogue.fenced(host, name):
            raise Fenced(f"tenant {name}: a fenced copy of it is on host {host} (files at {copy.aside}): "
                             f"run `tenantsync unfence {name}` there before hydrating it")

    def _hydrate(self, name, path, txid, timestamp, source, waited: float = 0.0, progress=None) -> Hydrated:
        record = self.catalogue.get(name)
        refuse_shredded(record, name)
        if source is not None:
            refuse_shredded(self.catalogue.get(source), source)
        local = os.path.exists(path)
        mine = record is not None and record.host == self.fleet.config.host
        if source is None and local and mine and record.state in REPLICATED:
            return Hydrated(name, path, record.txid or 0, restored=False)  # its own file, replicated
        if record is None:
            marked = self.catalogue.claim_new(name, path, self.fleet.config.host, self.owner)
        else:
            # Only from the state just read: another process may have hydrated the tenant since
            # (its file is then the live database, not an unknown one to move aside).
            marked = self.catalogue.mark(name, TenantState.hydrating, expected={record.state} & _HYDRATE_FROM,
                                         owner=self.owner)
        if not marked:
            return self._wait_for_other(name, path, txid, timestamp, source, waited)
        aside = None
        try:
            if local and source is None:
                # Archived, unknown to the catalogue or another host's, yet a file is there:
                # not something replicated from this replica (here), so it is kept aside, not
                # taken as the tenant.
                aside = move_aside(path, "unknown")
            if source is None and not mine:
                self.fleet.take_over(name)  # another host's, perhaps: not while it holds the lease
            replica = self.fleet.replica(source or name)
            result = self._restore(replica, path, txid, timestamp, progress)
        except BaseException as e:
            if aside is not None:
                move_back(aside)
            if source is None and local and record is None and isinstance(e, ReplicaEmpty):
                # A new database the watcher has not found yet: it is the tenant.
                self.catalogue.unmark(name, self.owner, state=TenantState.idle)
                return Hydrated(name, path, 0, restored=False)
            self.catalogue.unmark(name, self.owner, error=f"hydrate: {e}" if isinstance(e, TenantSyncError) else None)
            raise
        now = datetime.now(timezone.utc)
        if source is None:
            position = Position.after_restore(result.txid, result.page_size, result.commit,
                                              DBStat.settled(path)).to_dict()
            txid_now = result.txid
        else:
            position, txid_now = None, 0  # a fork starts its own replica with a full snapshot at TXID 1
        self.catalogue.unmark(name, self.owner, state=TenantState.active, txid=txid_now, position=position,
                              last_sync_at=now, last_error=None, host=self.fleet.config.host, path=path)
        if aside is not None:
            log.warning("tenant %s: %s was not the replica's database; kept as %s", name, path, aside[0])
        log.info("hydrated %s at txid %016x into %s", name, result.txid, path)
        return Hydrated(name, path, result.txid, restored=True, moved_aside=aside[0] if aside else None)

    def _restore(self, replica, path, txid, timestamp, progress):
        """``restore``; a frozen replica (cold.py) is thawed, its state restored on the way."""
        try:
            return restore(replica, path, txid=txid, timestamp=timestamp, progress=progress)
        except ReplicaEmpty:
            result = cold.thaw_into(replica, path, dictionaries=Dictionaries(self.fleet.storage), txid=txid,
                                    timestamp=timestamp)
            if result is None:
                raise
            return result

    def _wait_for_other(self, name, path, txid, timestamp, source, waited: float) -> Hydrated:
        """Another process is hydrating, archiving or freezing this tenant: wait for it to finish,
        then hydrate as asked. A mark whose process has died is undone at once."""
        deadline = time.monotonic() + WAIT_FOR_OTHER - waited
        while True:
            record = self.catalogue.get(name)
            if record is None or record.state not in MARKED:
                return self._hydrate(name, path, txid, timestamp, source, WAIT_FOR_OTHER - (deadline - time.monotonic()))
            if self._recover_dead(record) or self._recover_own(record):
                continue
            if time.monotonic() > deadline:
                raise Busy(f"tenant {name}: {record.mark_owner or 'another process'} has been "
                           f"{record.state.value} it for over {WAIT_FOR_OTHER:.0f} s")
            time.sleep(0.05)

    # -- marks left by dead processes ----------------------------------------------

    def recover(self) -> list[str]:
        """Undo the hydrating/archiving marks of this host's tenants whose process is gone
        (killed mid-call): each goes back to the state it was marked from. Called when a
        long-running process starts; ``_wait_for_other`` does it for one tenant."""
        return [r.name for r in self.catalogue.marked(self.fleet.config.host) if self._recover_dead(r)]

    def _recover_own(self, record) -> bool:
        """Undo a hydrating mark of this process's own: called under the tenant's lock, under
        which every hydration of this process marks and unmarks, so none of its is running;
        the mark is one whose undoing failed (the catalogue did not answer for longer than
        UNMARK_PATIENCE)."""
        if record.mark_owner != self.owner or record.state != TenantState.hydrating:
            return False
        log.warning("tenant %s: hydrating mark of this process left by a failed hydration: undone", record.name)
        return self.catalogue.unmark(record.name, self.owner, error="hydrate: its mark was left set")

    def _recover_dead(self, record) -> bool:
        """Undo ``record``'s mark if the process that made it is gone. A mark without an
        owner was left by a version before marks: no process of this one is doing it."""
        owner = record.mark_owner
        if owner == self.owner or owner is not None and is_alive(owner, self.fleet.config.host) is not False:
            return False
        if record.state == TenantState.archiving:
            # Killed after the quarantine rename: the database goes back to its path.
            quarantine = _quarantine(record.path)
            if os.path.exists(quarantine) and not os.path.exists(record.path):
                os.rename(quarantine, record.path)
        error = f"{record.state.value} by {owner or 'an earlier version'}, which died"
        if owner is None:  # where it came from is unknown: where its file says it is
            back = TenantState.idle if os.path.exists(record.path) else TenantState.archived
            undone = self.catalogue.unmark(record.name, None, state=back, last_error=error)
        else:
            undone = self.catalogue.unmark(record.name, owner, error=error)
        if undone:
            log.warning("tenant %s: %s by %s, a process that has died: undone", record.name,
                        record.state.value, owner)
            return True
        return False

    # -- archival ------------------------------------------------------------------

    @tenant_job("archive")
    def archive(self, name: str) -> Archived | Skipped:
        """Ship, snapshot, verify, then remove the tenant's local files: Archived. Skipped if
        it was archived already, or is in use by another process (the files stay); other
        reasons to abort raise ArchiveAborted. Either way nothing is lost."""
        path = self.fleet.resolve(name)
        record = self.catalogue.get(name)
        if record is None:
            raise NotATenant(f"tenant {name}: unknown to the catalogue (not discovered yet)")
        if record.state in (TenantState.archived, TenantState.frozen):
            return Skipped(name, Skip.ALREADY_ARCHIVED)
        if record.state in MARKED and self._recover_dead(record):
            record = self.catalogue.get(name)
        if not self.catalogue.mark(name, TenantState.archiving, expected=_ARCHIVE_FROM, owner=self.owner):
            raise ArchiveAborted(f"tenant {name}: cannot archive from state {self.catalogue.get(name).state.value}")
        try:
            with self.fleet.tenant_lock(name):  # no sync job interleaves with the archival
                if record.state == TenantState.active:
                    self._wait_for_holders([path] + [path + s for s in SIDE_FILES])
                txid, freed = self._archive(name, path)
        except BaseException as e:
            self.catalogue.unmark(name, self.owner)
            if isinstance(e, TenantSyncError):
                log.warning("archive %s abandoned: %s", name, e)
            if isinstance(e, _InUse):
                return Skipped(name, Skip.IN_USE, str(e))
            raise
        log.info("archived %s at txid %016x, freed %d bytes", name, txid, freed)
        return Archived(name, txid, freed)

    @staticmethod
    def _wait_for_holders(files: list[str]) -> None:
        """While other processes have an active tenant's files open and this one does not,
        wait (at most HOLDERS_WAIT) for them to let go: a fleet process holding it releases
        it now that it is marked archiving. Until then this process must not sync it too
        (their checkpoints would race). If this process has it open it is the tenant's fleet
        process, and any other holder an application, which never lets go: no wait."""
        deadline = time.monotonic() + HOLDERS_WAIT
        while (holders := open_by_others(files)) and os.getpid() not in holders and time.monotonic() < deadline:
            time.sleep(0.25)

    def _archive(self, name: str, path: str) -> tuple[int, int]:
        files = [path] + [path + s for s in SIDE_FILES]
        # A Contended pass goes on: another process of this host that wrote first lets go of
        # the tenant in a moment, and the restore compared below proves what the replica holds.
        shipped = self.fleet.sync(name, archiving=True)
        if isinstance(shipped, Failed):
            raise shipped.error
        self.fleet.release(name)  # checkpointed under our barrier, our handles closed
        holders = open_by_others(files)
        if holders:
            raise _InUse(f"tenant {name}: {path} is open by pid {', '.join(map(str, holders))}")
        stat = DBStat.of(path)
        replica = self.fleet.replica(name)
        compactor.snapshot(replica, self.fleet.config.levels, force=True)
        with tempfile.TemporaryDirectory(dir=os.path.dirname(path), prefix=".archive-verify-") as tmp:
            check = os.path.join(tmp, "verify.db")
            result = restore(replica, check)
            if not same_pages(check, path):
                raise ArchiveAborted(f"tenant {name}: replica at txid {result.txid:016x} differs from {path}")
        quarantine = _quarantine(path)
        os.rename(path, quarantine)
        if open_by_others([quarantine] + files[1:]) or DBStat.of(quarantine) != stat:
            os.rename(quarantine, path)
            raise _InUse(f"tenant {name}: {path} was opened or written during archival")
        if not self.catalogue.unmark(name, self.owner, state=TenantState.archived, txid=result.txid,
                                     archived_txid=result.txid, position=None,
                                     last_sync_at=datetime.now(timezone.utc)):
            os.rename(quarantine, path)
            raise ArchiveAborted(f"tenant {name}: its archiving mark was taken over; kept {path}")
        freed = 0
        for f in [quarantine] + files[1:]:
            try:
                freed += os.path.getsize(f)
                os.remove(f)
            except FileNotFoundError:
                pass
        return result.txid, freed


# States a hydration may start from, and the ones whose local file is the tenant's own.
_HYDRATE_FROM = {TenantState.archived, TenantState.frozen, TenantState.idle, TenantState.error, TenantState.active}
_ARCHIVE_FROM = {TenantState.active, TenantState.idle}

def refuse_shredded(record, name: str) -> None:  # noqa: ANN001 - a TenantRecord or None
    """Raise Shredded if the catalogue says ``name`` was shredded."""
    if record is not None and record.state is TenantState.shredded:
        raise Shredded(f"tenant {name} was shredded ({record.last_error or 'erased'}): its data is gone for good")



def _check_target(txid, timestamp) -> None:
    """A restore target from a caller: a TXID (an int of 1..2^64-1, not a bool or a float)
    or an aware datetime, not both; refused before any state changes."""
    if txid is not None and (isinstance(txid, bool) or not isinstance(txid, int) or not 1 <= txid <= MAX_TXID):
        raise InvalidArgument(f"txid: expected a whole number from 1 to 2^64-1, got {txid!r}")
    if timestamp is not None:
        check_timestamp(timestamp)
    if txid is not None and timestamp is not None:
        raise InvalidArgument("give a txid or a timestamp, not both")


def _quarantine(path: str) -> str:
    return f"{os.path.dirname(path)}/.{os.path.basename(path)}.archiving"
