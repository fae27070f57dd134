"""One-shot file events for the single-database replicator (tenantsync/file_events.py)."""

from __future__ import annotations

import pytest

from tenantsync.file_events import FileEvents

from .dbutil import app_db, modify_events_per_commits, write_rows


@pytest.fixture
def written(tmp_path):
    """A database with one commit in its WAL, and the connection that made it."""
    db = str(tmp_path / "a.db")
    conn = app_db(db)
    write_rows(conn, 1)
    return db, conn


def test_a_commit_wakes_the_wait_and_a_burst_of_commits_wakes_it_once(written):
    db, conn = written
    events = FileEvents(db)
    try:
        assert not events.wait(0, 0)
        for _ in range(100):
            write_rows(conn, 1)
        assert events.wait(1, 0)
        # The watch fired once and was gone: the other commits queued nothing.
        assert not events.wait(0, 0)
        write_rows(conn, 1)
        assert events.wait(1, 0)
    finally:
        events.close()


def test_the_wal_appearing_wakes_the_wait(tmp_path):
    db = str(tmp_path / "a.db")
    app_db(db).close()  # the last connection's close removes the -wal
    events = FileEvents(db)
    try:
        assert not events.wait(0, 0)
        write_rows(app_db(db), 1)
        assert events.wait(1, 0)
    finally:
        events.close()


def test_other_files_in_the_directory_do_not_wake_it(tmp_path):
    db = str(tmp_path / "a.db")
    app_db(db).close()
    events = FileEvents(db)
    try:
        assert not events.wait(0, 0)
        (tmp_path / "b.db").write_bytes(b"x")
        write_rows(app_db(str(tmp_path / "c.db")), 1)
        assert not events.wait(0.2, 0)
    finally:
        events.close()


def test_between_two_waits_the_application_pays_for_one_event(written):
    db, conn = written
    events = FileEvents(db)
    try:
        assert not events.wait(0, 0)
        assert modify_events_per_commits(events._inotify, conn, 20) == 1
    finally:
        events.close()
