"""The fleet's core calls: sync, compact, snapshot and retain one tenant by name.

Jobs (Celery tasks or the embedded runner) call these and nothing else. A ``Fleet`` is
per process: it caches a ``Capture`` only for tenants written recently (each holds descriptors of the
database and its ``-shm`` and SQLite connections for the read mark — see capture.py and
``process.FDS_PER_TENANT``) and
releases them after ``idle_after``, so an idle tenant costs a catalogue row and nothing
in memory. The catalogue holds each tenant's position, so any process on the host can
pick a tenant up where another left it.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from . import compactor, fence, tenants
from .job_scope import tenant_job
from .capture import Capture
from .catalogue import REPLICATED, Catalogue, FencedCopy, TenantRecord, TenantState, open_catalogue
from .config import AT_CEILING_CHECKPOINT, Config
from .errors import DatabaseError, Fenced, LeaseHeld, NotATenant, ReplicaConflict, StorageError, StorageUnavailable, TenantMismatch, TenantSyncError
from .lease import HeldLease, Lease, Leaser
from .outcome import (Contended, Contention, Deleted, Failed, NothingNew, Outcome, Shipped, Skip, Skipped,
                      Written, failed)
from .position import Position
from .process import max_open_tenants, return_freed_memory
from .replica import Replica
from . import tenant_key
from .keyring import Keyring, load_keyring
from .storage import Storage, open_storage
from .tenant_key import TenantKey

log = logging.getLogger(__name__)

MIB = 1 << 20


def _now() -> datetime:
    return datetime.now(timezone.utc)


def wal_size(capture: Capture) -> int | None:
    """Bytes in the tenant's ``-wal`` file now (None without one): what an outage holds on disk."""
    try:
        return os.path.getsize(capture.wal_path)
    except OSError:
        return None


# Past this share of max_open, the release thread trims open tenants (Fleet.trim_to).
TRIM_TO = 0.9
# Compaction and snapshot times reach the catalogue at most this often, many per write: a
# compaction round covers every tenant written in the interval, and a write of its own for
# each would hold the host's catalogue write lock from the niced storage process, which may
# lose the CPU while holding it, so every sync's catalogue write would wait behind it.
STORAGE_TIMES_EVERY = 5.0
# When a contended sync is worth trying again (Contended.retry_after), in seconds. Another
# process of this host that wrote the next TXID first is done within milliseconds; a lease
# held by another host may be released at any moment (a deploy hands tenants over at once),
# and a dead holder's lapses after lease-ttl: a short, fixed delay serves all three.
CONTENDED_RETRY = 1.0
# Seconds between reads of this host's fenced names (see Fleet._fenced_names).
FENCED_READ_EVERY = 5.0


def _recorded_lease(record: TenantRecord) -> Lease | None:
    """The lease version the catalogue last saw written, if it knows one with its etag."""
    if record.lease_etag and record.lease_holder and record.lease_expires_at:
        return Lease(record.lease_holder, record.generation, record.lease_expires_at, record.lease_etag)
    return None


@dataclass
class _Active:
    """An open tenant: its capture, and when a job last used it (monotonic)."""

    capture: Capture
    last_used: float


