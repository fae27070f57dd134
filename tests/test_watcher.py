"""Which file events the watcher turns into sync requests (Watcher.handle), and its plans' thread."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time

import pytest

from scheduler.watcher import Watcher
from tenantsync.catalogue import TenantState, open_catalogue
from tenantsync.config import Config
from tenantsync.errors import TenantSyncError
from tenantsync.file_events import Change

from .dbutil import app_db, write_rows


class Recorder:
    """A dispatcher that only records what was asked of it."""

    def __init__(self):
        self.syncs: list[str] = []

    def request_syncs(self, names, stale_after=None) -> int:
        names = list(names)
        self.syncs.extend(names)
        return len(names)

    def submit(self, job: str, names, **kwargs) -> int:
        raise AssertionError("the watcher only requests syncs")

    def close(self) -> None:
        pass


@pytest.fixture
def watcher(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.db", "b.db"):
        write_rows(app_db(str(data / name)), 3)
    config = Config(replica=f"file://{tmp_path}/replica", globs=(f"{data}/*.db",),
                    catalogue=f"sqlite:///{tmp_path}/catalogue.db", host="h")
    catalogue = open_catalogue(config)
    w = Watcher(config, catalogue, Recorder(), report=lambda line: None)
    assert sorted(w.rescan()) == ["a.db", "b.db"]
    w.dispatcher.syncs.clear()
    yield w, data, catalogue
    catalogue.close()


def test_a_modified_wal_is_a_write_and_is_recorded(watcher):
    w, data, catalogue = watcher
    found = {name: catalogue.get(name).last_write_at for name in ("a.db", "b.db")}  # never shipped: written
    w.handle({(Change.modified, f"{data}/a.db-wal")})
    assert w.dispatcher.syncs == ["a.db"]
    assert catalogue.get("a.db").last_write_at > found["a.db"]
    assert catalogue.get("b.db").last_write_at == found["b.db"]


def test_an_added_wal_is_a_write_unless_empty(watcher):
    w, data, _ = watcher
    empty = data / "a.db-wal"
    empty.unlink(missing_ok=True)
    empty.touch()  # a connection opened (every sync job's own does this): no frames
    w.handle({(Change.added, str(empty))})
    assert w.dispatcher.syncs == []

    with open(empty, "wb") as f:  # the first commit after the WAL had been deleted
        f.write(b"\0" * 32)
    w.handle({(Change.added, str(empty))})
    assert w.dispatcher.syncs == ["a.db"]


def test_an_added_wal_already_gone_may_have_been_a_commit(watcher):
    """A connection that committed and closed within the debounce: its -wal was created
    and deleted again, and the commit is now in the main file."""
    w, data, _ = watcher
    gone = f"{data}/b.db-wal"
    if os.path.exists(gone):
        os.unlink(gone)
    w.handle({(Change.added, gone)})
    assert w.dispatcher.syncs == ["b.db"]


def test_main_file_changes_and_deleted_wals_are_not_writes(watcher):
    w, data, _ = watcher
    w.handle({(Change.modified, f"{data}/a.db"), (Change.deleted, f"{data}/a.db-wal"),
              (Change.modified, f"{data}/a.db-shm")})
    assert w.dispatcher.syncs == []


def test_a_starting_watcher_says_its_host_is_alive_before_it_asks_for_any_sync(watcher):
    """A host back after longer than failover-after looks dead to the others until its
    heartbeat; the syncs its first rescan asks for make its tenants active, and the failover
    plan hydrates the active tenants of dead hosts elsewhere. So the heartbeat comes first."""
    _, _, catalogue = watcher
    w = Watcher(watcher[0].config, catalogue, Recorder(), report=lambda line: None)
    stop, order = threading.Event(), []

    def alive():
        order.append(("alive", list(w.dispatcher.syncs)))

    runner = threading.Thread(target=w.run, args=(stop, None, alive))
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while len(w.dispatcher.syncs) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        runner.join(10)
    assert order == [("alive", [])] and sorted(w.dispatcher.syncs) == ["a.db", "b.db"]


def test_writes_are_requested_while_a_plan_round_runs_and_a_failing_round_does_not_stop_the_plans(watcher, caplog):
    """The schedules run on their own thread: a long plan round (thousands of submissions at
    10,000 tenants) does not hold the event loop, and one that fails is logged, not fatal: a
    known error in one line, a bug with its traceback."""
    w, data, _ = watcher
    stop, release = threading.Event(), threading.Event()
    rounds = []

    def tick():
        rounds.append(time.monotonic())
        if len(rounds) == 1:
            raise TenantSyncError("catalogue: database is locked")
        if len(rounds) == 2:
            raise RuntimeError("a bug")
        release.wait(30)  # the third round is long

    caplog.set_level(logging.ERROR, logger="scheduler.watcher")
    runner = threading.Thread(target=w.run, args=(stop, tick))
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while len(rounds) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(rounds) == 3  # two rounds failed; the plans went on
        write_rows(app_db(str(data / "b.db")), 1)  # while the second round runs
        deadline = time.monotonic() + 5
        while "b.db" not in w.dispatcher.syncs and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "b.db" in w.dispatcher.syncs
    finally:
        release.set()
        stop.set()
        runner.join(10)
    assert not runner.is_alive()
    failures = [(r.getMessage(), r.exc_info is not None) for r in caplog.records]
    assert failures == [("a scheduled plan failed: catalogue: database is locked", False),
                        ("a scheduled plan failed", True)]


def test_the_rescan_watches_and_syncs_a_tenant_whose_wal_watch_was_lost(watcher, caplog):
    from tenantsync.file_events import FileEvents

    w, data, _catalogue = watcher
    conn = app_db(str(data / "a.db"))  # keeps a.db's WAL; b.db has none
    write_rows(conn, 1)
    # b.db's connection only reads: its WAL is empty, as a sync job's own is when the job has
    # just opened the tenant (and its directory event is not read yet): nothing to ship.
    reader = app_db(str(data / "b.db"))
    reader.execute("SELECT count(*) FROM sqlite_master").fetchall()
    assert os.path.getsize(data / "b.db-wal") == 0
    w._events = FileEvents({str(data): 0})  # neither WAL armed: as if their watches were lost
    try:
        with caplog.at_level(logging.WARNING, logger="scheduler.watcher"):
            w.rescan()
        assert w.dispatcher.syncs == ["a.db"]
        assert "1 tenants' WALs were not watched" in caplog.text
        w.dispatcher.syncs.clear()
        w.rescan()
        assert w.dispatcher.syncs == []  # watched again: nothing more to do
        write_rows(conn, 1)
        write_rows(reader, 1)
        assert w._events.read(1, 0.1) == {(Change.modified, f"{data}/a.db-wal"), (Change.modified, f"{data}/b.db-wal")}
    finally:
        w._events.close()
        w._events = None
        conn.close()
        reader.close()


def test_a_file_moved_over_a_tenant_and_a_rollback_journal_are_writes(watcher):
    """Neither shows in a -wal: a replacement (perhaps not in WAL mode), and the journal a
    database out of WAL mode creates and deletes around each write."""
    w, data, catalogue = watcher
    w.handle({(Change.added, f"{data}/a.db")})
    assert w.dispatcher.syncs == ["a.db"]
    w.handle({(Change.added, f"{data}/b.db-journal"), (Change.deleted, f"{data}/b.db-journal")})
    assert w.dispatcher.syncs == ["a.db", "b.db"]
    assert catalogue.get("b.db").last_write_at is not None
    w.handle({(Change.added, f"{data}/other.db-journal")})  # not a tenant
    assert w.dispatcher.syncs == ["a.db", "b.db"]


def test_the_rescan_syncs_a_tenant_whose_main_file_changed_unless_its_capture_recorded_that(watcher):
    """The rescan compares each tenant's main-file stat with the previous one; a change is
    explained when the stored position records the new stat (our own checkpoint did it)."""
    from tenantsync.position import DBStat, Position

    w, data, catalogue = watcher
    for name in ("a.db", "b.db"):
        conn = sqlite3.connect(data / name, isolation_level=None)
        conn.execute("PRAGMA journal_mode=DELETE")  # writes the header: the main file changes
        write_rows(conn, 1)
        conn.close()
    position = Position(txid=1, page_size=4096, commit=2, backfilled=True, db_stat=DBStat.of(str(data / "b.db")))
    catalogue.record_sync("b.db", txid=1, position=position.to_dict(), at=None, state=TenantState.idle)
    w.rescan()
    assert w.dispatcher.syncs == ["a.db"]
    assert catalogue.get("a.db").last_write_at is not None
    w.rescan()  # nothing changed since
    assert w.dispatcher.syncs == ["a.db"]


def test_syncs_the_broker_did_not_take_are_asked_for_again_and_the_writes_recorded(watcher, caplog):
    """The broker refuses a batch (Redis restarting): the watcher goes on, records the
    writes, and asks for those syncs again with the next request that gets through."""
    from tenantsync.errors import BrokerUnavailable

    w, data, catalogue = watcher
    asked, refuse = [], [True]

    def request_syncs(names, stale_after=None):
        if refuse.pop() if refuse else False:
            raise BrokerUnavailable("broker: the job was not sent: Error 111")
        asked.extend(names)
        return len(list(names))

    w.dispatcher.request_syncs = request_syncs
    w._survive(w.handle, {(Change.modified, f"{data}/a.db-wal")})
    assert asked == [] and catalogue.get("a.db").last_write_at is not None
    w._survive(w.handle, {(Change.modified, f"{data}/b.db-wal")})
    assert sorted(asked) == ["a.db", "b.db"]
    logged = [r.getMessage() for r in caplog.records if r.name == "scheduler.watcher"]
    assert any("the watcher goes on" in m for m in logged) and "the broker answers again" in logged


def test_a_watchers_first_requests_admit_a_sync_left_pending_from_before_it_started(tmp_path):
    """A watcher (re)started after its host's processes were killed: a pending mark a lost
    job left must not swallow its first sync of each tenant (its commits made while it was
    down have no file event), so those requests take over marks older than FRESH_STALE;
    later ones from file events do not."""
    from scheduler.watcher import FRESH_STALE

    data = tmp_path / "data"
    data.mkdir()
    write_rows(app_db(str(data / "a.db")), 3)
    config = Config(replica=f"file://{tmp_path}/replica", globs=(f"{data}/*.db",),
                    catalogue=f"sqlite:///{tmp_path}/catalogue.db", host="h")
    asked = []

    class Stale(Recorder):
        def request_syncs(self, names, stale_after=None):
            asked.append((sorted(names), stale_after))
            return len(asked[-1][0])

    catalogue = open_catalogue(config)
    w = Watcher(config, catalogue, Stale(), report=lambda line: None)
    w.rescan()
    w.handle({(Change.modified, f"{data}/a.db-wal")})
    assert asked == [(["a.db"], FRESH_STALE), (["a.db"], None)]
    catalogue.close()


def test_writes_seen_in_a_catalogue_outage_are_recorded_with_the_last_ones_time(watcher, monkeypatch):
    """Two writes while the catalogue does not answer the watcher, and between them a pass
    that recorded the tenant shipped: the second write must leave it pending, or the
    catch-up plan never asks again for a sync lost with a killed worker, and the replica
    stays behind while the catalogue says it shipped."""
    from datetime import datetime, timezone

    from tenantsync.errors import CatalogueUnavailable

    w, data, catalogue = watcher
    record, down = catalogue.record_writes, [True]

    def record_writes(*args, **kwargs):
        if down[0]:
            raise CatalogueUnavailable("catalogue: connection refused")
        return record(*args, **kwargs)

    monkeypatch.setattr(catalogue, "record_writes", record_writes)
    w._survive(w.handle, {(Change.modified, f"{data}/a.db-wal")})
    passed = datetime.now(timezone.utc)
    catalogue.record_caught_up("a.db", passed)  # a pass started after the first write
    time.sleep(0.002)
    w._survive(w.handle, {(Change.modified, f"{data}/a.db-wal")})  # the second write, after that pass
    down[0] = False
    w._survive(w.handle, set())
    row = catalogue.get("a.db")
    assert row.last_write_at > passed and row.pending_since is not None
    assert row.pending_since < passed, "pending since the first write not recorded"


def test_a_starting_watcher_syncs_and_records_only_the_tenants_written_while_none_ran(tmp_path):
    """A commit made while no watcher ran (it was killed, or its host) sent no event: the
    new watcher syncs the tenants whose files may hold a commit past the catalogue's
    position (in the WAL, or in a main file rewritten outside it) or that never shipped,
    and records them as written, so the catch-up plan asks again if that sync's job is
    lost with a killed worker. A tenant with nothing new is neither synced nor marked: a
    restart of thousands of clean tenants must not queue a pass for each ahead of their
    next writes."""
    from tenantsync.fleet import Fleet

    data = tmp_path / "data"
    data.mkdir()
    config = Config(replica=f"file://{tmp_path}/replica", globs=(f"{data}/*.db",),
                    catalogue=f"sqlite:///{tmp_path}/catalogue.db", host="h")
    catalogue = open_catalogue(config)
    conns = {name: app_db(str(data / name)) for name in ("a.db", "b.db", "c.db", "d.db")}
    for conn in conns.values():
        write_rows(conn, 3)
    shipped = ("a.db", "b.db", "d.db")
    catalogue.discover_many([(name, str(data / name)) for name in shipped], "h")
    fleet = Fleet(config, catalogue)
    try:
        for name in shipped:
            assert fleet.sync(name).txid == 1
    finally:
        fleet.close()
    # While no watcher runs: a commit in a's WAL, and d taken out of WAL mode and written
    # (its -wal is gone, the commit is in the main file only).
    write_rows(conns["a.db"], 1)
    conns["d.db"].execute("PRAGMA journal_mode=DELETE")
    write_rows(conns["d.db"], 1)
    assert not os.path.exists(data / "d.db-wal")
    w = Watcher(config, catalogue, Recorder(), report=lambda line: None)
    assert sorted(w.rescan()) == ["a.db", "b.db", "c.db", "d.db"]
    assert sorted(w.dispatcher.syncs) == ["a.db", "c.db", "d.db"]
    assert catalogue.get("a.db").pending_since is not None
    assert catalogue.get("c.db").pending_since is not None, "never shipped"
    assert catalogue.get("d.db").pending_since is not None
    assert catalogue.get("b.db").pending_since is None
    for conn in conns.values():
        conn.close()
    catalogue.close()


def test_a_starting_watcher_that_cannot_read_the_catalogue_syncs_every_new_tenant(tmp_path, monkeypatch):
    """Which tenants have news needs the catalogue's positions: without them every tenant
    new to the watcher is synced, since no later rescan asks for a tenant it knows."""
    from tenantsync.errors import CatalogueUnavailable

    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.db", "b.db"):
        conn = app_db(str(data / name))
        write_rows(conn, 1)
        conn.close()
    config = Config(replica=f"file://{tmp_path}/replica", globs=(f"{data}/*.db",),
                    catalogue=f"sqlite:///{tmp_path}/catalogue.db", host="h")
    catalogue = open_catalogue(config)

    def refused(names):
        raise CatalogueUnavailable("catalogue: connection refused")

    monkeypatch.setattr(catalogue, "positions", refused)
    w = Watcher(config, catalogue, Recorder(), report=lambda line: None)
    with pytest.raises(CatalogueUnavailable):
        w.rescan()
    assert sorted(w.dispatcher.syncs) == ["a.db", "b.db"]
    catalogue.close()


def test_each_rescan_asks_for_a_local_copy_of_a_tenant_moved_elsewhere_until_it_is_fenced(watcher):
    """The tenant moved to another host while this one was gone (one shared catalogue): a
    sync here fences this copy. The first request, at start, can be lost with its job (a
    Redis restart), and the row is not this host's, so no plan asks again: each rescan
    does."""
    import sqlalchemy as sa
    from datetime import datetime, timezone

    from tenantsync.catalogue_fenced import FencedCopy

    w, data, catalogue = watcher
    with catalogue.engine.begin() as conn:
        conn.execute(sa.text("UPDATE tenants SET host = 'other' WHERE name = 'a.db'"))
    w.rescan()
    assert w.dispatcher.syncs == ["a.db"]
    catalogue.record_fenced(FencedCopy(catalogue.fleet, "h", "a.db", str(data / "a.db"), str(data / "a.db"),
                                       "moved on", 1, datetime.now(timezone.utc)))
    w.dispatcher.syncs.clear()
    w.rescan()
    assert w.dispatcher.syncs == []
