"""Periodic decisions: which tenants need compaction, snapshots, retention, a catch-up sync,
archival or freezing.

One policy serves both modes. Storage plans (compaction per level, snapshots, retention)
only touch object storage, so in Celery mode beat runs them as the ``tenantsync.plan`` task
on any worker, for the whole fleet. Host plans (catch-up, archival) are about one host's
local files (a lagging or failed tenant can only be synced by its host, and the disk budget
of ``max-local-bytes`` is per host; freezing is the host's too, see ``host_plans``), so each
host's watcher runs them for its own tenants from its loop (:meth:`Schedule.tick`), in both
modes. Only tenants whose replica changed
since the job last ran are touched, so idle tenants cost nothing. Runs are aligned to the
wall clock like Litestream's (every 30 s at :00 and :30, …).
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timedelta, timezone

from tenantsync import layout
from tenantsync.catalogue import Catalogue, TenantState
from tenantsync.config import Config
from tenantsync.levels import aligned
from tenantsync.tenants import shard

from .dispatch import Dispatcher

log = logging.getLogger(__name__)

CATCH_UP_EVERY = timedelta(seconds=15)
CATCH_UP_AFTER = timedelta(seconds=5)
# A lagging tenant whose sync has been pending this long is requested again: its job may
# have died with a killed worker (a retry waiting out its countdown comes back only after the
# broker's visibility timeout). A duplicate of a job that was only slow finds nothing new.
STALE_PENDING = timedelta(seconds=30)
# A tenant whose last sync failed is tried again this long after (each failure restarts it).
RETRY_ERRORS_AFTER = timedelta(minutes=2)
ARCHIVE_EVERY = timedelta(minutes=1)
# How often a host says it is alive (catalogue_hosts.py), and, with failover-after, looks for
# hosts that stopped.
HEARTBEAT_EVERY = timedelta(seconds=5)
FAILOVER_EVERY = timedelta(seconds=5)
FREEZE_EVERY = timedelta(hours=1)
LOCAL_STATES = (TenantState.active, TenantState.idle)


def archive_every(config: Config) -> timedelta:
    """Check once a minute, or twice per ``archive-after`` when that is shorter."""
    return _every(config.archive_after, ARCHIVE_EVERY)


def freeze_every(config: Config) -> timedelta:
    """Check once an hour, or twice per ``cold-after`` when that is shorter."""
    return _every(config.cold_after, FREEZE_EVERY)


def _every(delays, most: timedelta) -> timedelta:
    shortest = min((after for _, after in delays), default=most)
    return max(timedelta(seconds=1), min(most, shortest / 2))


def local_bytes(path: str) -> int:
    return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))


def archival_candidates(config: Config, tenants: list, now: datetime) -> list[str]:
    """Tenants idle past their glob's ``archive-after``, then, while local tenants exceed
    ``max-local-bytes``, the least recently written of the rest (oldest first)."""
    local = [t for t in tenants if t.state in LOCAL_STATES]
    chosen = []
    for t in local:
        after = config.archive_after_for(t.path)
        last = _last_used(t)
        if after is not None and last is not None and last < now - after:
            chosen.append(t.name)
    if config.max_local_bytes:
        sizes = {t.name: local_bytes(t.path) for t in local}
        total = sum(size for name, size in sizes.items() if name not in chosen)
        epoch = datetime.min.replace(tzinfo=timezone.utc)
        for t in sorted(local, key=lambda t: _last_used(t) or epoch):
            if total <= config.max_local_bytes:
                break
            if t.name not in chosen and t.state == TenantState.idle:
                chosen.append(t.name)
                total -= sizes[t.name]
    return chosen


def freeze_candidates(config: Config, archived: list, now: datetime) -> list[str]:
    """Archived tenants whose glob's ``cold-after`` has passed since they were archived (their
    last sync: the archival's, as an archived tenant is synced no more)."""
    chosen = []
    for t in archived:
        after = config.cold_after_for(t.path)
        if after is not None and t.last_sync_at is not None and t.last_sync_at < now - after:
            chosen.append(t.name)
    return chosen


def _last_used(tenant) -> datetime | None:
    """The later of its last write and last sync. A hydration records a sync, not a write:
    counted from its old last write, a tenant the application has just asked for would be
    archived again at the next run of the plan."""
    times = [t for t in (tenant.last_write_at, tenant.last_sync_at) if t is not None]
    return max(times, default=None)


def storage_plans(config: Config) -> dict:
    """The fleet-wide plans and their intervals: ``{level: every, 9: every, "retain": every}``."""
    levels = config.levels
    every = dict(levels.intervals)
    every[layout.SNAPSHOT_LEVEL] = levels.snapshot_interval
    every["retain"] = levels.l0_retention
    return every


def _entry_name(key) -> str:
    if key == layout.SNAPSHOT_LEVEL:
        return "snapshot"
    return key if isinstance(key, str) else f"compact-level-{key}"


def beat_schedule(config: Config) -> dict:
    """The storage plans as Celery beat entries (beat.py; ``python -m workers --beat``)."""
    return {
        _entry_name(key): {"task": "tenantsync.plan", "schedule": every.total_seconds(), "args": [key]}
        for key, every in storage_plans(config).items()
    }


