"""The watcher: finds tenant databases and turns their WAL writes into sync requests.

It decides *what* to sync and *when*; the work happens in jobs. inotify reports a
tenant's ``-wal`` writes (``tenantsync/file_events.py``: one-shot watches, so a busy tenant costs
one event per batch, not one per write); a slow rescan of the globs catches anything an
event missed (and re-arms any WAL watch that was lost, syncing its tenant). Files that are
not SQLite, symbolic links, and names that would escape the replica prefix, are reported
once and skipped.

A database out of WAL mode never writes its ``-wal``, so it would never be shipped again:
a file created or moved over a tenant's path, and a tenant's rollback journal coming or
going, request its sync (which ships it and switches it back to WAL, or marks it error);
the rescan catches the rest by the main file's stat (see :meth:`Watcher._changed`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import datetime, timezone
from typing import Callable

from tenantsync import tenants
from tenantsync.catalogue import Catalogue
from tenantsync.config import Config
from tenantsync.errors import BrokerUnavailable, CatalogueUnavailable, TenantSyncError
from tenantsync.file_events import STOP_CHECK, Change, FileEvents
from tenantsync.continuity import may_have_news
from tenantsync.position import DBStat, Position
from tenantsync.tenants import SQLITE_MAGIC

from .dispatch import Dispatcher

log = logging.getLogger(__name__)

# Seconds before a rescan that the catalogue did not answer is tried again.
CATALOGUE_RETRY = 1.0
# A tenant's first sync request from this process, or after its WAL watch was lost, admits
# a sync pending for longer than this: the job may have died with a killed worker.
FRESH_STALE = 1.0
# Side files an application's write changes: the WAL, or in a database out of WAL mode
# (journal_mode=DELETE) the rollback journal, created and deleted around each write.
WRITE_SUFFIXES = ("-wal", "-journal")


class Watcher:
    def __init__(self, config: Config, catalogue: Catalogue, dispatcher: Dispatcher,
                 report: Callable[[str], None] | None = None):
        self.config = config
        self.catalogue = catalogue
        self.dispatcher = dispatcher
        self.patterns = tenants.patterns(config.globs)
        self.report = report or (lambda line: log.warning("%s", line))
        self.known: dict[str, str] = {}  # path -> tenant name
        self._reported: set[str] = set()
        # Main-file stat of each known tenant at the last rescan (see :meth:`_changed`).
        self._stats: dict[str, DBStat | None] = {}
        self._last_rescan = 0.0
        self._events: FileEvents | None = None
        # Writes seen while the catalogue did not answer, not recorded yet: name -> the
        # times of the first and of the last of them.
        self._unrecorded: dict[str, tuple[datetime, datetime]] = {}
        # Syncs requested while the broker did not take them, to ask for again.
        self._unsent: set[str] = set()
        self._down: TenantSyncError | None = None

    def rescan(self) -> list[str]:
        """Register every matching database; request a first sync for new ones."""
        if self._unrecorded:
            self._record_writes(set(), datetime.now(timezone.utc))
        self._request(set())
        found, problems = tenants.scan(self.patterns)
        for path, problem in problems.items():
            self._report_once(path, f"skipping {path}: {problem}")
        fresh = []
        for name, path in found.items():
            if self.known.get(path) == name:
                continue
            problem = _not_sqlite(path)
            if problem == "empty":
                continue  # not written yet; the first write's event brings it back
            if problem:
                self._report_once(path, f"skipping {path}: {problem}")
                continue
            fresh.append((name, path))
        if fresh:
            self.catalogue.discover_many(fresh, self.config.host)
            for name, path in fresh:
                self.known[path] = name
                if self._events is not None:
                    self._events.arm(path + "-wal")
            self._request_unevented(fresh)
        gone = set(self.known) - set(found.values())
        for path in gone:
            log.info("tenant %s: %s disappeared", self.known[path], path)
            del self.known[path]
        changed = self._changed()
        if changed:
            log.info("%d tenants' files changed outside the WAL (%s, ...): synced", len(changed), changed[0])
            self._request(set(changed))
            self._record_writes(set(changed), datetime.now(timezone.utc))
        # Local copies of tenants that moved to another host (a failover while this one was
        # gone) are fenced by a sync here. The one requested at start can be lost (a Redis
        # restart), and no plan asks for another host's row: so each rescan asks, until then.
        unfenced = self.catalogue.unfenced_elsewhere(self.known.values(), self.config.host)
        if unfenced:
            self._request(unfenced, stale_after=FRESH_STALE)
        if self._events is not None:
            # Armed first, then looked at: a write after this shows as an event. An empty WAL
            # holds no commit: usually one a sync job of ours just opened, its directory event
            # not read yet (a start of thousands of tenants); synced, each would be a second,
            # empty pass.
            lost = [wal for wal in self._events.rearm_missing([path + "-wal" for path in self.known])
                    if _has_frames(wal)]
            if lost:
                log.warning("%d tenants' WALs were not watched (%s, ...): watched again, and synced",
                            len(lost), lost[0])
                self._request_unevented([(self.known[wal[: -len("-wal")]], wal[: -len("-wal")]) for wal in lost])
        self._last_rescan = time.monotonic()
        return [name for name, _ in fresh]

    def handle(self, changes) -> None:
        """Map one batch of file events to sync requests (one per tenant per batch).

        A *modified* ``-wal`` is a write: commits append to it. Opening and closing
        connections adds and deletes the ``-wal`` and checkpoints modify the main file;
        our own jobs do both, and counting them as writes would wake idle tenants forever.
        Our jobs never make a rollback journal nor create a tenant's file, so those are
        writes too (a database out of WAL mode, or replaced).
        """
        touched: set[str] = set()
        rescan = False
        for change, path in changes:
            if path.endswith("-journal"):
                name = self.known.get(path[: -len("-journal")])
                if name is not None:
                    touched.add(name)
            elif path.endswith("-wal"):
                name = self.known.get(path[: -len("-wal")])
                # An *added* -wal is a write too unless it is empty: after the last
                # connection closes SQLite deletes the WAL and the next commit recreates it
                # (reported as added only; if that connection closed again within the
                # debounce, the file is gone and the commit is in the main file). An empty
                # one is only a connection opening, such as every sync job's own: counting
                # those would sync each tenant twice.
                if name is not None and (change == Change.modified
                                         or change == Change.added and _has_frames(path)):
                    touched.add(name)
            elif tenants.is_side_file(path) or not any(p.matches(path) for p in self.patterns):
                continue
            elif path not in self.known or change == Change.deleted:
                rescan = True
            elif change == Change.added:
                # Created or moved over a known tenant: a replacement, perhaps not in WAL
                # mode, whose writes would never show in a -wal. Its sync ships it whole.
                touched.add(self.known[path])
        now = datetime.now(timezone.utc)
        try:
            self._request(touched)
        finally:  # after the requests, in one transaction (the jobs need not wait for this)
            self._record_writes(touched, now)
        if rescan:
            self.rescan()

    def _request(self, names: set[str], stale_after: float | None = None) -> None:
        """``request_syncs`` (``stale_after``: see ``AdmittingDispatcher.request_syncs``);
        while the broker does not take them, the names are kept and asked for again with
        the next request that gets through (the rescan within CATALOGUE_RETRY asks for them
        if no event comes)."""
        self._unsent |= names
        if self._unsent:
            self.dispatcher.request_syncs(sorted(self._unsent), stale_after=stale_after)
            self._unsent.clear()

    def _record_writes(self, names: set[str], at: datetime) -> None:
        """``record_writes``; while the catalogue does not answer, the names are kept (with
        their first and last writes' times) and recorded with the next batch that gets
        through, so the catalogue shows them behind, as they are. The last time matters:
        a pass that started between the first and the last write did not ship the last,
        and the catch-up plan, which finds a sync lost with a killed worker, goes by it."""
        for name in names:
            first, _ = self._unrecorded.get(name, (at, at))
            self._unrecorded[name] = (first, at)
        by_times: dict[tuple[datetime, datetime], list[str]] = {}
        for name, times in self._unrecorded.items():
            by_times.setdefault(times, []).append(name)
        for (first, last), batch in sorted(by_times.items()):
            self.catalogue.record_writes(batch, last, self.config.host, since=first)
            for name in batch:
                del self._unrecorded[name]

    def run(self, stop: threading.Event, tick: Callable[[], None] | None = None,
            alive: Callable[[], None] | None = None) -> None:
        """Watch until ``stop`` is set; ``tick`` (the schedules) runs about once a second on a
        thread of its own: a plan round at 10,000 tenants (a catalogue query and thousands of
        job submissions, three plans at once on a 5-minute boundary) held this loop, and every
        commit waiting for its event to be read, for a few tenths of a second.

        ``alive`` (the host's heartbeat) runs once before the first rescan: the syncs that
        rescan asks for make this host's tenants active again, and until the host says it is
        alive, a host that was away longer than ``failover-after`` still looks dead to the
        others, whose failover plan hydrates the active tenants of dead hosts."""
        roots: dict[str, int] = {}
        for p in self.patterns:
            depth = os.path.relpath(p.glob, p.base).count(os.sep)
            roots[p.base] = max(depth, roots.get(p.base, 0))
        self._events = FileEvents(roots)
        done = threading.Event()  # set when this loop ends, by ``stop`` or by an error
        planner = None
        if tick is not None:
            planner = threading.Thread(target=_tick_every_second, args=(tick, done), name="tenantsync-plans",
                                       daemon=True)
        try:
            if alive is not None:
                self._survive(alive)
            self._survive(self.rescan)
            if planner is not None:
                planner.start()
            debounce = self.config.debounce.total_seconds()
            while not stop.is_set():
                # Short waits, so that ``stop`` is seen promptly.
                changes = self._events.read(STOP_CHECK, debounce)
                changes = {c for c in changes if self._interesting(*c)}
                if changes:
                    self._survive(self.handle, changes)
                if time.monotonic() - self._last_rescan > self.config.rescan_interval.total_seconds():
                    self._survive(self.rescan)
        finally:
            done.set()
            if planner is not None and planner.is_alive():
                planner.join()
            self._events.close()
            self._events = None

    def _survive(self, step: Callable, *args) -> None:
        """Run one step of the loop through a catalogue or broker outage: syncs the broker
        did not take are kept (``_request``), as are writes the catalogue could not record
        (``_record_writes``), and a rescan (which sends and records them) runs within
        CATALOGUE_RETRY seconds. Said once when one stops answering and once when all
        answer again."""
        try:
            step(*args)
        except (CatalogueUnavailable, BrokerUnavailable) as e:
            if self._down is None:
                log.error("%s; the watcher goes on, and retries", e)
            self._down = e
            self._last_rescan = time.monotonic() - self.config.rescan_interval.total_seconds() + CATALOGUE_RETRY
            return
        if self._down is not None:
            log.warning("the %s answers again", "catalogue" if isinstance(self._down, CatalogueUnavailable) else "broker")
            self._down = None

    def _request_unevented(self, tenants_: list[tuple[str, str]]) -> None:
        """Sync ``(name, path)`` tenants whose writes may have sent no event: new to this
        process (all of them when it starts: the watcher or its host was killed), or whose
        WAL was not watched. Only those whose files may hold a commit past the catalogue's
        position (``may_have_news``: what a pass would find) or that never shipped are
        synced, so a restart of a host whose thousands of tenants were stopped cleanly costs
        a WAL header each, not a pass each, before new writes are shipped again. (A local
        copy of a tenant now on another host is asked for by every rescan until fenced.)

        The request takes over a pending mark older than FRESH_STALE: one left from before
        (a job lost with a killed worker, until the broker redelivers it) must not swallow
        it. Those with news are also recorded as written, so the catch-up plan asks again if
        this sync's job is lost too; the time is taken before the request, so the pass it
        starts clears the record. One catalogue query, and a WAL header and one frame header
        a tenant."""
        now = datetime.now(timezone.utc)
        try:
            positions = self.catalogue.positions(name for name, _ in tenants_)
        except CatalogueUnavailable:
            # Which have news cannot be told: all are synced, as the rescan will not ask again.
            self._request({name for name, _ in tenants_}, stale_after=FRESH_STALE)
            raise
        news = {name for name, path in tenants_ if name in positions
                and (positions[name] is None
                     or may_have_news(Position.from_dict(positions[name]), path + "-wal", path))}
        self._request(news, stale_after=FRESH_STALE)
        self._record_writes(news, now)

    def _changed(self) -> list[str]:
        """Known tenants whose main file changed since the last rescan in a way no sync
        of ours explains: its stat is not the one their capture recorded after its own
        checkpoint (an idle release, a full backfill). Each stat is kept for the next rescan.

        Catches what events cannot show: a database rewritten in place or taken out of WAL
        mode (journal_mode=TRUNCATE or PERSIST keep their journal, so no name event comes),
        or an event lost. One stat per tenant and one catalogue query for those changed:
        nothing is opened, since closing a descriptor of a database would drop the POSIX
        locks this process's SQLite connections (the jobs' captures) hold on it.
        """
        stats = {path: DBStat.of(path) for path in self.known}
        differ = {self.known[path]: stat for path, stat in stats.items()
                 if path in self._stats and stat != self._stats[path]}
        self._stats = stats
        if not differ:
            return []
        recorded = self.catalogue.positions(differ)
        return sorted(name for name, stat in differ.items()
                      if name in recorded and _recorded_stat(recorded[name]) != stat)

    def _interesting(self, change, path: str) -> bool:
        if path.endswith(WRITE_SUFFIXES):
            return True
        return not tenants.is_side_file(path) and any(p.matches(path) for p in self.patterns)

    def _report_once(self, path: str, line: str) -> None:
        if path not in self._reported:
            self._reported.add(path)
            self.report(line)


def _tick_every_second(tick: Callable[[], None], done: threading.Event) -> None:
    """Run ``tick`` once a second until ``done``. A failing round is logged (one line for a
    known error, such as an unreachable catalogue) and the next one runs: the plans must not
    stop for one error."""
    while not done.wait(1.0):
        try:
            tick()
        except TenantSyncError as e:
            log.error("a scheduled plan failed: %s", e)
        except Exception:  # noqa: BLE001 - a bug: its traceback, and the schedules go on
            log.exception("a scheduled plan failed")


def _recorded_stat(position: dict | None) -> DBStat | None:
    """The main file's stat a stored position records, if any."""
    stat = (position or {}).get("db_stat")
    return DBStat(**stat) if stat else None


def _has_frames(wal_path: str) -> bool:
    """False only for an empty -wal. One already gone again (created and deleted within
    the debounce) may have held a commit: the sync's cheap has_news check will tell."""
    try:
        return os.path.getsize(wal_path) > 0
    except OSError:
        return True


def _not_sqlite(path: str) -> str | None:
    """Why ``path`` cannot be a tenant database, or None.

    Closing a descriptor drops this process's POSIX locks on that inode, and in embedded
    mode the jobs share this process. This only runs for paths not yet known, and a
    Capture exists only for known paths, so no SQLite connection of ours is on the inode.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except OSError as e:
        return f"cannot read: {e.strerror}"
    if not head:
        return "empty"
    if head != SQLITE_MAGIC:
        return "not a SQLite database"
    return None

