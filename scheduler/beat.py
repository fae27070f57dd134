"""Celery beat schedule: compaction per level, snapshots, retention (the storage plans).

Start it with ``celery -A scheduler.beat beat``. Each entry runs ``tenantsync.plan``
with one schedule key; the plan task enqueues jobs only for tenants that changed. The
host plans (catch-up, archival) run in each host's watcher (schedule.py says why).
"""

from __future__ import annotations

from .routing import config_or_exit, make_app
from .schedule import beat_schedule

_config = config_or_exit()
app = make_app(_config)
app.conf.beat_schedule = beat_schedule(_config)
