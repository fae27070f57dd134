"""Where sync requests go: in-process threads (embedded) or Celery queues (fleet).

Both dispatchers keep at most one sync per tenant queued or running. A request for a
tenant that already has one marks it *dirty* instead; when the running sync ends it
runs once more if it was marked. So a hot tenant costs one job at a time, and a write
that lands during a sync is never left behind.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Protocol

from tenantsync.errors import TenantSyncError
from tenantsync.tenants import shard

log = logging.getLogger(__name__)


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
    queue among themselves.
    """

    def __init__(self, jobs: dict[str, Callable[..., dict]], workers: int = 4,
                 on_result: Callable[[str, dict], None] | None = None, maintenance_workers: int = 1,
                 shards: int = 1):
        self.jobs = jobs
        self.pools = [ThreadPoolExecutor(workers, thread_name_prefix=f"tenantsync-sync{i}") for i in range(shards)]
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
        queued = 0
        for name in dict.fromkeys(names):
            key = (job_key(job, kwargs), name)
            with self._lock:
                if key in self._once:
                    continue  # the same job is already queued or running for this tenant
                self._once.add(key)
            self.maintenance.submit(self._run_once, key, job, name, **kwargs)
            queued += 1
        return queued

    def _run_once(self, key: tuple[str, str], job: str, name: str, **kwargs) -> None:
        try:
            self._run(job, name, **kwargs)
        finally:
            with self._lock:
                self._once.discard(key)

    def _run(self, job: str, name: str, **kwargs) -> None:
        try:
            self.on_result(job, self.jobs[job](name, **kwargs))
        except Exception as e:  # one tenant's failure must not stop the others
            log.error("%s %s failed: %s", job, name, e, exc_info=not isinstance(e, TenantSyncError))

    def idle(self) -> bool:
        with self._lock:
            return not self._pending

    def close(self) -> None:
        for pool in self.pools:
            pool.shutdown(wait=True)
        self.maintenance.shutdown(wait=True)
