"""Jobs in a child process: how the embedded mode uses more than one core.

One Python process runs its jobs under one interpreter lock. Each tenant's wake-up (open,
sync, later release) costs milliseconds of CPU, so with thousands of tenants committing one
process of syncs and releases runs out of lock while another core idles, and lag grows to
seconds (docs/BENCHMARKS.md). So the embedded mode runs the storage-only jobs in one niced child (compaction is CPU work that
must not delay syncs), and with ``host-workers: N`` the tenants of N-1 of N shards (the same
stable hash as the Celery host queues) in N-1 more children, each with its own ``Fleet``:
a tenant's open capture, read mark and lease always live in the one process of its shard.

The parent sends ``(id, job, tenant, kwargs)`` over a pipe; the child runs each on a small
thread pool and answers ``(id, ok, result or error)``. A child that dies (SIGKILL, OOM)
fails the jobs it had, and their tenants are synced again at their next write or by the
catch-up schedule; the next job starts a new child. A child ignores SIGINT and SIGTERM, so a
signal to the whole process group stops it in order: the parent stops its watcher, then
closes each child, which releases its tenants (checkpointed, positions saved, leases handed
over) and exits. If the parent dies, the child sees its pipe close and exits at once, as if
killed with it: a successor of the same host may already be syncing those tenants.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any, Callable

from tenantsync import logs
from tenantsync.catalogue import open_catalogue
from tenantsync.cold import freeze_tenant
from tenantsync.config import Config
from tenantsync.errors import TenantSyncError, WorkerDied
from tenantsync.outcome import Failed
from tenantsync.fleet import STORAGE_JOBS, Fleet
from tenantsync.ondemand import OnDemand
from tenantsync.process import freeze_setup, prepare_process

from .idle import STORAGE_IDLE_CLOSE, STORAGE_NICE, IdleClock, watch_idle

log = logging.getLogger(__name__)

# What a child's start function returns: its jobs by name, and what to run when it closes.
ChildJobs = tuple[dict[str, Callable[..., Any]], Callable[[], None]]


class JobProcess:
    """One child process running jobs; started at the first job, replaced if it dies.

    With ``idle_close``, a child that has had no job for that many seconds is closed (one
    thread per JobProcess watches): the storage-job child of an idle fleet, a whole Python
    process with its own Fleet, then costs nothing until the next compaction round, which
    starts a new one (spawning takes about a second).
    """

    def __init__(self, name: str, start: Callable[..., ChildJobs], args: tuple = (), *,
                 threads: int = 1, nice: int = 0, idle_close: float | None = None):
        self.name = name
        self._spec = (start, args, threads, nice, logging.getLogger().level)
        self._child: _Child | None = None
        self._guard = threading.Lock()
        self._clock = IdleClock()
        self._closing = threading.Event()
        if idle_close:
            watch_idle(idle_close, lambda: self._close_if_idle(idle_close), self._closing, f"{name}-idle")

    def start(self) -> None:
        """Start the child now (else at the first job): spawning takes about a second."""
        with self._guard:
            self._started()

    def run(self, job: str, tenant: str | list[str], **kwargs: Any) -> Any:
        """Run ``job`` for ``tenant`` (a batch job: for a list of them) in the child and
        return its result; its exception is raised here (a TenantSyncError if it cannot be
        sent back as it was)."""
        with self._guard:
            child = self._started()
            self._clock.begin()
        try:
            return child.call(job, tenant, kwargs)
        finally:
            self._clock.end()

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.process.pid if child is not None and child.alive else None

    def _started(self) -> _Child:
        if self._child is None or not self._child.alive:
            self._child = _Child(self.name, *self._spec)
        return self._child

    def _close_if_idle(self, idle_close: float) -> bool:
        """Close the child if it had no job for ``idle_close`` s; the watch goes on (False)."""
        with self._guard:  # a job starting now waits, then starts a new child
            child = self._child
            if child is None or not self._clock.idle_for(idle_close):
                return False
            self._child = None
        log.info("the %s process had no job for %.0f s; closing it", self.name, idle_close)
        child.close(120.0)
        return False

    def close(self, timeout: float = 120.0) -> None:
        self._closing.set()
        with self._guard:
            child, self._child = self._child, None
        if child is not None:
            child.close(timeout)


class _Child:
    def __init__(self, name: str, start: Callable[..., ChildJobs], args: tuple, threads: int, nice: int,
                 log_level: int):
        # A fresh interpreter (not fork: the parent has threads, and their locks, by now),
        # started with subprocess rather than multiprocessing's spawn, which also starts a
        # resource-tracker process this needs nothing from.
        ours, theirs = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.name = name
        bootstrap = f"from {__name__} import child_main; child_main({theirs.fileno()})"
        self.process = subprocess.Popen([sys.executable, "-c", bootstrap],
                                        pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.conn.send((name, start, args, threads, nice, log_level))
        self.alive = True
        self._pending: dict[int, Future] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        threading.Thread(target=self._read, name=f"{name}-results", daemon=True).start()

    def call(self, job: str, tenant: str | list[str], kwargs: dict) -> Any:
        future: Future = Future()
        with self._lock:
            if not self.alive:
                raise WorkerDied(f"{job}: the {self.name} process has exited; it restarts")
            i = next(self._ids)
            self._pending[i] = future
            try:
                self.conn.send((i, job, tenant, kwargs))
            except OSError:
                pass  # it died: the reader fails this job with the others
        return future.result()

    def _read(self) -> None:
        while True:
            try:
                i, ok, value = self.conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                future = self._pending.pop(i, None)
            if future is not None:
                future.set_result(value) if ok else future.set_exception(value)
        try:
            code = self.process.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        with self._lock:
            self.alive = False
            pending, self._pending = self._pending, {}
        if pending:
            log.error("the %s process died (exit code %s) with %d jobs; it restarts at the next job",
                      self.name, code, len(pending))
        for future in pending.values():
            future.set_exception(WorkerDied(f"the {self.name} process died (exit code {code}); it restarts"))

    def close(self, timeout: float) -> None:
        with self._lock:
            try:
                self.conn.send(None)
            except OSError:
                pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error("the %s process did not stop in %.0f s; killing it", self.name, timeout)
            self.process.kill()
            self.process.wait(5)
        self.conn.close()


def _portable(e: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else a TenantSyncError naming it."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - any unpicklable exception
        return TenantSyncError(f"{type(e).__name__}: {e}")


def _portable_outcome(outcome):
    """A job's outcome fit to send back: a Failed one's error made portable."""
    return replace(outcome, error=_portable(outcome.error)) if isinstance(outcome, Failed) else outcome


def _portable_result(result):
    """A job's result fit to send back: its outcome, or a batch job's ``{tenant: outcome}``."""
    if isinstance(result, dict):
        return {name: _portable_outcome(outcome) for name, outcome in result.items()}
    return _portable_outcome(result)


def child_main(fd: int) -> None:
    """The child's side: read its spec, start its jobs, answer until told to close."""
    conn = Connection(fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        name, start, args, threads, nice, log_level = conn.recv()
    except (EOFError, OSError):
        return  # the parent is gone already
    logs.configure(log_level, os.environ.get("TENANTSYNC_LOG_FORMAT", "text"), sys.stderr, {"process": name})
    if nice:
        os.nice(nice)
    try:
        jobs, close = start(*args)
    except TenantSyncError as e:  # e.g. the catalogue cannot be opened: one line, exit 1
        log.error("%s cannot start: %s", name, e)
        sys.exit(1)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="tenantsync-job")
    send_lock = threading.Lock()

    def answer(i: int, job: str, tenant: str | list[str], kwargs: dict) -> None:
        try:
            reply = (i, True, _portable_result(jobs[job](tenant, **kwargs)))
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the caller
            reply = (i, False, _portable(e))
        with send_lock:
            try:
                conn.send(reply)
            except OSError:
                pass  # the parent is gone; the loop below exits

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            # The parent died without closing us (SIGKILL, OOM). Its successor may already
            # be running as the same host, with the same tenants and lease owner: releasing
            # them now (ship, checkpoint, hand over leases) would race it, and a checkpoint
            # of ours could force it to upload whole databases again. Stop as the parent
            # did, mid-job if need be; everything here is safe to lose at any point.
            log.warning("%s: the parent process is gone; exiting without releasing", name)
            logging.shutdown()
            os._exit(0)
        if message is None:
            break
        pool.submit(answer, *message)
    pool.shutdown(wait=True)
    close()


