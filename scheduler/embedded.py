"""The embedded default: watcher, jobs and schedules in one process, no broker.

The jobs are the same ``Fleet`` calls the Celery tasks make; only the dispatcher
differs. On stop, every active tenant is synced and released (checkpointed under the
barrier, position saved), so a restart resumes without uploading databases again.
"""

from __future__ import annotations

import threading
from typing import Callable

from tenantsync.catalogue import Catalogue
from tenantsync.config import Config
from tenantsync.fleet import Fleet
from tenantsync.ondemand import OnDemand
from tenantsync.server import serve

from .dispatch import InProcessDispatcher, StorageJobProcess
from .schedule import Schedule
from .watcher import Watcher

RELEASE_EVERY = 5.0


def run(config: Config, stop: threading.Event, report: Callable[[str], None] | None = None,
        on_result: Callable[[str, dict], None] | None = None, http: tuple[str, int] | None = None) -> None:
    """Watch, replicate and schedule until ``stop``; with ``http``, also serve the API."""
    catalogue = Catalogue(config.catalogue)
    fleet = Fleet(config, catalogue)
    ondemand = OnDemand(fleet)
    storage_jobs = StorageJobProcess(config)
    jobs = {"sync": fleet.sync, "archive": ondemand.archive} | {j: storage_jobs.job(j) for j in StorageJobProcess.JOBS}
    dispatcher = InProcessDispatcher(jobs, workers=config.workers, on_result=on_result)
    server = None
    if http is not None:
        server = serve(ondemand, *http)
        threading.Thread(target=server.serve_forever, name="tenantsync-http", daemon=True).start()
    watcher = Watcher(config, catalogue, dispatcher, report=report)
    schedule = Schedule(config, catalogue, dispatcher)
    # Its own thread: behind a long compaction queue, idle tenants would stay open.
    releaser = threading.Thread(target=fleet.release_idle_every, args=(RELEASE_EVERY, stop),
                                name="tenantsync-release-idle", daemon=True)
    releaser.start()
    try:
        watcher.run(stop, schedule.tick)
    finally:
        releaser.join()
        if server is not None:
            server.shutdown()
        dispatcher.close()
        storage_jobs.close()
        fleet.release_idle(0, keep_leases=False)  # a deploy: hand every lease over now
        fleet.close()
