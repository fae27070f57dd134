"""Where sync requests go: in-process threads (embedded) or Celery queues (fleet).

Both dispatchers keep at most one sync per tenant queued or running. A request for a
tenant that already has one marks it *dirty* instead; when the running sync ends it
runs once more if it was marked. So a hot tenant costs one job at a time, and a write
that lands during a sync is never left behind.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Protocol

from tenantsync.config import Config
from tenantsync.errors import TenantSyncError

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

    def submit(self, job: str, name: str, **kwargs) -> None:
        """Run a storage-only or maintenance job for ``name`` (compact, snapshot, retain)."""

    def close(self) -> None: ...


class InProcessDispatcher:
    """The embedded mode: the same job functions on two small thread pools.

    Syncs get their own pool: a compaction or archive of a big tenant can take seconds,
    and behind it every commit on the host would wait (replication lag is what users
    see). Maintenance jobs share ``maintenance_workers`` threads and queue among
    themselves.
    """

    def __init__(self, jobs: dict[str, Callable[..., dict]], workers: int = 4,
                 on_result: Callable[[str, dict], None] | None = None, maintenance_workers: int = 1):
        self.jobs = jobs
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="tenantsync-sync")
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
        self.pool.submit(self._run_sync, name)
        return True

    def _run_sync(self, name: str) -> None:
        while True:
            self._run("sync", name)
            with self._lock:
                if name not in self._dirty:
                    self._pending.discard(name)
                    return
                self._dirty.discard(name)

    def submit(self, job: str, name: str, **kwargs) -> None:
        key = (job_key(job, kwargs), name)
        with self._lock:
            if key in self._once:
                return  # the same job is already queued or running for this tenant
            self._once.add(key)
        self.maintenance.submit(self._run_once, key, job, name, **kwargs)

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
        self.pool.shutdown(wait=True)
        self.maintenance.shutdown(wait=True)


class StorageJobProcess:
    """The embedded mode's storage-only jobs (compact, snapshot, retain) in a child process.

    They read and write only the replica and the catalogue, and they are CPU work (decode,
    merge, encode, list). In the watcher's process they shared one interpreter lock with
    the syncs: at 10,000 tenants a round of compactions of the tenants woken in the last
    minute pushed the median commit-to-replica lag from 0.1 s to seconds. A child runs them
    on another core, niced so the replicating process wins when cores are short. The
    dispatcher's maintenance thread just waits for each result, so deduplication and
    ordering stay as they are. A child that dies is replaced at the next job.
    """

    JOBS = ("compact", "snapshot", "retain")
    NICE = 10

    def __init__(self, config: Config):
        self.config = config
        self._pool: ProcessPoolExecutor | None = None
        self._guard = threading.Lock()

    def job(self, job: str) -> Callable[..., dict]:
        def run(name: str, **kwargs) -> dict:
            pool = self._started()
            try:
                return pool.submit(_run_in_child, job, name, kwargs).result()
            except BrokenProcessPool as e:
                with self._guard:
                    if self._pool is pool:
                        self._pool = None
                raise TenantSyncError(f"{job} {name}: the storage-job process died ({e}); it restarts") from e

        return run

    def _started(self) -> ProcessPoolExecutor:
        with self._guard:
            if self._pool is None:
                # spawn, not fork: this process has threads (and their locks) by now.
                self._pool = ProcessPoolExecutor(1, multiprocessing.get_context("spawn"),
                                                 initializer=_start_child, initargs=(self.config, self.NICE))
            return self._pool

    def close(self) -> None:
        with self._guard:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


_child_fleet = None


def _start_child(config: Config, nice: int) -> None:
    global _child_fleet
    from tenantsync.fleet import Fleet

    os.nice(nice)
    _child_fleet = Fleet(config)


def _run_in_child(job: str, name: str, kwargs: dict) -> dict:
    return getattr(_child_fleet, job)(name, **kwargs)