def storage_process(config: Config) -> JobProcess:
    """The child for a syncing process's storage-only jobs (compact, snapshot, retain), each
    for a batch of tenants (admission.STORAGE_BATCH): its CPU work then neither holds the
    syncs' interpreter lock nor wins a core from them."""
    return JobProcess("tenantsync-storage", fleet_jobs, (config, None), nice=STORAGE_NICE,
                      idle_close=STORAGE_IDLE_CLOSE)


def fleet_jobs(config: Config, release_every: float | None) -> ChildJobs:
    """A child's ``Fleet``: the jobs of its shard of tenants (sync, archive, hydrate, freeze) and the
    storage-only ones, which take a batch of tenants (only the storage child is sent those).
    With ``release_every``, it releases its idle tenants itself."""
    prepare_process()
    # The parent opened (and migrated) the catalogue already: this child need not import Alembic.
    fleet = Fleet(config, open_catalogue(config, migrate=False))
    ondemand = OnDemand(fleet)
    stop = threading.Event()
    releaser = fleet.start_releasing(release_every, stop) if release_every else None
    freeze_setup()

    def close() -> None:
        stop.set()
        if releaser is not None:
            releaser.join()
        fleet.shutdown()

    jobs = {"sync": fleet.sync, "archive": ondemand.archive, "hydrate": ondemand.hydrate,
            "freeze": functools.partial(freeze_tenant, fleet),
            **{job: functools.partial(fleet.for_each, job) for job in STORAGE_JOBS}}
    return jobs, close

