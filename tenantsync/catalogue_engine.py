"""How a catalogue connects: the URL it accepts, the SQLAlchemy engine, and on SQLite the
pragmas, the transaction mode and the host-wide write lock its writers queue on.

Its own module because it is what makes one catalogue database safe to share: between the
threads of a process, the processes of a host (SQLite in WAL mode, writers taking the lock
up front and queueing on a flock) and the hosts of a fleet (PostgreSQL). The ``Catalogue``
(``tenantsync.catalogue``) opens its engine here and knows nothing of these settings.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import StaticPool

from .catalogue_schema import CatalogueError
from .errors import sqlite_busy


def _normalise_url(url: str | URL) -> URL:
    try:
        u = make_url(url)
    except sa.exc.ArgumentError as e:
        raise CatalogueError(f"catalogue URL {url!r}: {e}") from None
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    if u.get_backend_name() not in ("sqlite", "postgresql"):
        raise CatalogueError(
            f"catalogue URL {u.render_as_string(hide_password=True)}: "
            "expected sqlite:///PATH or postgresql+psycopg://…"
        )
    return u


def _switch_to_wal(cur: Any, timeout: float) -> None:
    """``journal_mode=WAL`` unless it already is. Two connections opening a new
    catalogue at once can both want the switch's exclusive lock while holding a shared
    one; SQLite then fails one of them at once instead of calling the busy handler, so
    it is retried here."""
    deadline = time.monotonic() + timeout
    while cur.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        try:
            cur.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError as e:
            if not sqlite_busy(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class _WriterQueue:
    """This host's processes take turns at the SQLite catalogue's write lock on a flock.

    SQLite's busy handler sleeps 1, 2, 5 … 100 ms between tries, and a process that keeps
    losing the race keeps sleeping, often while the lock is free: busy processes (the
    watcher and a child both syncing) would wait far longer than the holders' work.
    A flock tried every ``POLL`` seconds (bounded by the busy timeout,
    so a stopped holder still gives a clear error) keeps the wait near the holders' work.
    Held around whole write transactions; re-entrant within the thread holding the
    catalogue's own lock.
    """

    POLL = 0.0005

    def __init__(self, path: str, timeout: float):
        self.path, self.timeout = path, timeout
        self._fd: int | None = None
        self._depth = 0

    def __enter__(self) -> None:
        self._depth += 1
        if self._depth > 1:
            return
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as e:
                self._depth -= 1
                raise CatalogueError(f"catalogue {self.path}: cannot open the write lock: {e.strerror}") from e
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self._depth -= 1
                    raise CatalogueError(f"catalogue {self.path}: another process has held the write "
                                         f"lock for {self.timeout:g} s") from None
                time.sleep(self.POLL)

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def forget(self) -> None:
        """In a forked child: the inherited descriptor shares the parent's lock (an
        unlock here would unlock the parent); close it and open our own when needed."""
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._depth = None, 0


def open_engine(url: URL, busy_timeout: float, kwargs: dict[str, Any]) -> tuple[Engine, _WriterQueue | None]:
    """The engine for the catalogue at ``url`` (from ``_normalise_url``), and on a SQLite
    file the queue this host's writers take turns on (None otherwise). ``kwargs`` go to
    ``create_engine``; ``busy_timeout`` is how long a SQLite write waits for another's."""
    if url.get_backend_name() == "postgresql":
        kwargs.setdefault("pool_pre_ping", True)
        return sa.create_engine(url, **kwargs), None

    writers = None
    database = url.database or ""
    memory = database in ("", ":memory:") or database.startswith("file::memory:")
    if memory:
        # One shared connection, or every pooled connection would see its own empty DB.
        kwargs.setdefault("poolclass", StaticPool)
        kwargs.setdefault("connect_args", {"check_same_thread": False})
    else:
        parent = os.path.dirname(os.path.abspath(database))
        os.makedirs(parent, exist_ok=True)
        if not database.startswith("file:"):  # a URI filename: left to SQLite alone
            writers = _WriterQueue(os.path.abspath(database) + ".lock", busy_timeout)
    engine = sa.create_engine(url, **kwargs)
    timeout_ms = int(busy_timeout * 1000)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, emit BEGIN (see _on_begin).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {timeout_ms}")  # first: the next one may wait
            if not memory:
                _switch_to_wal(cur, busy_timeout)
                # WAL + NORMAL cannot corrupt; a power loss may lose the last commits,
                # which the next sync pass records again.
                cur.execute("PRAGMA synchronous = NORMAL")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        # Writers take the write lock up front (BEGIN IMMEDIATE), so a transaction
        # never has to upgrade a read lock, which SQLite refuses with SQLITE_BUSY
        # instead of waiting; busy_timeout then queues writers. Readers stay deferred.
        mode = conn.get_execution_options().get("tenantsync_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine, writers
