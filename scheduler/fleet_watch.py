"""The watcher in fleet mode: events become Celery jobs on this host's queue, and the
host plans (catch-up, archival) of this host's tenants run from its loop. Its API (the
control socket, and HTTP if asked) sends each call to the tenant's host queue worker."""

from __future__ import annotations

import threading
from typing import Callable

from tenantsync.catalogue import open_catalogue
from tenantsync.config import Config
from tenantsync.observe import CachedCheck
from tenantsync.serving import serve_owner

from .owner import OnDemandVia
from .queue import CeleryDispatcher, HostQueueRoute
from .queue_metrics import QueueCollector
from .routing import PLAN_QUEUE, STORAGE_QUEUE, make_app, shard_queue
from .schedule import Schedule, host_plans
from .watcher import Watcher


def run(config: Config, stop: threading.Event, report: Callable[[str], None] | None = None,
        http: tuple[str, int] | None = None, app=None) -> None:
    """Watch until ``stop``; ``app`` is the Celery app to send with (a worker running the
    watcher passes its own), else one is made from ``config``."""
    app = app or make_app(config)
    dispatcher = CeleryDispatcher(app, config.host, host_workers=config.host_processes(embedded=False),
                                  fleet=config.fleet)
    catalogue = open_catalogue(config)
    broker = CachedCheck(lambda: _ping_broker(app))
    workers = config.host_processes(embedded=False)
    queues = [*(shard_queue(config.host, i, workers) for i in range(workers)), STORAGE_QUEUE, PLAN_QUEUE]
    stop_serving = serve_owner(OnDemandVia(catalogue, HostQueueRoute(dispatcher, config)), config, http, report,
                               checks={"broker": broker}, collectors=(QueueCollector(app, queues),))
    try:
        schedule = Schedule(config, catalogue, dispatcher, host_plans(config))
        Watcher(config, catalogue, dispatcher, report=report).run(stop, schedule.tick, schedule.say_alive)
    finally:
        stop_serving()
        dispatcher.close()


def _ping_broker(app) -> None:  # noqa: ANN001 - the Celery app
    """Raise unless the broker accepts a connection now (one try, a few seconds at most)."""
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=3)