def failover_candidates(config: Config, catalogue: Catalogue,
                        now: datetime) -> dict[tuple[str, datetime], list[str]]:
    """The active tenants of hosts not seen for ``failover-after`` that this host hydrates,
    by dead host and when it was last seen (its death: a host that came back and died
    again is a new one, whose jobs are not held back by an earlier death's, lost with a
    killed worker and not redelivered before the broker's visibility timeout):
    the live hosts (this one among them) share them out by a stable hash of the name, so
    each is asked of one host (two asking would be safe: the hydration mark and the lease
    let one through). None while this host's own heartbeat is stale (its catalogue writes
    fail): it cannot tell who is alive. Not a tenant whose copy on this host is fenced: the
    hydration would be refused (Fenced) at every round until an operator decides on that
    copy (``tenantsync tenants`` shows it), so it waits for that decision."""
    cutoff = now - config.failover_after
    seen = catalogue.hosts_seen()
    live = sorted(host for host, at in seen.items() if at >= cutoff)
    if config.host not in live:
        return {}
    dead = [host for host, at in seen.items() if at < cutoff]
    mine = [t for t in catalogue.orphaned(dead) if live[shard(t.name, len(live))] == config.host]
    fenced_here = {copy.name for copy in catalogue.fenced(config.host)} if mine else set()
    by_death: dict[tuple[str, datetime], list[str]] = {}
    for t in mine:
        if t.name not in fenced_here:
            by_death.setdefault((t.host, seen[t.host]), []).append(t.name)
    return by_death


def host_plans(config: Config) -> dict:
    """This host's plans and their intervals: catch-up, the heartbeat, and failover,
    archival and freezing when configured. Freezing is a host plan although it only touches object storage: its mark
    must be undone by the tenant's host if its process dies (a hydration waits on it)."""
    every = {"catch-up": CATCH_UP_EVERY, "heartbeat": HEARTBEAT_EVERY}
    if config.failover_after:
        every["failover"] = FAILOVER_EVERY
    if config.archive_after or config.max_local_bytes:
        every["archive"] = archive_every(config)
    if config.cold_after:
        every["freeze"] = freeze_every(config)
    return every


class Schedule:
    """The plans in ``every`` (default: all; a Celery-mode watcher runs only its host's)."""

    def __init__(self, config: Config, catalogue: Catalogue, dispatcher: Dispatcher, every: dict | None = None):
        self.config = config
        self.catalogue = catalogue
        self.dispatcher = dispatcher
        self.every = every if every is not None else storage_plans(config) | host_plans(config)
        self._last_run: dict = {}

    def tick(self, now: datetime | None = None) -> int:
        """Run every plan whose interval boundary passed since its last run (the embedded
        runner and the fleet watcher call this; Celery beat calls :meth:`run` per plan)."""
        now = now or datetime.now(timezone.utc)
        return sum(self.run(key, now) for key, every in self.every.items() if self._due(key, every, now))

    def say_alive(self) -> None:
        """The heartbeat plan now, when this schedule has it (Watcher.run, at start)."""
        if "heartbeat" in self.every:
            self.run("heartbeat")

    def run(self, key, now: datetime | None = None) -> int:
        """Enqueue one plan's jobs now: a level number, 9 (snapshots), "retain", or a host
        plan ("catch-up", "heartbeat", "failover", "archive", "freeze").

        Only tenants that shipped within the last two intervals are touched: everything
        they wrote since the previous run is then covered (the second interval catches a
        source-level file written while the previous run listed), and tenants that write
        nothing cost nothing, however often the application reads them.
        """
        now = now or datetime.now(timezone.utc)
        self._last_run[key] = now
        if key == "catch-up":
            names = [t.name for t in self.catalogue.lagging(now, CATCH_UP_AFTER, host=self.config.host)]
            names += self.catalogue.failing(now - RETRY_ERRORS_AFTER, host=self.config.host)
            return self.dispatcher.request_syncs(names, stale_after=STALE_PENDING.total_seconds(), writes=False)
        if key == "heartbeat":
            self.catalogue.heartbeat(self.config.host, now)
            return 0
        if key == "failover":
            # Each job checks again that the host is still dead, not seen since
            # ``dead_since`` (OnDemand.hydrate): it may run after the host came back (a queue
            # behind, or redelivered after its worker was killed).
            return sum(self.dispatcher.submit("hydrate", names, failover_from=host, dead_since=seen.isoformat())
                       for (host, seen), names in failover_candidates(self.config, self.catalogue, now).items())
        if key == "archive":
            tenants = self.catalogue.records(host=self.config.host)
            return self.dispatcher.submit("archive", archival_candidates(self.config, tenants, now))
        if key == "freeze":
            archived = self.catalogue.records(TenantState.archived, host=self.config.host)
            return self.dispatcher.submit("freeze", freeze_candidates(self.config, archived, now))
        names = self.catalogue.shipped_since(now - 2 * self.every[key])
        if key == "retain":
            return self.dispatcher.submit("retain", names)
        if key == layout.SNAPSHOT_LEVEL:
            return self.dispatcher.submit("snapshot", names)
        return self.dispatcher.submit("compact", names, level=key)

    def _due(self, key, every: timedelta, now: datetime) -> bool:
        last = self._last_run.get(key)
        if last is None:
            self._last_run[key] = now  # first boundary after start, not at start
            return False
        return aligned(last, every) < aligned(now, every)
