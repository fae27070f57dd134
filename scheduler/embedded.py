"""The embedded default: watcher, jobs and schedules without a broker.

The jobs are the same ``Fleet`` calls the Celery tasks make; only the dispatcher
differs. This process watches, schedules and syncs one shard of the tenants; with
``host-workers`` N (default: one per CPU, up to 4) N-1 child processes sync the other
shards, and one niced child runs the storage-only jobs (job_process.py says why). On
stop, every active tenant is synced and released (checkpointed under the barrier,
position saved), so a restart resumes without uploading databases again; a tenant left in
state error then (its data not all shipped) makes the stop raise ``Unshipped``.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Callable, TypeVar

from tenantsync.catalogue import Catalogue, TenantState, open_catalogue
from tenantsync.config import Config
from tenantsync.errors import Unshipped
from tenantsync.fleet import Fleet, freeze_setup
from tenantsync.ondemand import OnDemand
from tenantsync.outcome import Outcome
from tenantsync.server import serve
from tenantsync.tenants import shard

from .dispatch import InProcessDispatcher
from .idle import RELEASE_EVERY
from .job_process import JobProcess, fleet_jobs, storage_process
from .schedule import Schedule
from .watcher import Watcher

STORAGE_JOBS = ("compact", "snapshot", "retain")
T = TypeVar("T")
# Tenants a stop that left data unshipped names on its one line (then how many more).
SHUTDOWN_NAMES = 10


def run(config: Config, stop: threading.Event, report: Callable[[str], None] | None = None,
        on_result: Callable[[str, Outcome], None] | None = None, http: tuple[str, int] | None = None,
        processes: int | None = None) -> None:
    """Watch, replicate and schedule until ``stop``; with ``http``, also serve the API.

    ``processes`` (default: ``host-workers`` if set, else 1) share the tenants' syncs. More
    than one only where no application connection lives in this process, as in
    ``tenantsync watch``: the watcher reads each new file's header, and closing that
    descriptor drops the POSIX locks this process's connections hold on the file; a child
    closing its own connection could then take the database as unused, checkpoint it and
    delete the ``-wal`` under the application. With one process, SQLite's in-process lock
    table still knows the application's connection.
    """
    processes = processes or config.host_workers or 1
    catalogue = open_catalogue(config)
    fleet = Fleet(config, catalogue)
    storage = storage_process(config)
    shards = [JobProcess(f"tenantsync-shard-{i}", fleet_jobs, (config, RELEASE_EVERY), threads=config.workers)
              for i in range(1, processes)]
    for child in shards:
        child.start()
    local = OnDemand(fleet)
    local.recover()  # hydrations and archivals a killed predecessor left half done
    ondemand = ShardedOnDemand(local, shards)
    jobs = {"sync": _on_shard("sync", fleet.sync, shards), "archive": ondemand.archive}
    jobs |= {job: functools.partial(storage.run, job) for job in STORAGE_JOBS}
    dispatcher = InProcessDispatcher(jobs, workers=config.workers, on_result=on_result, shards=len(shards) + 1,
                                     batched=STORAGE_JOBS)
    server = None
    if http is not None:
        server = serve(ondemand, *http)
        threading.Thread(target=server.serve_forever, name="tenantsync-http", daemon=True).start()
    watcher = Watcher(config, catalogue, dispatcher, report=report)
    schedule = Schedule(config, catalogue, dispatcher)
    # Its own thread: behind a long compaction queue, idle tenants would stay open.
    releaser = fleet.start_releasing(RELEASE_EVERY, stop)
    freeze_setup()
    try:
        watcher.run(stop, schedule.tick)
    finally:
        releaser.join()
        if server is not None:
            server.shutdown()
        dispatcher.close()
        for child in [storage, *shards]:
            child.close()
        fleet.shutdown()
    _check_shipped(config, catalogue)


def _check_shipped(config: Config, catalogue: Catalogue) -> None:
    """Raise Unshipped naming this host's tenants left in state error (a sync or the final
    release failed, in this process or a child): a stop that exits as if all were shipped
    hides a replica that is behind. Tenants whose file is gone have nothing left to ship."""
    failed = [r.name for r in catalogue.list(TenantState.error, host=config.host) if os.path.exists(r.path)]
    if failed:
        more = f", ... ({len(failed) - SHUTDOWN_NAMES} more)" if len(failed) > SHUTDOWN_NAMES else ""
        raise Unshipped(f"stopped with committed data not shipped for {len(failed)} tenant(s) in state error "
                        f"(`tenantsync tenants --state error` says why): {', '.join(failed[:SHUTDOWN_NAMES])}{more}")


def _on_shard(job: str, local: Callable[..., T], shards: list[JobProcess]) -> Callable[..., T]:
    """``job`` for a tenant in the process of its shard: here (shard 0) or a child. A
    child's exception is raised here with its type (``JobProcess.run``)."""
    def run_job(name: str, **kwargs) -> T:
        i = shard(name, len(shards) + 1)
        return local(name, **kwargs) if i == 0 else shards[i - 1].run(job, name, **kwargs)

    return run_job


class ShardedOnDemand:
    """``OnDemand``'s interface for the HTTP API (``hydrate``, ``archive``, ``catalogue``),
    each call run in the process of the tenant's shard, here or in a child.

    That process holds the tenant's open capture (descriptors, read mark, lease): an
    archival there releases it first and then finds only other programs' handles, where
    one run here found the child's and refused ("open by pid N", N our own child); and its
    tenant lock keeps that process's syncs out of a hydration or fork. Errors keep their
    type across the pipe, so the server answers as with one process. A fork is routed by
    the new tenant, whose process will sync it.
    """

    def __init__(self, local: OnDemand, shards: list[JobProcess]):
        self.catalogue = local.catalogue
        self.hydrate = _on_shard("hydrate", local.hydrate, shards)
        self.archive = _on_shard("archive", local.archive, shards)
