"""Per-process singletons for the tasks: one Fleet and one dispatcher per worker process.

Host-queue workers run with ``--pool threads`` so every job for the host's tenants
shares one Fleet (and its cache of active captures and leases).
"""

from __future__ import annotations

import functools
import threading

from celery.signals import task_postrun, task_prerun, worker_ready, worker_shutdown

from scheduler.queue import CeleryDispatcher
from tenantsync import logs
from tenantsync.fleet import Fleet
from tenantsync.ondemand import OnDemand
from tenantsync.process import RELEASE_EVERY, freeze_setup, prepare_process

from .app import app, config

_build_lock = threading.RLock()


def singleton(fn):
    """Build ``fn()`` once per process, even when several pool threads ask at once.

    (``functools.cache`` does not lock: the pool's first jobs each built their own Fleet,
    each with its own lease owner and captures, which then fought over the same tenants.)
    """
    built = []

    @functools.wraps(fn)
    def get():
        if not built:
            with _build_lock:
                if not built:
                    built.append(fn())
        return built[0]

    return get


@singleton
def fleet() -> Fleet:
    prepare_process()  # descriptors for thousands of open tenants, a short switch interval
    return Fleet(config)


@singleton
def dispatcher() -> CeleryDispatcher:
    cfg = fleet().config
    return CeleryDispatcher(app, cfg.host, host_workers=cfg.host_processes(embedded=False), fleet=cfg.fleet)


@singleton
def ondemand() -> OnDemand:
    """Hydration and archival jobs (tasks.py imports this): one per process, so concurrent
    hydrations of one tenant are coalesced."""
    return OnDemand(fleet())


_releasing: list = []  # (stop event, thread) of this worker's release thread


@worker_ready.connect
def _start_idle_release(**_):
    """One thread per worker (not per tenant) closes tenants that went idle."""
    stop = threading.Event()
    ondemand().recover()  # hydrations and archivals a killed predecessor left half done
    _releasing.append((stop, fleet().start_releasing(RELEASE_EVERY, stop)))
    freeze_setup()


@worker_shutdown.connect
def _release_all(**_):
    """A stopping worker (its jobs done) releases its open tenants: checkpointed, positions
    recorded, leases given up, so the worker that replaces it takes over at once, and
    writes the storage times it gathered."""
    for stop, thread in _releasing:
        stop.set()
        thread.join()
    fleet().shutdown()


_job_marks: dict[str, object] = {}


@task_prerun.connect
def _mark_job(task_id: str, **_) -> None:
    """Lines a task logs carry its Celery id (``--log-format json``), in the thread running it."""
    _job_marks[task_id] = logs.enter(job_id=task_id)


@task_postrun.connect
def _unmark_job(task_id: str, **_) -> None:
    token = _job_marks.pop(task_id, None)
    if token is not None:
        logs.leave(token)
