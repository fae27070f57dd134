"""Where sync requests go: in-process threads (embedded) or Celery queues (fleet, queue.py).

Both dispatchers apply one admission policy (admission.py); this one keeps its marks in
memory and runs the admitted jobs on small thread pools.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Collection, Protocol

from tenantsync.outcome import Failed, Outcome, Shipped
from tenantsync.tenants import shard

from .admission import STORAGE_BATCH, AdmittingDispatcher, Ended, MemoryStore, batches

# A storage batch waits while more than half the sync threads are busy (syncs are slow:
# their fsyncs queue behind the storage process's, which nice does not slow), at most this
# long, so that compaction still moves under a load that never lets up.
STORAGE_YIELDS_FOR = 2.0


class Dispatcher(Protocol):
    def request_sync(self, name: str) -> bool:
        """Ask for a sync of ``name``; False if one was already pending (now marked dirty)."""

    def request_syncs(self, names, stale_after: float | None = None, writes: bool = True) -> int:
        """``request_sync`` for each of ``names`` (one watcher batch); how many were queued.
        ``stale_after``: a sync pending that long is taken as lost and requested again.
        ``writes`` false: not for new writes (a pending sync is not marked dirty)."""

    def submit(self, job: str, names, **kwargs) -> int:
        """Run a storage-only or maintenance job (compact, snapshot, retain, archive) for each
        of ``names`` that has none queued or running; how many were queued."""

    def close(self) -> None: ...


@dataclass
class _Parked:
    """A tenant whose sync failed because the store did not answer, waiting out its backoff."""

    failing_since: float  # monotonic: when its first failed sync ended, its lag's lower bound
    attempt: int
    timer: threading.Timer


class InProcessDispatcher(AdmittingDispatcher):
    """The embedded mode: the same job functions on small thread pools.

    Syncs get their own pool: a compaction or archive of a big tenant can take seconds,
    and behind it every commit on the host would wait (replication lag is what users
    see). With ``shards`` > 1 (tenants split over processes, see embedded.py) each shard
    gets ``workers`` sync threads of its own, so a busy shard's process cannot take every
    thread from the others. Maintenance jobs share ``maintenance_workers`` threads and
    queue among themselves. A job named in ``batched`` takes up to STORAGE_BATCH tenants
    at once and returns ``{tenant: outcome}`` (``Fleet.for_each``), and yields to busy
    syncs (STORAGE_YIELDS_FOR). Contended and transiently failed jobs are run again after
    the policy's delay, on a timer.

    A sync that ships while others wait out a backoff after the store failed them proves the
    store answers again: those are run at once, the longest failing first (most lagging), so
    after an outage no tenant waits up to BACKOFF_MAX for a store that is back, and the
    ones furthest behind catch up first.
    """

    def __init__(self, jobs: dict[str, Callable[..., Outcome | dict]], workers: int = 4,
                 on_result: Callable[[str, Outcome], None] | None = None, maintenance_workers: int = 1,
                 shards: int = 1, batched: Collection[str] = ()):
        self.memory = MemoryStore()
        super().__init__(self.memory, on_result)
        self.jobs = jobs
        self.batched = frozenset(batched)
        self.pools = [ThreadPoolExecutor(workers, thread_name_prefix=f"tenantsync-sync{i}") for i in range(shards)]
        self._busy_syncs = workers * shards // 2
        self.maintenance = ThreadPoolExecutor(maintenance_workers, thread_name_prefix="tenantsync-job")
        self._timers: set[threading.Timer] = set()
        self._parked: dict[str, _Parked] = {}
        self._closing = False
        self._lock = threading.Lock()

    def _start_syncs(self, names: list[str], attempt: int = 0) -> None:
        for name in names:
            self._submit(self.pools[shard(name, len(self.pools))], self._run_sync, name, attempt)

    def _run_sync(self, name: str, attempt: int, failing_since: float | None = None) -> None:
        ended = self.run_syncs([name], self.jobs["sync"], attempt)
        outcome = ended.outcomes.get(name)
        if name in ended.retry and isinstance(outcome, Failed) and outcome.transient:
            self._park(name, ended.retry[name], attempt + 1, failing_since or time.monotonic())
            return
        self._later(ended, self._start_syncs, attempt + 1)
        if isinstance(outcome, Shipped):
            self._unpark()  # the store answers again: every parked tenant

    def _park(self, name: str, delay: float, attempt: int, failing_since: float) -> None:
        timer = threading.Timer(delay, self._unpark, args=([name],))
        timer.daemon = True
        with self._lock:
            if self._closing:
                return
            self._parked[name] = _Parked(failing_since, attempt, timer)
        timer.start()

    def _unpark(self, names: list[str] | None = None) -> None:
        """Run the parked syncs of ``names`` (default: all) now, longest failing first; only
        those still parked: a timer and a wake-up may race, and only the one that takes a
        tenant out starts it."""
        with self._lock:
            names = list(self._parked) if names is None else names
            taken = sorted(((self._parked.pop(n), n) for n in names if n in self._parked),
                           key=lambda item: item[0].failing_since)
        for parked, name in taken:
            parked.timer.cancel()
            self._submit(self.pools[shard(name, len(self.pools))], self._run_sync, name, parked.attempt,
                         parked.failing_since)

    def _start_jobs(self, job: str, names: list[str], kwargs: dict, attempt: int = 0) -> None:
        for batch in batches(names, STORAGE_BATCH if job in self.batched else 1):
            self._submit(self.maintenance, self._run_jobs, job, batch, kwargs, attempt)

    def _run_jobs(self, job: str, names: list[str], kwargs: dict, attempt: int) -> None:
        if job in self.batched:
            self._yield_to_syncs()
        ended = self.run_jobs(job, names, self.jobs[job], kwargs, batched=job in self.batched, attempt=attempt)
        self._later(ended, lambda names, attempt: self._start_jobs(job, names, kwargs, attempt), attempt + 1)

    def _later(self, ended: Ended, start: Callable[[list[str], int], None], attempt: int) -> None:
        """Start ``ended.retry`` again after its delay (a timer each: retries are rare)."""
        if not ended.retry:
            return

        def fire() -> None:
            with self._lock:
                self._timers.discard(timer)
            start(list(ended.retry), attempt)

        timer = threading.Timer(ended.retry_delay, fire)
        timer.daemon = True
        with self._lock:
            if self._closing:
                return
            self._timers.add(timer)
        timer.start()

    @staticmethod
    def _submit(pool: ThreadPoolExecutor, fn: Callable, *args) -> None:
        """Queue ``fn(*args)``; once the pool is shut down (closing), drop it: a sync admitted
        again then is not lost, as the final release ships every open tenant."""
        try:
            pool.submit(fn, *args)
        except RuntimeError:  # cannot schedule new futures after shutdown
            pass

    def _yield_to_syncs(self) -> None:
        deadline = time.monotonic() + STORAGE_YIELDS_FOR
        while time.monotonic() < deadline and self.memory.pending() > self._busy_syncs:
            time.sleep(0.02)

    def idle(self) -> bool:
        """Whether no sync is queued or running."""
        return not self.memory.pending()

    def close(self) -> None:
        """Finish the syncs, and the maintenance jobs already running; the queued ones are
        dropped (the schedule offers them again after a restart): a stop during a plan round
        at 10,000 tenants would otherwise run thousands of compactions first. Re-offers
        waiting on a timer are dropped too (the final release ships every open tenant)."""
        with self._lock:
            self._closing = True
            timers, self._timers = self._timers, set()
            timers |= {parked.timer for parked in self._parked.values()}
            self._parked.clear()
        for timer in timers:
            timer.cancel()
        for pool in self.pools:
            pool.shutdown(wait=True)
        self.maintenance.shutdown(wait=True, cancel_futures=True)