class Fleet:
    """Replication of many tenants from one process, one call per job."""

    def __init__(self, config: Config, catalogue: Catalogue | None = None):
        self.config = config
        self.catalogue = catalogue or open_catalogue(config)
        if self.catalogue.fleet != config.fleet:
            raise TenantMismatch(f"catalogue of fleet {self.catalogue.fleet} given to the fleet of {config.fleet}")
        self.patterns = tenants.patterns(config.globs)
        self.storage = open_storage(config.replica, config.storage)
        # The lease belongs to the host: every process of one host may sync its tenants
        # (write-if-absent fences their TXIDs); other hosts are kept out.
        self.owner = config.host
        # Least recently synced first: the descriptor cap releases from the front.
        self._active: OrderedDict[str, _Active] = OrderedDict()
        self._locks: dict[str, threading.RLock] = {}  # tenant_lock's, one per tenant
        self._guard = threading.Lock()
        # Past this many open tenants the least recently synced one is released before
        # another is opened: running out of descriptors would fail syncs at random.
        self.max_open = max_open_tenants()
        # Past this many, the release thread trims the least recently synced tenants in the
        # background; a sync releases one inline only at max_open. Without the margin, once
        # the cap was reached every wake-up would pay a release (barrier, checkpoint,
        # catalogue write) before its own sync, adding that to its commit-to-replica lag.
        self.trim_to = int(self.max_open * TRIM_TO)
        self._crowded = threading.Event()
        # The one home of every lease this process holds: of each open tenant, and of those
        # released while idle, kept until they expire (HeldLease says why).
        self._leases: dict[str, HeldLease] = {}
        # Compaction and snapshot times not yet in the catalogue (STORAGE_TIMES_EVERY).
        self._storage_times: dict[str, dict[str, datetime]] = {"compact": {}, "snapshot": {}}
        self._storage_times_written = time.monotonic()
        # Tenants whose WAL passed wal-ceiling while the store failed, reported once until they ship.
        self._over_ceiling: set[str] = set()
        # Encrypted fleets: the keyring (loaded at the first key needed) and each tenant's data key.
        self._keyring: Keyring | None = None
        self._keys: dict[str, TenantKey] = {}
        # This host's fenced tenants (fence.py), loaded at the first sync, read again now and then.
        self._fenced: set[str] | None = None
        self._fenced_read_at = 0.0

    def replica(self, name: str) -> Replica:
        """A tenant's replica: its name is its prefix, itself a valid Litestream replica URL;
        with ``encrypt``, every object in it sealed under the tenant's data key."""
        storage = self.storage.child(name)
        if self.config.encrypt:
            storage = self.tenant_key(name, storage).seal(storage)
        return Replica(storage)

    def tenant_key(self, name: str, storage: Storage | None = None) -> TenantKey:
        """Tenant ``name``'s data key: read (or, for a new replica, created) once per process,
        then kept, so an encrypted fleet's syncs cost no extra request. The key never leaves
        the process: a job names the tenant, and each process unwraps with its own keyring."""
        with self._guard:
            known = self._keys.get(name)
        if known is not None:
            return known
        if self._keyring is None:
            self._keyring = load_keyring(self.config.keyring)
        key = tenant_key.load_or_create(storage or self.storage.child(name), name, self._keyring)
        with self._guard:
            return self._keys.setdefault(name, key)

    def forget_key(self, name: str) -> None:
        """Drop the cached key of ``name`` (its key was rewrapped, or shredded)."""
        with self._guard:
            self._keys.pop(name, None)

    def _leaser(self, name: str) -> Leaser:
        return Leaser(self.storage.child(name), owner=self.owner, ttl=self.config.lease_ttl)

    def tenant_lock(self, name: str) -> threading.RLock:
        """Held by every job on one tenant in this process, so they never interleave."""
        with self._guard:
            return self._locks.setdefault(name, threading.RLock())

    def resolve(self, name: str, take_over: bool = False) -> str:
        """The local path of tenant ``name`` of this fleet, checked before anything acts on
        it: a name that is not the fleet's tenant raises BadTenantName or NotATenant, and a
        catalogue row at another path raises TenantMismatch (the three named). With globs,
        the name must match one (tenants.locate); without (a one-shot command given only a
        replica), the catalogue must know it, at a path that ends in its name and is no
        symbolic link. A row of another host raises TenantMismatch too (naming that host),
        unless ``take_over``: a hydration moves the tenant to this host, from the replica,
        wherever that host kept it. Nothing is created or touched here."""
        name = tenants.check_name(name)
        record = self.catalogue.get(name)
        if self.patterns:
            path = tenants.locate(self.patterns, name)
        elif record is None:
            raise NotATenant(f"tenant {name!r}: unknown to the fleet of {self.storage} "
                             "(give its glob, or 'globs:' in tenantsync.yml)")
        else:
            path = record.path
            if not path.endswith(os.sep + name) or os.path.islink(path):
                raise TenantMismatch(f"tenant {name}: the catalogue's path {path} is not a file named {name}")
        if record is not None and record.host != self.config.host and not take_over:
            raise TenantMismatch(f"tenant {name}: the catalogue gives it to host {record.host} (at {record.path}), "
                                 f"not this host ({self.config.host}), replica {self.storage}/{name}: nothing touched "
                                 "(hydrate it here to move it here)")
        if record is not None and record.path != path and record.host == self.config.host:
            raise TenantMismatch(f"tenant {name}: the catalogue holds it at {record.path}, the fleet's globs put it "
                                 f"at {path}, replica {self.storage}/{name}: nothing touched")
        return path

    # -- jobs -------------------------------------------------------------------

    @tenant_job("sync")
    def sync(self, name: str, *, archiving: bool = False) -> Outcome:
        """Ship what tenant ``name`` committed since its position; idempotent.

        Each layer once, in order: open the tenant from its catalogue row (a capture at the
        stored position), stop if nothing new was committed, hold the lease, run one capture
        pass, write the outcome to the catalogue (one transaction, :meth:`_record`) and
        return it. Tenants being archived or hydrated are Skipped (those jobs sync
        themselves, passing ``archiving=True`` under the tenant's lock).
        """
        with self.tenant_lock(name):
            # What it ships is what was committed before now: recorded as the sync's time, a
            # write landing while it runs is still seen as unsynced (catch-up, caught-up checks).
            started = _now()
            if self._is_fenced(name):
                return Skipped(name, Skip.FENCED)
            try:
                active = self._activate(name, archiving)
            except Fenced as e:  # the row is another host's
                path = self._local_path(name)
                if path is None or not os.path.exists(path):
                    # No copy here to fence (an operator deleted the fenced one and unfenced
                    # it): a fence recorded now would refuse the tenant's next failover here.
                    return Skipped(name, Skip.GONE)
                return self._fence(name, e, path=path, in_place=True)
            if active is None:
                return Skipped(name, Skip.NOT_REPLICABLE)
            if not active.capture.is_open() and not os.path.exists(active.capture.path):
                # Neither the lease nor a fence for files that are not here: an operator who
                # deleted a fenced copy and unfenced it hydrates the tenant here later.
                self._drop(name)
                return Skipped(name, Skip.GONE)
            unindexed = False
            if not active.capture.has_news():
                self._drop(name)  # stays idle: nothing opened, no lease taken
                outcome: Outcome = NothingNew(name)
            else:
                outcome = self._pass(name, active)
                unindexed = active.capture.commit_unindexed
            # Within an archival the tenant stays archiving; otherwise a shipping pass makes it active.
            self._record(outcome, active.capture, started, state=None if archiving else TenantState.active)
            if unindexed:
                # A commit made before the pass that SQLite had not counted yet: a write after
                # it, so the catch-up plan asks again (Capture._await_indexing).
                self.catalogue.record_writes([name], _now(), self.config.host)
            return outcome

    def _pass(self, name: str, active: _Active) -> Outcome:
        """Hold the lease and run one capture pass: what it did, as an outcome."""
        try:
            held = self._hold(name, active)
            if held.renewed:
                active.capture.trust_position()
            result = active.capture.sync_once()
        except Fenced as e:
            return self._fence(name, e, active=active)
        except LeaseHeld as e:
            return self._lease_held(name, active, e)
        except ReplicaConflict as e:
            log.warning("%s: %s", name, e)
            return Contended(name, Contention.TXID_TAKEN, CONTENDED_RETRY, str(e))
        except DatabaseError as e:
            self._drop(name)
            return failed(name, e)
        except StorageError as e:
            # Kept open: the read mark keeps the unshipped frames in the WAL for the next pass.
            self._past_ceiling(name, active.capture)
            return failed(name, e)
        with self._guard:
            active.last_used = time.monotonic()
            if name in self._active:
                self._active.move_to_end(name)
        if result.txid is None:
            return NothingNew(name)
        return Shipped(name, result.txid, result.pages, result.size, full=result.full)

    def _record(self, outcome: Outcome, capture: Capture, started: datetime, state: TenantState | None) -> None:
        """The one catalogue write of a sync's outcome, one transaction:

        - Shipped: the capture's position, the bytes added, the lease columns if the lease
          changed since the last write, and ``state``;
        - NothingNew: only ``last_sync_at`` (the replica is current as of ``started``);
        - Failed: state error with the message, so `tenantsync tenants` shows the tenant
          failing, not idle, and the catch-up schedule retries it;
        - Contended and Skipped: nothing; the tenant is another writer's or job's now, and
          that one records it. But commits found and not shipped because another owner
          holds the lease are recorded as a write (``record_writes``): the catch-up plan
          then asks again once the retries end, even if no file event comes (a write made
          before the watcher started), until the lease is free or the copy fenced.
        """
        name = outcome.tenant
        if isinstance(outcome, Shipped):
            pos = capture.position
            self.catalogue.record_sync(name, txid=pos.txid if pos else 0, position=pos.to_dict() if pos else None,
                                       at=started, state=state, bytes_added=outcome.bytes,
                                       lease=self._leases[name].unrecorded(), wal_bytes=wal_size(capture))
            self._over_ceiling.discard(name)
        elif isinstance(outcome, NothingNew):
            self.catalogue.record_caught_up(name, started)
        elif isinstance(outcome, Failed):
            self.catalogue.record_error(name, str(outcome.error), wal_bytes=wal_size(capture))
        elif isinstance(outcome, Contended) and outcome.why is Contention.LEASE_HELD:
            self.catalogue.record_writes([name], started, self.config.host)

    def _past_ceiling(self, name: str, capture: Capture) -> None:
        """What a failed pass does once the WAL it keeps holds more than ``wal-ceiling``:
        say so once per tenant (until it ships again), and with ``at-wal-ceiling:
        checkpoint`` copy the WAL into the database unshipped (Capture.checkpoint_unshipped)."""
        size = wal_size(capture)
        if size is None or size <= self.config.wal_ceiling:
            return
        ceiling = f"{size / MIB:.1f} MiB, past wal-ceiling {self.config.wal_ceiling / MIB:.1f} MiB"
        if self.config.at_wal_ceiling == AT_CEILING_CHECKPOINT:
            if capture.checkpoint_unshipped():
                log.warning("%s: the store has not taken its writes and its WAL holds %s: checkpointed without "
                            "shipping (at-wal-ceiling: checkpoint); the replica gets the whole database once the "
                            "store answers, without restore points for the writes since its last sync", name, ceiling)
        elif name not in self._over_ceiling:
            self._over_ceiling.add(name)
            log.warning("%s: the store has not taken its writes and its WAL holds %s: kept, growing until the "
                        "store answers (at-wal-ceiling: grow)", name, ceiling)

    def release_idle(self, idle_after: float | None = None) -> list[str]:
        """Checkpoint and close tenants not synced for ``idle_after`` seconds; their leases
        are kept until they expire (:meth:`shutdown` gives them up)."""
        limit = self.config.idle_after.total_seconds() if idle_after is None else idle_after
        cutoff = time.monotonic() - limit
        with self._guard:
            idle = [n for n, a in self._active.items() if a.last_used < cutoff]
        released = [name for name in idle
                    if self.release(name, unused_since=cutoff, keep_lease=True, keep_unshipped=True)]
        with self._guard:  # forget the kept leases that have expired
            for name in [n for n, held in self._leases.items() if n not in self._active and held.expired()]:
                del self._leases[name]
        if released:
            return_freed_memory()
        return released

    def release_archiving(self) -> list[str]:
        """Release this process's open tenants that another process is archiving: archival
        marks a tenant ``archiving`` first, then refuses while any other process has its
        files open, and waits a bounded time for fleet processes to let go
        (``ondemand.HOLDERS_WAIT``). One indexed query, none while no tenant is open. A
        tenant a job is using (the archival itself, when it runs here) is left alone."""
        with self._guard:
            if not self._active:
                return []
        archiving = {r.name for r in self.catalogue.records(state=TenantState.archiving, host=self.config.host)}
        with self._guard:
            names = [n for n in self._active if n in archiving]
        return [name for name in names if self._release_unless_busy(name, keep_lease=False)]

    def release_idle_every(self, seconds: float, stop: threading.Event) -> None:
        """Run :meth:`release_idle` and :meth:`release_archiving` every ``seconds``, and
        :meth:`trim` as soon as more than ``trim_to`` tenants are open, until ``stop``: one
        thread per process (not per tenant), and not behind other jobs, so the open tenants
        stay few."""
        next_idle = time.monotonic() + seconds
        while not stop.is_set():
            self._crowded.wait(min(0.5, max(0.0, next_idle - time.monotonic())))
            try:
                if self._crowded.is_set():
                    self._crowded.clear()
                    self.trim()
                if time.monotonic() >= next_idle:
                    next_idle = time.monotonic() + seconds
                    self.release_idle()
                    self.release_archiving()
            except Exception:  # noqa: BLE001 - one failed release must not end the loop
                log.exception("releasing idle tenants failed; retrying in %.0f s", seconds)

    def start_releasing(self, seconds: float, stop: threading.Event) -> threading.Thread:
        """Start this process's one release thread (:meth:`release_idle_every`)."""
        thread = threading.Thread(target=self.release_idle_every, args=(seconds, stop),
                                  name="tenantsync-release-idle", daemon=True)
        thread.start()
        return thread

    def shutdown(self) -> None:
        """Release every open tenant and give up every lease, kept ones included (a deploy:
        the next process takes over at once), then close.

        On as many threads as the process syncs with: each release is a final pass, a
        checkpoint, a catalogue write and a lease write, mostly round trips, so one after
        another thousands of open tenants on a distant store outlast a service manager's
        stop timeout. The kept leases are given up after the releases, also in parallel;
        the per-host cap (``storage: max-in-flight``) still bounds the requests."""
        with self._guard:
            open_now = list(self._active)
        self._stop_each(lambda name: self.release(name, keep_lease=False), open_now)
        with self._guard:  # the leases kept by earlier idle releases, of tenants now closed
            kept = {n: held for n, held in self._leases.items() if n not in self._active}
            for name in kept:
                del self._leases[name]

        def give_up(name: str) -> None:
            given_up = kept[name].give_up()
            if given_up is not None:
                self.catalogue.record_lease(name, *given_up)
        self._stop_each(give_up, list(kept))
        if open_now:
            return_freed_memory()
        self.close()

    def _stop_each(self, work: Callable[[str], object], names: list[str]) -> None:
        """``work(name)`` for every name on the sync threads' number of threads; a failure
        is logged and the others go on (a stop must reach every tenant)."""
        def one(name: str) -> None:
            try:
                work(name)
            except Exception:  # noqa: BLE001 - logged; the rest of the stop goes on
                log.exception("%s: stopping it failed", name)

        _for_all(one, names, self.config.threads_per_process(), "tenantsync-stop")

    def release(self, name: str, unused_since: float | None = None, keep_lease: bool = False,
                keep_unshipped: bool = False) -> bool:
        """Checkpoint, close and give up the lease of one tenant; it then costs nothing.

        With ``unused_since``, only if it was not synced after that (monotonic) time. With
        ``keep_lease`` the lease is not given up but remembered until it expires (an idle
        release: the tenant may wake up soon, and another host may take it after the TTL).
        With ``keep_unshipped`` a tenant whose final pass cannot reach the store stays open
        (False), so its read mark keeps the unshipped frames; else it is closed anyway (a
        shutdown, or the descriptor cap).
        """
        with self.tenant_lock(name):
            with self._guard:
                active = self._active.get(name)
            if active is None or (unused_since is not None and active.last_used >= unused_since):
                return False
            held = self._leases[name]
            try:
                # Ship the tail only while we still hold the lease; without it (another
                # process or host moved on) just close: its position is not ours to record.
                # A lease still held is not renewed: the tail ships well inside its term,
                # and an idle release keeps it only until it expires anyway. With no tail
                # (the usual idle release) nothing is uploaded and no lease is taken: the
                # checkpoint only touches the local file. An idle tenant's lease has usually
                # lapsed by now, so re-taking it only to close would cost a conditional write
                # per release for nothing.
                if not active.capture.shipped_all() and not held.held():
                    self._hold(name, active)
                started = _now()
                shipped = active.capture.release()
                # Given up before the catalogue write, so the write says so too: one
                # transaction. Another host taking over at once cannot be set back by it:
                # the position never moves backwards (record_sync).
                lease = held.unrecorded() if keep_lease else held.give_up()
                pos = active.capture.position
                if pos is not None:
                    # The position (now with the main file's stat) is what lets the next
                    # pass resume; last_sync_at moves only if this shipped something, else
                    # every release would make the schedule compact the tenant again.
                    self.catalogue.record_sync(name, txid=pos.txid, position=pos.to_dict(),
                                               at=started if shipped.txid is not None else None,
                                               state=TenantState.idle, bytes_added=shipped.size, lease=lease,
                                               wal_bytes=wal_size(active.capture))
                elif lease is not None:
                    self.catalogue.record_lease(name, *lease)
            except Fenced as e:
                self._fence(name, e, active=active)
                return True
            except (LeaseHeld, ReplicaConflict) as e:
                log.info("%s: closed without a final pass: %s", name, e)
            except StorageError as e:
                # Committed data is left unshipped: the tenant must not show idle, and a
                # shutdown reports it (scheduler/embedded.py).
                self.catalogue.record_error(name, str(e), wal_bytes=wal_size(active.capture))
                if keep_unshipped:
                    # Closed, the read mark would let the application's checkpoints restart
                    # the WAL past frames the store never got; the outage's retries ship them.
                    active.last_used = time.monotonic()
                    log.debug("%s: kept open, its WAL unshipped: %s", name, e)
                    return False
                log.warning("%s: final pass failed, closing anyway (next pass resumes): %s", name, e)
            except BaseException:
                self._drop(name, keep_lease=keep_lease)
                raise
            self._drop(name, keep_lease=keep_lease)
            return True

    def compact(self, name: str, level: int, force: bool = False) -> Written | Skipped:
        info = compactor.compact(self.replica(name), level, self.config.levels, force=force)
        if info is None:  # a pass with nothing to merge is not worth a catalogue write
            return Skipped(name, Skip.NOTHING_TO_WRITE)
        self._storage_time("compact", name)
        return Written(name, "compact", info.name, level)

    def snapshot(self, name: str, force: bool = False) -> Written | Skipped:
        info = compactor.snapshot(self.replica(name), self.config.levels, force=force)
        if info is None:
            return Skipped(name, Skip.NOTHING_TO_WRITE)
        self._storage_time("snapshot", name)
        return Written(name, "snapshot", info.name)

    def _storage_time(self, job: str, name: str) -> None:
        """Note when ``job`` last wrote a file for ``name``; write what has gathered to the
        catalogue if STORAGE_TIMES_EVERY has passed (the rest at the next job or at close).
        These times are for operators only: one lost with a killed process costs nothing."""
        with self._guard:
            self._storage_times[job][name] = _now()
            if time.monotonic() - self._storage_times_written < STORAGE_TIMES_EVERY:
                return
        self.write_storage_times()

    def write_storage_times(self) -> None:
        with self._guard:
            times, self._storage_times = self._storage_times, {"compact": {}, "snapshot": {}}
            self._storage_times_written = time.monotonic()
        if times["compact"] or times["snapshot"]:
            self.catalogue.record_storage_times(compacted=times["compact"], snapshotted=times["snapshot"])

    def retain(self, name: str) -> Deleted:
        return Deleted(name, len(compactor.retain(self.replica(name), self.config.levels)))

    def for_each(self, job: str, names: list[str], **kwargs) -> dict[str, Outcome]:
        """A storage job (STORAGE_JOBS: compact, snapshot, retain) for each of a batch of
        tenants: ``{tenant: outcome}``, a tenant's error as its Failed outcome, one tenant's
        failure not stopping the others. Storage that cannot be reached fails the whole
        batch (raised): the Celery tasks retry the batch with backoff on it, and the
        embedded dispatcher logs it once instead of once per tenant."""
        run = STORAGE_JOBS[job]

        @tenant_job(job)
        def one(name: str) -> Outcome:
            try:
                return run(self, name, **kwargs)
            except StorageUnavailable:
                raise
            except Exception as e:  # noqa: BLE001 - returned to the caller, which logs it
                return failed(name, e)

        return _for_all(one, names, self.config.storage_job_threads(), "tenantsync-storage-job")

    def close(self) -> None:
        with self._guard:
            names = list(self._active)
        for name in names:
            with self.tenant_lock(name):
                self._drop(name)
        self.write_storage_times()

    # -- internals --------------------------------------------------------------

    def _activate(self, name: str, archiving: bool = False) -> _Active | None:
        with self._guard:
            active = self._active.get(name)
        if active is not None:
            return active
        record = self.catalogue.get(name)
        if record is None or record.state not in REPLICATED + (TenantState.archiving,):
            return None
        if record.state == TenantState.archiving and not archiving:
            return None
        if record.host != self.config.host:
            raise Fenced(f"tenant {name}: host {record.host} holds it in the catalogue (it moved there, or that host "
                         f"uses the name too), not this host ({self.config.host}): this host's copy is fenced, "
                         "nothing of it uploaded")
        position = Position.from_dict(record.position) if record.position else None
        capture = Capture(record.path, self.replica(name), position=position)
        active = _Active(capture, time.monotonic())
        with self._guard:
            held = self._leases.get(name)
            if held is None:
                held = self._leases[name] = HeldLease(self._leaser(name), never_held=record.generation == 0,
                                                      presumed=_recorded_lease(record))
            self._active[name] = active
            count = len(self._active)
        capture.fence = held.check
        if count > self.trim_to:
            self._crowded.set()
        if count > self.max_open:
            self._release_least_recent(keep=name)
        return active

    def trim(self) -> int:
        """Release least recently synced tenants until at most ``trim_to`` are open."""
        released = 0
        while True:
            with self._guard:
                if len(self._active) <= self.trim_to:
                    return released
            if not self._release_least_recent(keep=None):
                return released  # every open tenant is busy in a job
            released += 1

    def _release_least_recent(self, keep: str | None) -> bool:
        """Release the least recently synced open tenant that no job is using now. Only
        the oldest few are looked at (twice as many as jobs can hold at once): this runs
        once per tenant opened past the cap, so listing every open tenant each time would
        cost in proportion to thousands of them."""
        with self._guard:
            candidates = list(itertools.islice((n for n in self._active if n != keep),
                                               2 * self.config.threads_per_process() + 8))
        for name in candidates:
            if self._release_unless_busy(name, keep_lease=True):
                log.info("%s: released early, %d tenants open (limit %d)", name, len(self._active), self.max_open)
                return True
        return False

    def _release_unless_busy(self, name: str, keep_lease: bool) -> bool:
        """:meth:`release` unless a job is using the tenant now (then False at once)."""
        lock = self.tenant_lock(name)
        if not lock.acquire(blocking=False):
            return False
        try:
            return self.release(name, keep_lease=keep_lease)
        except TenantSyncError as e:  # it is closed anyway; its next sync resumes
            log.warning("%s: release failed: %s", name, e)
            return True
        finally:
            lock.release()

    def take_over(self, name: str) -> None:
        """Hold tenant ``name``'s lease before it is hydrated here from its replica, when it
        may be another host's (a failover): raises LeaseHeld while that host's lease is
        live, and once it is held here that host can upload nothing more (its fence checks
        the lease before every upload), so the restore reads the state it will continue.
        The tenant's first sync here renews this lease instead of taking it again. A
        replica with no lease object (never replicated, or released by Litestream, which
        deletes it) has nothing to take over: no object is created for it here."""
        with self._guard:
            held = self._leases.get(name)
        if held is None:
            current = self._leaser(name).read()
            if current is None:
                return
            with self._guard:
                held = self._leases.setdefault(name, HeldLease(self._leaser(name), presumed=current))
        held.hold()

    def _hold(self, name: str, active: _Active) -> HeldLease:
        """Hold the tenant's lease (``HeldLease.hold``). Taken over from another owner who
        wrote the replica past this process's position: Fenced (fence.py), with the lease
        held, which ``_fence`` gives back."""
        held = self._leases[name]
        held.hold()
        if held.handed_over:
            if fenced := fence.moved_on(active.capture, name, held.lease.taken_from or "another host"):
                raise fenced
            held.handed_over = False  # checked: this copy is the replica's head
        return held

    def _lease_held(self, name: str, active: _Active, error: LeaseHeld) -> Outcome:
        """Another owner holds the lease: Contended, retried later. Unless it took the lease
        over from this host (a newer generation than this host held) and wrote on from its
        own copy: this one is fenced now, not once that owner's lease lapses (an active
        tenant's never does). A replica check the store did not answer is made again at the
        next try."""
        if self._leases[name].taken_over(error):
            try:
                fenced = fence.moved_on(active.capture, name, error.owner)
            except StorageError as e:
                log.info("%s: the replica check after a takeover failed, made again at the next try: %s", name, e)
                fenced = None
            if fenced is not None:
                return self._fence(name, fenced, active=active)
        log.warning("%s", error)
        return Contended(name, Contention.LEASE_HELD, CONTENDED_RETRY, str(error))

    def _fence(self, name: str, error: Fenced, *, active: _Active | None = None, path: str | None = None,
               in_place: bool = False) -> Skipped:
        """Stop replicating ``name`` on this host for good: its lease given back to the host
        that moved it on, its capture (``active``, if open) closed unshipped, its files
        (at ``path`` if no capture is open) moved aside and the copy recorded (``tenantsync
        tenants`` shows it fenced). Said once, here.

        ``in_place``: the files stay where they are. For a copy fenced because the catalogue
        gives the tenant to another host: that is a row's word, not the replica's, and a
        host running under the wrong ``host:`` name must not have every tenant's file
        taken from under its application. Nothing of it is uploaded either way."""
        held = self._leases.get(name)
        if held is not None:
            held.give_up()
        self._drop(name, keep_lease=False)
        pos = None
        if active is not None:
            path, pos = active.capture.path, active.capture.position
        moved = path is not None and not in_place and os.path.exists(path)
        aside = fence.move_aside(path, "fenced")[0] if moved else path or ""
        self.catalogue.record_fenced(FencedCopy(self.catalogue.fleet, self.config.host, name, path or "", aside,
                                                str(error), pos.txid if pos is not None else 0, _now()))
        with self._guard:
            self._fenced_names().add(name)
        where = f"its files were moved to {aside}" if moved else f"its files are kept at {aside}"
        log.warning("%s; %s", error, where)
        return Skipped(name, Skip.FENCED, f"{error}; {where}")

    def _local_path(self, name: str) -> str | None:
        """Where this host's globs put tenant ``name``, if anywhere."""
        try:
            return tenants.locate(self.patterns, name) if self.patterns else None
        except NotATenant:
            return None

    def _is_fenced(self, name: str) -> bool:
        with self._guard:
            return name in self._fenced_names()

    def _fenced_names(self) -> set[str]:
        """This host's fenced names (under _guard), read from the catalogue again every
        FENCED_READ_EVERY seconds: one query per interval, not one per sync, and an
        operator's ``tenantsync unfence`` reaches a running fleet within it."""
        now = time.monotonic()
        if self._fenced is None or now - self._fenced_read_at > FENCED_READ_EVERY:
            self._fenced = {copy.name for copy in self.catalogue.fenced(self.config.host)}
            self._fenced_read_at = now
        return self._fenced

    def _drop(self, name: str, keep_lease: bool = True) -> None:
        """Close the tenant's capture. Its lease is kept (until it expires) unless
        ``keep_lease`` is false or there is none: then it is forgotten, not released."""
        with self._guard:
            active = self._active.pop(name, None)
            held = self._leases.get(name)
            if held is not None and (not keep_lease or held.lease is None):
                del self._leases[name]
        if active is not None:
            active.capture.close()


def _for_all(work: Callable[[str], Outcome | None], names: list[str], threads: int,
             prefix: str) -> dict[str, Outcome | None]:
    """``{name: work(name)}``, on up to ``threads`` threads (in this one for a single
    thread); the first exception a call raised, in ``names`` order, is raised."""
    threads = min(len(names), threads)
    if threads <= 1:
        return {name: work(name) for name in names}
    with ThreadPoolExecutor(threads, thread_name_prefix=prefix) as pool:
        futures = {name: pool.submit(work, name) for name in names}
        return {name: future.result() for name, future in futures.items()}


# The storage-only jobs for_each runs, by name.
STORAGE_JOBS = {"compact": Fleet.compact, "snapshot": Fleet.snapshot, "retain": Fleet.retain}
