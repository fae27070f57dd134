"""Where fleet-mode jobs go: the Celery app's settings, its queues, and a tenant's host queue.

The watcher and the beat process send jobs; ``workers`` consumes them. Both build their app
here, so the scheduler never imports the workers (they import it: the tasks are adapters
over the scheduler's admission policy).

Settings (measured in shared/stack-notes.md): ``acks_late`` + ``reject_on_worker_lost``
so a SIGKILLed worker's task is redelivered, not lost; a short ``visibility_timeout``
with a fast unacked restore so redelivery takes seconds, not an hour (every task is
idempotent, so a duplicate is harmless); prefetch 1 so one slow tenant does not hold
others back. Task events are off until a monitor asks for them: Flower turns them on
every 5 s while it runs (its default ``--enable_events``) and then shows every job with its
tenant argument. Always on, their Redis publishes per job cost more CPU than the syncs
(docs/BENCHMARKS.md).
"""

from __future__ import annotations

from celery import Celery

from tenantsync import config as configmod
from tenantsync.tenants import shard

# Jobs for a host's queue. A freeze only touches object storage, but its catalogue mark must
# be undone by the tenant's host if its worker dies (a hydration waits on it): its host's too.
HOST_JOBS = {"tenantsync.sync", "tenantsync.archive", "tenantsync.freeze", "tenantsync.hydrate",
             "tenantsync.release_idle"}
STORAGE_QUEUE = "storage"
# Beat's plans (tenantsync.plan) have their own queue, taken by every worker that takes storage
# jobs or is started with --storage: a plan is a quick query that enqueues storage jobs, sent
# every 30 s to an idle fleet too, and the storage queue must stay empty while no storage job
# waits (a --storage worker starts its storage child when it is not; workers/storage_child.py).
PLAN_QUEUE = "plans"


def host_queue(host: str, name: str = "", host_workers: int = 1) -> str:
    """Jobs touching a host's local files go to that host's own queue; with several
    host-queue worker processes, to the one of tenant ``name`` (``host.<host>.<i>``).

    Two processes taking turns on one tenant would hand its lease back and forth, so the
    queue is chosen by ``tenants.shard``, the same in every watcher and API process.
    """
    return shard_queue(host, shard(name, host_workers), host_workers)


def shard_queue(host: str, index: int, host_workers: int) -> str:
    """The host queue of worker process ``index`` of ``host_workers``."""
    return f"host.{host}" if host_workers <= 1 else f"host.{host}.{index}"


def make_app(config: configmod.Config) -> Celery:
    from . import queue_metrics  # noqa: F401 - every message this process sends carries its send time

    broker = config.broker or "redis://127.0.0.1:6379/0"
    app = Celery("tenantsync", broker=broker, include=["workers.tasks"])
    app.conf.update(
        result_backend=broker if broker.startswith("redis") else None,
        result_expires=3600,
        # A job that ends while Redis restarts waits to store its result instead of being
        # reported as failed (its work is done).
        result_backend_always_retry=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": 120,
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
            # A worker taking several queues (``-Q host.<host>,storage`` on a small host) polls
            # them in the order given, so syncs never wait behind a backlog of compactions.
            "queue_order_strategy": "priority",
        },
        broker_connection_retry_on_startup=True,
        # A publish retries through a broker restart (Celery's default gives up in under a
        # second): about half a minute, as the admission marks' Redis calls (queue.py).
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 40, "interval_start": 0, "interval_step": 0.25,
                                   "interval_max": 1.0},
        worker_send_task_events=False,
        task_send_sent_event=False,
        task_default_queue=STORAGE_QUEUE,
        task_routes={"tenantsync.plan": {"queue": PLAN_QUEUE}},
        task_serializer="json",
        accept_content=["json"],
    )
    return app


def config_or_exit() -> configmod.Config:
    """The config an app is built from at import (``celery -A workers``, ``celery -A
    scheduler.beat``, ``python -m workers``): a bad one stops them with its one line, not a
    traceback."""
    try:
        return configmod.load()
    except configmod.ConfigError as e:
        raise SystemExit(f"tenantsync: {e}") from None
