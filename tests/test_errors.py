"""Errors told apart by type or SQLite result code, never by their message text."""

from __future__ import annotations

import sqlite3

import pytest

from tenantsync.errors import sqlite_busy


def _failure(conn: sqlite3.Connection, sql: str) -> sqlite3.Error:
    with pytest.raises(sqlite3.Error) as caught:
        conn.execute(sql)
    return caught.value


def test_another_connections_write_lock_is_busy(tmp_path):
    db = str(tmp_path / "a.db")
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("PRAGMA journal_mode=WAL")
    holder.execute("BEGIN IMMEDIATE")
    other = sqlite3.connect(db, isolation_level=None, timeout=0)
    error = _failure(other, "BEGIN IMMEDIATE")
    assert error.sqlite_errorcode == sqlite3.SQLITE_BUSY and sqlite_busy(error)
    holder.execute("ROLLBACK")
    other.execute("BEGIN IMMEDIATE")  # free again: the barrier's retry would now succeed
    other.execute("ROLLBACK")


def test_a_shared_cache_table_lock_is_busy_by_its_extended_code():
    uri = "file:busy-test?mode=memory&cache=shared"
    writer = sqlite3.connect(uri, uri=True, isolation_level=None)
    reader = sqlite3.connect(uri, uri=True, isolation_level=None)
    writer.execute("CREATE TABLE t(v)")
    writer.execute("BEGIN")
    writer.execute("INSERT INTO t VALUES (1)")
    error = _failure(reader, "SELECT * FROM t")
    assert error.sqlite_errorcode & 0xFF == sqlite3.SQLITE_LOCKED != error.sqlite_errorcode
    assert sqlite_busy(error)


def test_other_sqlite_errors_are_not_busy(tmp_path):
    conn = sqlite3.connect(str(tmp_path / "a.db"))
    assert not sqlite_busy(_failure(conn, "SELECT * FROM missing"))
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    assert not sqlite_busy(_failure(sqlite3.connect(str(tmp_path / "junk.db")), "SELECT * FROM sqlite_master"))
