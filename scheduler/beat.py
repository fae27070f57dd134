"""Celery beat schedule: compaction per level, snapshots, retention (the storage plans).

Start it with ``celery -A scheduler.beat beat``. Each entry runs ``tenantsync.plan``
with one schedule key; the plan task enqueues jobs only for tenants that changed. The
host plans (catch-up, archival) run in each host's watcher (schedule.py says why).
"""

from __future__ import annotations

from tenantsync import config as configmod
from tenantsync import layout
from workers.app import app

from .schedule import storage_plans


def _entry_name(key) -> str:
    if key == layout.SNAPSHOT_LEVEL:
        return "snapshot"
    return key if isinstance(key, str) else f"compact-level-{key}"


def beat_schedule(config: configmod.Config) -> dict:
    return {
        _entry_name(key): {"task": "tenantsync.plan", "schedule": every.total_seconds(), "args": [key]}
        for key, every in storage_plans(config).items()
    }


app.conf.beat_schedule = beat_schedule(configmod.load())
