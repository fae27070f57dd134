"""Celery beat schedule: compaction per level, snapshots, retention, catch-up checks.

Start it with ``celery -A scheduler.beat beat``. Each entry runs ``tenantsync.plan``
with one schedule key; the plan task enqueues jobs only for tenants that changed.
"""

from __future__ import annotations

from tenantsync import config as configmod
from tenantsync import layout
from workers.app import app

from .schedule import CATCH_UP_EVERY, archive_every


def beat_schedule(config: configmod.Config) -> dict:
    levels = config.levels
    entries = {
        f"compact-level-{level}": (interval, level) for level, interval in sorted(levels.intervals.items())
    }
    entries["snapshot"] = (levels.snapshot_interval, layout.SNAPSHOT_LEVEL)
    entries["retain"] = (levels.l0_retention, "retain")
    entries["catch-up"] = (CATCH_UP_EVERY, "catch-up")
    if config.archive_after or config.max_local_bytes:
        entries["archive"] = (archive_every(config), "archive")
    return {
        name: {"task": "tenantsync.plan", "schedule": every.total_seconds(), "args": [key]}
        for name, (every, key) in entries.items()
    }


app.conf.beat_schedule = beat_schedule(configmod.load())
