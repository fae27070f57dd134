"""The workers' Celery application: built by scheduler.routing from the tenantsync config
(``celery -A workers worker`` finds it here), plus what only a consuming worker does."""

from __future__ import annotations

import logging
import os
import sys

from celery.signals import celeryd_after_setup, setup_logging

from scheduler.routing import PLAN_QUEUE, STORAGE_QUEUE, config_or_exit, make_app
from tenantsync import control, logs, metrics

_plans_with_storage = True


def storage_without_plans() -> None:
    """For a --storage worker's child: plans, sent every 30 s, would keep it from ever idling."""
    global _plans_with_storage
    _plans_with_storage = False


@celeryd_after_setup.connect
def _add_plans(sender, instance, **_) -> None:
    """A worker taking the storage queue (``python -m workers -Q storage`` or ``celery -A
    workers worker -Q …,storage``) also takes beat's plans."""
    queues = instance.app.amqp.queues
    if _plans_with_storage and STORAGE_QUEUE in queues.consume_from:
        queues.select_add(PLAN_QUEUE)


@celeryd_after_setup.connect
def _count_metrics(sender, instance, **_) -> None:
    """A worker counts its jobs and requests where the host's /metrics adds them up
    (tenantsync.metrics); Flower and beat, which import this app too, do not."""
    metrics.use_directory(control.metrics_path(config))


if os.environ.get("TENANTSYNC_LOG_FORMAT") == "json":
    @setup_logging.connect
    def _json_logs(loglevel=None, **_) -> None:  # noqa: ANN001
        """One JSON object per line, as ``tenantsync --log-format json`` (Celery's own format otherwise)."""
        logs.configure(loglevel or logging.WARNING, "json", sys.stderr)


config = config_or_exit()  # read once: the launcher and the tasks' Fleet use it too
app = make_app(config)
