"""Helpers for tests that drive real SQLite databases like an application would."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import time
import urllib.parse


def app_db(path, page_size: int = 4096) -> sqlite3.Connection:
    """An application connection in WAL mode with SQLite's default autocheckpoint."""
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute(f"PRAGMA page_size={page_size}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB)")
    return conn


def write_rows(conn: sqlite3.Connection, n: int, size: int = 100) -> None:
    """One transaction inserting ``n`` rows of ``size`` random bytes."""
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO t(v) VALUES (randomblob(?))", [(size,)] * n)
    conn.execute("COMMIT")


def written_tenants(data_dir, count: int, rows: int) -> list:
    """``count`` databases t00.db, t01.db… made in ``data_dir`` (a pathlib.Path, created),
    each with one transaction of ``rows`` rows, closed: their paths."""
    data_dir.mkdir()
    paths = [data_dir / f"t{i:02d}.db" for i in range(count)]
    for path in paths:
        conn = app_db(path)
        write_rows(conn, rows)
        conn.close()
    return paths


def dump(path: str) -> list:
    """The logical content of a database: every table's rows in rowid order."""
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        return [(t, conn.execute(f'SELECT * FROM "{t}" ORDER BY rowid').fetchall()) for t in tables]
    finally:
        conn.close()


def wait_for(predicate, timeout: float = 30.0, step: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; never sleeps blindly."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def process_gone(pid: int) -> bool:
    """The process has exited (a zombie its parent has not reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return True


def modify_events_per_commits(inotify, conn: sqlite3.Connection, commits: int) -> int:
    """inotify MODIFY events queued while ``conn`` makes ``commits`` commits, drained after
    each one as a busy reader would (undrained, the kernel merges repeated events, which
    would hide what each one cost the writer)."""
    from inotify_simple import flags

    queued = 0
    for _ in range(commits):
        write_rows(conn, 1)
        queued += sum(1 for e in inotify.read(timeout=0) if e.mask & flags.MODIFY)
    return queued


@contextlib.contextmanager
def application_holding(path, statement: str = "SELECT 1"):
    """Another process (an application) with ``path`` open, after running ``statement`` on
    it, until the block ends; yields its ``Popen``."""
    holder = subprocess.Popen([sys.executable, "-c",
                               f"import sqlite3,sys; c=sqlite3.connect({str(path)!r}, isolation_level=None); "
                               f"c.execute({statement!r}); print('ready', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        yield holder
    finally:
        holder.kill()
        holder.wait()
