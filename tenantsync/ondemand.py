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
from dataclasses import dataclass
from datetime import datetime, timezone

from . import compactor
from .catalogue import TenantState
from .errors import ArchiveAborted, RestoreError, TenantSyncError
from .position import DBStat, Position
from .restore import restore

log = logging.getLogger(__name__)

SIDE_FILES = ("-wal", "-shm")
COMPARE_CHUNK = 8 << 20
WAIT_FOR_OTHER = 120.0
# A fleet process (of this host) holding a tenant that another process archives lets go of it
# at its release thread's next tick (every 5 s, Fleet.release_archiving); the archival waits
# that long, and a little more, before it refuses.
HOLDERS_WAIT = 12.0


@dataclass(frozen=True)
class Hydrated:
    name: str
    path: str
    txid: int
    restored: bool  # False when the database was already local


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
    """Hydration and archival for one process; coalesces concurrent hydrations."""

    def __init__(self, fleet, max_parallel: int = 8):
        self.fleet = fleet
        self.catalogue = fleet.catalogue
        self._inflight: dict[str, Future] = {}
        self._guard = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_parallel)

    # -- hydration -----------------------------------------------------------------

    def hydrate(self, name: str, *, txid: int | None = None, timestamp: datetime | None = None,
                source: str | None = None, path: str | None = None) -> Hydrated:
        """Return once tenant ``name`` is local, complete and registered for replication.

        Calls for the same tenant share one restore (the first does it, the others
        wait for its result); different tenants restore in parallel up to the limit.
        ``source``/``txid``/``timestamp`` make it a fork of another tenant's state.
        """
        with self._guard:
            future = self._inflight.get(name)
            owner = future is None
            if owner:
                future = self._inflight[name] = Future()
        if not owner:
            return future.result()
        try:
            with self._slots, self.fleet.tenant_lock(name):
                result = self._hydrate(name, txid, timestamp, source, path)
            future.set_result(result)
            return result
        except BaseException as e:
            future.set_exception(e)
            raise
        finally:
            with self._guard:
                self._inflight.pop(name, None)

    def _hydrate(self, name, txid, timestamp, source, path) -> Hydrated:
        record = self.catalogue.get(name)
        if record is None:
            if path is None:
                path = self.fleet.default_path(name)
            self.catalogue.discover(name, path, self.fleet.config.host)
            record = self.catalogue.get(name)
        path = record.path
        if source is None and os.path.exists(path):
            if record.state in (TenantState.archived, TenantState.hydrating, TenantState.error):
                self.catalogue.transition(name, TenantState.active)
            return Hydrated(name, path, record.txid or 0, restored=False)
        if not self.catalogue.transition(
            name, TenantState.hydrating,
            expected={TenantState.archived, TenantState.idle, TenantState.error, TenantState.active},
        ):
            return self._wait_for_other(name, path)
        try:
            replica = self.fleet.replica(source or name)
            result = restore(replica, path, txid=txid, timestamp=timestamp)
        except TenantSyncError as e:
            self.catalogue.record_error(name, f"hydrate: {e}")
            raise
        position = Position(txid=result.txid, page_size=result.page_size, commit=result.commit,
                            wal_offset=32, backfilled=True, db_stat=DBStat.of(path))
        if source is not None:
            # A fork starts its own replica with a full snapshot at TXID 1.
            position = None
        self.catalogue.record_sync(name, txid=result.txid if source is None else 0,
                                   position=position.to_dict() if position else None,
                                   at=datetime.now(timezone.utc))
        self.catalogue.transition(name, TenantState.active)
        log.info("hydrated %s at txid %016x into %s", name, result.txid, path)
        return Hydrated(name, path, result.txid, restored=True)

    def _wait_for_other(self, name: str, path: str) -> Hydrated:
        """Another process is hydrating or archiving this tenant: wait for it to finish."""
        deadline = time.monotonic() + WAIT_FOR_OTHER
        while time.monotonic() < deadline:
            record = self.catalogue.get(name)
            if record.state not in (TenantState.hydrating, TenantState.archiving):
                if os.path.exists(path):
                    return Hydrated(name, path, record.txid or 0, restored=False)
                return self._hydrate(name, None, None, None, path)
            time.sleep(0.05)
        raise RestoreError(f"tenant {name}: another process has been {record.state.value} it for {WAIT_FOR_OTHER:.0f} s")

    # -- archival ------------------------------------------------------------------

    def archive(self, name: str) -> dict:
        """Ship, snapshot, verify, then remove the tenant's local files; or abort safely."""
        record = self.catalogue.get(name)
        if record is None:
            raise TenantSyncError(f"tenant {name}: unknown")
        if record.state in (TenantState.archived, TenantState.archiving):
            return {"tenant": name, "archived": record.state == TenantState.archived, "txid": record.archived_txid,
                    "skipped": f"already {record.state.value}"}
        if not self.catalogue.transition(name, TenantState.archiving, expected={TenantState.active, TenantState.idle}):
            raise ArchiveAborted(f"tenant {name}: cannot archive from state {self.catalogue.get(name).state.value}")
        try:
            with self.fleet.tenant_lock(name):  # no sync job interleaves with the archival
                if record.state == TenantState.active:
                    self._wait_for_holders([record.path] + [record.path + s for s in SIDE_FILES])
                return self._archive(name, record.path)
        except BaseException as e:
            self.catalogue.transition(name, TenantState.active, expected={TenantState.archiving})
            if isinstance(e, TenantSyncError):
                log.warning("archive %s abandoned: %s", name, e)
            raise

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

    def _archive(self, name: str, path: str) -> dict:
        files = [path] + [path + s for s in SIDE_FILES]
        self.fleet.sync(name, archiving=True)
        self.fleet.release(name)  # checkpointed under our barrier, our handles closed
        holders = open_by_others(files)
        if holders:
            raise ArchiveAborted(f"tenant {name}: {path} is open by pid {', '.join(map(str, holders))}")
        stat = DBStat.of(path)
        replica = self.fleet.replica(name)
        compactor.snapshot(replica, self.fleet.config.levels, force=True)
        with tempfile.TemporaryDirectory(dir=os.path.dirname(path), prefix=".archive-verify-") as tmp:
            check = os.path.join(tmp, "verify.db")
            result = restore(replica, check)
            if not same_pages(check, path):
                raise ArchiveAborted(f"tenant {name}: replica at txid {result.txid:016x} differs from {path}")
        quarantine = f"{os.path.dirname(path)}/.{os.path.basename(path)}.archiving"
        os.rename(path, quarantine)
        if open_by_others([quarantine] + files[1:]) or DBStat.of(quarantine) != stat:
            os.rename(quarantine, path)
            raise ArchiveAborted(f"tenant {name}: {path} was opened or written during archival")
        self.catalogue.record_sync(name, txid=result.txid, position=None, at=datetime.now(timezone.utc))
        self.catalogue.transition(name, TenantState.archived, expected={TenantState.archiving})
        freed = 0
        for f in [quarantine] + files[1:]:
            try:
                freed += os.path.getsize(f)
                os.remove(f)
            except FileNotFoundError:
                pass
        log.info("archived %s at txid %016x, freed %d bytes", name, result.txid, freed)
        return {"tenant": name, "archived": True, "txid": result.txid, "freed": freed}
