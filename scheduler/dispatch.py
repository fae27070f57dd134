"""Where sync requests go: in-process threads (embedded) or Celery queues (fleet).

Both dispatchers keep at most one sync per tenant queued or running. A request for a
tenant that already has one marks it *dirty* instead; when the running sync ends it
runs once more if it was marked. So a hot tenant costs one job at a time, and a write
that lands during a sync is never left behind.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Collection, Protocol

from tenantsync.errors import log_failure
from tenantsync.outcome import Failed
from tenantsync.tenants import shard

log = logging.getLogger(__name__)

# Tenants per storage job handed over at once (a Celery message, a call into the embedded
# storage process). A level-1 plan at 10,000 tenants under 200 writes/s offers about 6,000
# compactions, three plans on a 5-minute boundary about 26,000: one hand-over each was 17 us
# of Python per tenant in the process that also syncs (0.5 s holding the interpreter lock at
# the boundary; that process's commits waited up to 0.87 s), plus a round trip per tenant.
STORAGE_BATCH = 32
# A storage batch waits while more than half the sync threads are busy (syncs are slow:
# their fsyncs queue behind the storage process's, which nice does not slow), at most this
# long, so that compaction still moves under a load that never lets up.
STORAGE_YIELDS_FOR = 2.0


def job_key(job: str, kwargs: dict) -> str:
    """A maintenance job's name with its arguments: at most one per (job, tenant, arguments)
    is queued or running. The schedule offers compactions every interval and archival candidates every
    run; at 10,000 tenants a round of compactions outlasted the interval, and without this
    the queue only grew (the worker never went idle)."""
    return ":".join([job, *(f"{k}={kwargs[k]}" for k in sorted(kwargs))])


class Dispatcher(Protocol):
    def request_sync(self, name: str) -> bool:
        """Ask for a sync of ``name``; False if one was already pending (now marked dirty)."""

    def request_syncs(self, names) -> int:
        """``request_sync`` for each of ``names`` (one watcher batch); how many were queued."""

    def submit(self, job: str, names, **kwargs) -> int:
        """Run a storage-only or maintenance job (compact, snapshot, retain, archive) for each
        of ``names`` that has none queued or running; how many were queued."""

    def close(self) -> None: ...


class InProcessDispatcher:
    """The embedded mode: the same job functions on small thread pools.

    Syncs get their own pool: a compaction or archive of a big tenant can take seconds,
    and behind it every commit on the host would wait (replication lag is what users
    see). With ``shards`` > 1 (tenants split over processes, see embedded.py) each shard
    gets ``workers`` sync threads of its own, so a busy shard's process cannot take every
    thread from the others. Maintenance jobs share ``maintenance_workers`` threads and
    queue among themselves. A job named in ``batched`` takes up to STORAGE_BATCH tenants
    at once and returns ``{tenant: outcome}`` (a tenant's error as Failed), and yields to
    busy syncs (STORAGE_YIELDS_FOR).
    """

    def __init__(self, jobs: dict[str, Callable[..., dict]], workers: int = 4,
                 on_result: Callable[[str, dict], None] | None = None, maintenance_workers: int = 1,
                 shards: int = 1, batched: Collection[str] = ()):
        self.jobs = jobs
        self.batched = frozenset(batched)
        self.pools = [ThreadPoolExecutor(workers, thread_name_prefix=f"tenantsync-sync{i}") for i in range(shards)]
        self._busy_syncs = workers * shards // 2
        self.maintenance = ThreadPoolExecutor(maintenance_workers, thread_name_prefix="tenantsync-job")
        self.on_result = on_result or (lambda job, result: None)
        self._pending: set[str] = set()
        self._dirty: set[str] = set()
        self._once: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def request_sync(self, name: str) -> bool:
        with self._lock:
            if name in self._pending:
                self._dirty.add(name)
                return False
            self._pending.add(name)
        self.pools[shard(name, len(self.pools))].submit(self._run_sync, name)
        return True

    def request_syncs(self, names) -> int:
        return sum(self.request_sync(name) for name in dict.fromkeys(names))

    def _run_sync(self, name: str) -> None:
        while True:
            self._run("sync", name)
            with self._lock:
                if name not in self._dirty:
                    self._pending.discard(name)
                    return
                self._dirty.discard(name)

    def submit(self, job: str, names, **kwargs) -> int:
        keyed = job_key(job, kwargs)
        queued = []
        with self._lock:
            for name in dict.fromkeys(names):
                if (keyed, name) not in self._once:  # else already queued or running
                    self._once.add((keyed, name))
                    queued.append(name)
        size = STORAGE_BATCH if job in self.batched else 1
        for i in range(0, len(queued), size):
            self.maintenance.submit(self._run_once, keyed, job, queued[i:i + size], kwargs)
        return len(queued)

    def _run_once(self, keyed: str, job: str, names: list[str], kwargs: dict) -> None:
        try:
            if job not in self.batched:
                self._run(job, names[0], **kwargs)
                return
            self._yield_to_syncs()
            try:
                results = self.jobs[job](names, **kwargs)
            except Exception as e:  # the whole batch: storage unreachable, the process died
                log_failure(log, f"{job} of {len(names)} tenants ({names[0]}, ...)", e)
                return
            for name, result in results.items():
                if isinstance(result, Failed):
                    log_failure(log, f"{job} {name}", result.error)
                else:
                    self.on_result(job, result)
        finally:
            with self._lock:
                self._once.difference_update((keyed, name) for name in names)

    def _yield_to_syncs(self) -> None:
        deadline = time.monotonic() + STORAGE_YIELDS_FOR
        while time.monotonic() < deadline:
            with self._lock:
                if len(self._pending) <= self._busy_syncs:
                    return
            time.sleep(0.02)

    def _run(self, job: str, name: str, **kwargs) -> None:
        try:
            result = self.jobs[job](name, **kwargs)
        except Exception as e:  # one tenant's failure must not stop the others
            log_failure(log, f"{job} {name}", e)
            return
        if isinstance(result, Failed):
            log_failure(log, f"{job} {name}", result.error)
        else:
            self.on_result(job, result)

    def idle(self) -> bool:
        with self._lock:
            return not self._pending

    def close(self) -> None:
        """Finish the syncs, and the maintenance jobs already running; the queued ones are
        dropped (the schedule offers them again after a restart): a stop during a plan round
        at 10,000 tenants would otherwise run thousands of compactions first."""
        for pool in self.pools:
            pool.shutdown(wait=True)
        self.maintenance.shutdown(wait=True, cancel_futures=True)
