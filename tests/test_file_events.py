"""The replicators' inotify (tenantsync/file_events.py): one-shot WAL watches and
directory watches down to the depth where databases live."""

from __future__ import annotations

import errno
import os

import pytest

from tenantsync import file_events
from tenantsync.errors import TenantSyncError
from tenantsync.file_events import Change, FileEvents
from tenantsync.replicate import _touches

from .dbutil import app_db, modify_events_per_commits, write_rows


@pytest.fixture
def armed(tmp_path):
    """A database with one commit, the connection that made it, and events watching its WAL."""
    db = str(tmp_path / "a.db")
    conn = app_db(db)
    write_rows(conn, 1)
    events = FileEvents({str(tmp_path): 0})
    events.arm(db + "-wal")
    yield db, conn, events
    events.close()


def test_a_busy_tenant_queues_one_event_until_it_is_reported(armed):
    db, conn, events = armed
    assert modify_events_per_commits(events._inotify, conn, 20) == 1


def test_a_reported_write_is_watched_again(armed):
    db, conn, events = armed
    write_rows(conn, 1)
    assert events.read(1, 0) == {(Change.modified, db + "-wal")}
    assert events.read(0, 0) == set()
    write_rows(conn, 1)
    assert events.read(1, 0) == {(Change.modified, db + "-wal")}


def test_a_wal_created_and_deleted_is_reported_and_watched(tmp_path):
    db = str(tmp_path / "a.db")
    app_db(db).close()
    events = FileEvents({str(tmp_path): 0})
    try:
        conn = app_db(db)
        write_rows(conn, 1)
        assert (Change.added, db + "-wal") in events.read(1, 0)
        write_rows(conn, 1)
        assert events.read(1, 0) == {(Change.modified, db + "-wal")}
        conn.close()
        assert (Change.deleted, db + "-wal") in events.read(1, 0)
    finally:
        events.close()


def test_a_new_tenant_directory_is_watched_and_its_files_reported(tmp_path):
    events = FileEvents({str(tmp_path): 1})
    try:
        (tmp_path / "acme").mkdir()
        (tmp_path / "acme" / "early.db").write_bytes(b"")  # may land before the watch
        changes = events.read(1, 0.05)
        assert (Change.added, str(tmp_path / "acme" / "early.db")) in changes
        write_rows(app_db(str(tmp_path / "acme" / "app.db")), 1)
        changes = events.read(1, 0.05)
        assert (Change.added, str(tmp_path / "acme" / "app.db")) in changes
        assert (Change.added, str(tmp_path / "acme" / "app.db-wal")) in changes
    finally:
        events.close()


def test_directories_deeper_than_tenants_live_are_not_watched(tmp_path):
    (tmp_path / "acme" / "backups").mkdir(parents=True)
    events = FileEvents({str(tmp_path): 1})
    try:
        (tmp_path / "acme" / "backups" / "old.db").write_bytes(b"x")
        assert events.read(0.2, 0) == set()
    finally:
        events.close()


def test_past_the_kernel_watch_limit_a_wal_is_polled(armed, monkeypatch, caplog):
    db, conn, events = armed
    other = db.replace("a.db", "b.db")
    other_conn = app_db(other)
    write_rows(other_conn, 1)
    events.read(0.2, 0)  # b.db and its side files appearing

    def no_space(path, mask):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(events._inotify, "add_watch", no_space)
    events.arm(other + "-wal")
    assert "inotify watch limit reached" in caplog.text
    write_rows(other_conn, 1)
    assert events.read(0.2, 0) == {(Change.modified, other + "-wal")}
    assert events.read(0.2, 0) == set()


def test_the_single_database_loop_wakes_only_for_its_own_database(tmp_path):
    db = str(tmp_path / "a.db")
    app_db(db).close()
    events = FileEvents({str(tmp_path): 0})
    try:
        events.arm(db + "-wal")
        (tmp_path / "b.db").write_bytes(b"x")
        write_rows(app_db(str(tmp_path / "c.db")), 1)
        assert not _touches(events.read(0.2, 0), (db, db + "-wal"))
        write_rows(app_db(db), 1)  # creates the WAL, then writes it
        assert _touches(events.read(1, 0), (db, db + "-wal"))
    finally:
        events.close()


def test_inotify_failures_are_one_line_naming_the_limit_or_the_path(tmp_path, monkeypatch):
    def fail(err):
        def raiser(*_args):
            raise OSError(err, os.strerror(err))
        return raiser

    monkeypatch.setattr(file_events, "INotify", fail(errno.EMFILE))
    with pytest.raises(TenantSyncError, match="cannot start inotify: .*max_user_instances"):
        FileEvents({str(tmp_path): 0})
    monkeypatch.undo()

    events = FileEvents({})
    try:
        monkeypatch.setattr(events._inotify, "add_watch", fail(errno.EACCES))
        with pytest.raises(TenantSyncError, match=f"{tmp_path}/a.db-wal: cannot watch: Permission denied"):
            events.arm(str(tmp_path / "a.db-wal"))
    finally:
        events.close()


def test_a_batch_waits_the_debounce_even_when_events_were_already_queued(armed, monkeypatch):
    # A busy WAL's re-armed watch has fired again by the next read; without the debounce
    # every event would be a batch of its own (a pass per commit in the CLI).
    db, conn, events = armed
    write_rows(conn, 1)
    slept = []
    monkeypatch.setattr(file_events.time, "sleep", slept.append)
    assert events.read(1, 0.05) == {(Change.modified, db + "-wal")}
    assert slept == [0.05]
    assert events.read(0, 0.05) == set() and slept == [0.05]


def test_a_watch_that_goes_away_while_armed_is_reported_and_armed_again(armed):
    # The kernel queues a one-shot event before it removes the watch: a re-arm racing it
    # gets the dying watch back (the same wd), and then only IN_IGNORED arrives for it.
    # Removing the armed watch by hand produces exactly that event.
    db, conn, events = armed
    wal = db + "-wal"
    events._inotify.rm_watch(events._armed[wal])
    assert events.read(1, 0) == {(Change.modified, wal)}  # a write may have been missed
    write_rows(conn, 1)
    assert events.read(1, 0) == {(Change.modified, wal)}  # and the next one is reported


def test_a_watch_removed_with_its_file_is_not_a_write(armed):
    db, conn, events = armed
    conn.close()  # the last connection: SQLite checkpoints and deletes the WAL
    changes = events.read(1, 0.05)
    assert (Change.modified, db + "-wal") not in changes
    assert db + "-wal" not in events._armed


def test_rearm_missing_watches_only_existing_unwatched_wals(armed, tmp_path):
    db, conn, events = armed
    wal = db + "-wal"
    assert events.rearm_missing([wal, str(tmp_path / "none.db-wal")]) == []
    del events._armed[wal]  # as if its watch had been lost unnoticed
    assert events.rearm_missing([wal]) == [wal]
    write_rows(conn, 1)
    assert events.read(1, 0) == {(Change.modified, wal)}
