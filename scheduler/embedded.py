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
from typing import Callable

from tenantsync.catalogue import Catalogue, TenantState, open_catalogue
from tenantsync.config import Config
from tenantsync.errors import Unshipped
from tenantsync.fleet import STORAGE_JOBS, Fleet
from tenantsync.ondemand import OnDemand
from tenantsync.outcome import Outcome
from tenantsync.process import RELEASE_EVERY, freeze_setup
from tenantsync.serving import serve_owner

from .dispatch import InProcessDispatcher
from .job_process import JobProcess, fleet_jobs, storage_process
from .owner import OnDemandVia, ShardRoute
from .schedule import Schedule
from .watcher import Watcher

# Tenants a stop that left data unshipped names on its one line (then how many more).
SHUTDOWN_NAMES = 10


def run(config: Config, stop: threading.Event, report: Callable[[str], None] | None = None,
        on_result: Callable[[str, Outcome], None] | None = None, http: tuple[str, int] | None = None,
        processes: int | None = None) -> None:
    """Watch, replicate and schedule until ``stop``, answering the API on the fleet's control
    socket (tenantsync/control.py) and, with ``http``, over HTTP.

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
    shards = [JobProcess(f"tenantsync-shard-{i}", fleet_jobs, (config, RELEASE_EVERY), threads=config.threads_per_process())
              for i in range(1, processes)]
    for child in shards:
        child.start()
    local = OnDemand(fleet)
    local.recover()  # hydrations and archivals a killed predecessor left half done
    route = ShardRoute({"sync": fleet.sync, "hydrate": local.hydrate, "archive": local.archive}, shards)
    ondemand = OnDemandVia(local.catalogue, route)
    # A freeze (zstd at level 19) runs in the niced storage process, a process of this host,
    # so its freezing mark is undone here if that process dies.
    jobs = {"sync": functools.partial(route, "sync"), "archive": ondemand.archive,
            "hydrate": functools.partial(route, "hydrate"),  # the failover plan's
            "freeze": functools.partial(storage.run, "freeze")}
    jobs |= {job: functools.partial(storage.run, job) for job in STORAGE_JOBS}
    dispatcher = InProcessDispatcher(jobs, workers=config.threads_per_process(), on_result=on_result, shards=len(shards) + 1,
                                     batched=STORAGE_JOBS)
    stop_serving = serve_owner(ondemand, config, http, report)
    watcher = Watcher(config, catalogue, dispatcher, report=report)
    schedule = Schedule(config, catalogue, dispatcher)
    # Its own thread: behind a long compaction queue, idle tenants would stay open.
    releaser = fleet.start_releasing(RELEASE_EVERY, stop)
    freeze_setup()
    try:
        watcher.run(stop, schedule.tick, schedule.say_alive)
    finally:
        releaser.join()
        stop_serving()
        dispatcher.close()
        # Each process releases its own tenants (Fleet.shutdown), all at once: one process
        # after another, a host's stop took the sum of theirs.
        closing = [threading.Thread(target=child.close, name=f"close-{child.name}") for child in [storage, *shards]]
        for thread in closing:
            thread.start()
        fleet.shutdown()
        for thread in closing:
            thread.join()
    _check_shipped(config, catalogue)


def _check_shipped(config: Config, catalogue: Catalogue) -> None:
    """Raise Unshipped naming this host's tenants left in state error (a sync or the final
    release failed, in this process or a child): a stop that exits as if all were shipped
    hides a replica that is behind. Tenants whose file is gone have nothing left to ship."""
    failed = [r.name for r in catalogue.records(TenantState.error, host=config.host) if os.path.exists(r.path)]
    if failed:
        more = f", ... ({len(failed) - SHUTDOWN_NAMES} more)" if len(failed) > SHUTDOWN_NAMES else ""
        raise Unshipped(f"stopped with committed data not shipped for {len(failed)} tenant(s) in state error "
                        f"(`tenantsync tenants --state error` says why): {', '.join(failed[:SHUTDOWN_NAMES])}{more}")
