"""The tenant catalogue: one row per tenant database, in SQLite or PostgreSQL.

Embedded mode keeps it in a SQLite file beside the host's state (``sqlite:///PATH``);
fleet mode shares one PostgreSQL database between several hosts
(``postgresql+psycopg://USER@HOST/DB``; a bare ``postgresql://`` means psycopg 3 too).
Each row holds what a job needs to pick a tenant up in any process: its path and
owning host, its lifecycle state, the capture position and the times of its last write,
sync, compaction and snapshot, so schedulers only look at tenants that changed.

Rules the whole module keeps:

- Every method is one short transaction on its own connection, so a ``Catalogue`` is
  safe to share between threads, and several processes (or hosts) can use one database.
- Results are frozen ``TenantRecord`` dataclasses, never live ORM objects: nothing is
  lazy-loaded, nothing expires, a record can be kept or passed to another thread.
- Datetimes are timezone-aware on the way in (a naive one is refused: ``ValueError``)
  and come back in UTC; SQLite stores them as UTC text of a fixed format, so they
  compare correctly in SQL.
- State changes that two processes may race for go through ``transition()``, a single
  ``UPDATE … WHERE state IN (…)``: exactly one of them wins.
- The schema is created and upgraded by the Alembic migrations in
  ``tenantsync/migrations`` when a ``Catalogue`` is opened, under a lock, so many
  processes may open a fresh database at once. No ``alembic.ini`` is needed.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import functools
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import StaticPool

from .errors import TenantSyncError, sqlite_busy

__all__ = [
    "Catalogue",
    "CatalogueError",
    "TenantRecord",
    "TenantState",
    "UnknownTenant",
    "alembic_config",
    "open_catalogue",
]

MIGRATIONS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations")
# Our own version table, so a PostgreSQL database shared with an application that uses
# Alembic itself does not mix the two histories.
VERSION_TABLE = "tenantsync_alembic_version"
# The newest migration's revision. A process that finds the schema there skips Alembic,
# whose import (with Mako and Pygments) was 11 MiB of every worker's and watcher's memory;
# tests/test_catalogue.py checks this against the migrations directory.
SCHEMA_HEAD = "0002"
# Key of the PostgreSQL advisory lock held while migrating (any fixed 63-bit number;
# this one is the ASCII of "tsyncmig").
_MIGRATE_LOCK_KEY = 0x7473796E636D6967
# Alembic's ``context`` and ``op`` are process-global proxies: two upgrades running at
# once in one process (two Catalogues opened by two threads) would share them.
_MIGRATE_GUARD = threading.Lock()
# Tenants per statement in discover_many (bounds the memory of one statement).
_BULK_ROWS = 5000


class CatalogueError(TenantSyncError):
    """The catalogue cannot be opened or used (bad URL, failed migration)."""


class UnknownTenant(CatalogueError, KeyError):
    """A ``record_*`` call named a tenant the catalogue does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown tenant"


class TenantState(str, enum.Enum):
    """Where a tenant is in its lifecycle. Stored as the lower-case value."""

    active = "active"
    """The local database is being replicated: it was written and synced recently.

    Entered: from ``idle`` or ``error`` by a sync that shipped (``record_sync()``); from
    ``hydrating`` once the restored database is in place (``transition``).
    Left: for ``idle`` when the scheduler finds it quiet (``idle_since()``), for
    ``archiving`` when it is retired, for ``error`` on a failure (``record_error()``).
    """

    idle = "idle"
    """Known and local, but not written lately: it holds no file descriptor, connection
    or worker; only this row.

    Entered: on discovery (``discover()`` inserts every new tenant as idle); from
    ``active`` when the scheduler finds it quiet.
    Left: for ``active`` on its next successful sync; for ``archiving`` when retired.
    """

    archiving = "archiving"
    """A final sync and snapshot are being shipped before the local file is removed.

    Entered: from ``active`` or ``idle`` (``transition`` with ``expected``), by exactly
    one process.
    Left: for ``archived`` once the snapshot is stored and the local file is gone; for
    ``error`` if shipping fails (the local file is then kept).
    """

    archived = "archived"
    """Only the replica holds the database; no local file. ``archived_txid`` records the
    TXID the replica ends at, which a later hydration must reach.

    Entered: from ``archiving`` (``transition`` sets ``archived_txid`` to ``txid``).
    Left: for ``hydrating`` when the tenant is needed again, by exactly one process
    (compare-and-set: two processes racing from archived to hydrating cannot both win).
    """

    hydrating = "hydrating"
    """The database is being restored from the replica to its local path.

    Entered: from ``archived`` (``transition`` with ``expected={archived}``).
    Left: for ``active`` (or ``idle``) once restored and verified; for ``error`` if the
    restore fails, after which an operator or retry moves it back to ``archived``.
    """

    error = "error"
    """The last operation on the tenant failed; ``last_error`` says why.

    Entered: from any state by ``record_error()``.
    Left: for ``active`` by the next sync that ships (``record_sync()``, which clears
    ``last_error``), or by an explicit ``transition``.
    """


def _chunks(names: list[str], size: int = 500) -> Iterator[list[str]]:
    """``names`` in slices for ``IN (...)``: under SQLite's bound-parameter limit."""
    for i in range(0, len(names), size):
        yield names[i:i + size]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _utc(value: datetime, what: str = "datetime") -> datetime:
    if not isinstance(value, datetime):
        raise TypeError(f"{what}: expected a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
        raise ValueError(f"{what}: naive datetime {value.isoformat()}; pass a timezone-aware one")
    return value.astimezone(timezone.utc)


class UTCDateTime(sa.types.TypeDecorator):
    """A timezone-aware datetime stored as UTC.

    PostgreSQL: ``timestamptz``. SQLite: SQLAlchemy's fixed-format text
    (``YYYY-MM-DD HH:MM:SS.ffffff``) of the UTC time, which sorts and compares as time.
    Naive datetimes are refused rather than guessed at.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        value = _utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


# Core, not an ORM model: nothing here needs an identity map, and leaving ``sqlalchemy.orm``
# unimported keeps 6 MiB out of every process. The schema is created by migration 0001,
# not from this table: a change here needs a new migration in ``tenantsync/migrations/versions``.
METADATA = sa.MetaData()
TENANTS = sa.Table(
    "tenants",
    METADATA,
    # The fleet (its replica root, storage.fleet_id) and the name are the tenant: two
    # fleets sharing one catalogue (a PostgreSQL one, or a SQLite file given to both) each
    # have their own row for a name both use. Rows a migration carried over from before
    # fleets have '' here until their fleet adopts them (Catalogue.adopt).
    sa.Column("fleet", sa.String(1024), primary_key=True, server_default=""),
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column(
        "state",
        sa.Enum(
            TenantState,
            native_enum=False,
            create_constraint=False,
            length=16,
            values_callable=lambda e: [m.value for m in e],
            validate_strings=True,
        ),
        nullable=False,
        default=TenantState.idle,
    ),
    sa.Column("generation", sa.BigInteger, nullable=False, default=0, server_default="0"),
    sa.Column("txid", sa.BigInteger, nullable=False, default=0, server_default="0"),
    sa.Column("position", sa.JSON(none_as_null=True)),
    sa.Column("last_write_at", UTCDateTime),
    sa.Column("last_sync_at", UTCDateTime),
    sa.Column("last_compact_at", UTCDateTime),
    sa.Column("last_snapshot_at", UTCDateTime),
    sa.Column("lease_holder", sa.String(255)),
    sa.Column("lease_expires_at", UTCDateTime),
    sa.Column("bytes_stored", sa.BigInteger, nullable=False, default=0, server_default="0"),
    sa.Column("last_error", sa.Text),
    sa.Column("archived_txid", sa.BigInteger),
    # A hydration or archival in progress: which process (owner.this_process()) moved the
    # tenant to hydrating/archiving and from which state, so a failure puts it back and a
    # mark left by a process that died is undone (Catalogue.recover_marks).
    sa.Column("mark_owner", sa.String(255)),
    sa.Column("mark_from", sa.String(16)),
    sa.Column("created_at", UTCDateTime, nullable=False, default=_now),
    sa.Column("updated_at", UTCDateTime, nullable=False, default=_now, onupdate=_now),
    sa.Index("ix_tenants_fleet_host_state", "fleet", "host", "state"),
    sa.Index("ix_tenants_fleet_last_write_at", "fleet", "last_write_at"),
)


@dataclass(frozen=True, slots=True)
class TenantRecord:
    """A detached, immutable snapshot of one ``tenants`` row."""

    fleet: str
    name: str
    path: str
    host: str
    state: TenantState
    generation: int
    txid: int
    position: dict[str, Any] | None
    last_write_at: datetime | None
    last_sync_at: datetime | None
    last_compact_at: datetime | None
    last_snapshot_at: datetime | None
    lease_holder: str | None
    lease_expires_at: datetime | None
    bytes_stored: int
    last_error: str | None
    archived_txid: int | None
    mark_owner: str | None
    mark_from: str | None
    created_at: datetime
    updated_at: datetime


_RECORD_FIELDS = tuple(f.name for f in fields(TenantRecord))
# Records are built from rows positionally.
assert tuple(TENANTS.c.keys()) == _RECORD_FIELDS, "TenantRecord fields must follow the table's columns"
_BY_NAME = sa.select(*TENANTS.c).where(TENANTS.c.fleet == sa.bindparam("fleet"), TENANTS.c.name == sa.bindparam("name"))


@functools.cache
def _sync_statement(with_at: bool, with_lease: bool) -> sa.Update:
    """record_sync's UPDATE of the position, built once per variant: building it per call
    (CASE clauses, coercions) cost as much as executing it."""
    c = TENANTS.c

    def param(key: str, column: sa.Column) -> sa.BindParameter:
        return sa.bindparam("b_" + key, type_=column.type)  # column names are reserved in SET

    txid = param("txid", c.txid)
    newer = sa.or_(c.txid.is_(None), c.txid <= txid)
    values: dict[str, Any] = {
        "txid": sa.case((newer, txid), else_=c.txid),
        "position": sa.case((newer, param("position", c.position)), else_=c.position),
        "last_sync_at": param("at", c.last_sync_at) if with_at else c.last_sync_at,
        "bytes_stored": c.bytes_stored + param("bytes_added", c.bytes_stored),
        "last_error": None,
    }
    if with_lease:
        values |= {k: param(k, c[k]) for k in ("lease_holder", "lease_expires_at", "generation")}
    return sa.update(TENANTS).where(c.fleet == param("fleet", c.fleet), c.name == param("name", c.name)).values(values)


# The states a sync may move a tenant between. The others belong to a hydration or an
# archival (mark / unmark), which a sync in another process, racing it, must not undo.
REPLICATED = (TenantState.active, TenantState.idle, TenantState.error)
# record_sync's move to the state its caller chose, when the tenant is in one of REPLICATED.
_SYNC_STATE = (sa.update(TENANTS)
               .where(TENANTS.c.fleet == sa.bindparam("b_fleet"), TENANTS.c.name == sa.bindparam("b_name"),
                      TENANTS.c.state.in_(REPLICATED), TENANTS.c.state != sa.bindparam("b_state"))
               .values(state=sa.bindparam("b_state")))


def alembic_config(url: str | URL | None = None):
    """An Alembic ``Config`` built in code: ``script_location`` is the package's
    migrations directory, so no ``alembic.ini`` is needed.

    ``Catalogue`` passes its open connection in ``config.attributes["connection"]``.
    For a developer writing the next migration (autogenerate compares against the
    models here)::

        from alembic import command
        from tenantsync.catalogue import alembic_config
        command.upgrade(alembic_config("sqlite:///scratch.db"), "head")
        command.revision(alembic_config("sqlite:///scratch.db"), "add x", autogenerate=True,
                         rev_id="0002")

    then edit the generated file by hand: migrations are reviewed code.
    """
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", MIGRATIONS_DIR.replace("%", "%%"))
    cfg.set_main_option("version_table", VERSION_TABLE)
    if url is not None:
        rendered = url.render_as_string(hide_password=False) if isinstance(url, URL) else url
        cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return cfg


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


def _forget_pool(ref: "weakref.ref[Catalogue]") -> None:
    catalogue = ref()
    if catalogue is not None:
        catalogue.engine.dispose(close=False)
        catalogue._write_lock = threading.RLock()  # a thread of the parent may have held it
        if catalogue._writers is not None:
            catalogue._writers.forget()


class _WriterQueue:
    """This host's processes take turns at the SQLite catalogue's write lock on a flock.

    SQLite's busy handler sleeps 1, 2, 5 … 100 ms between tries, and a process that keeps
    losing the race keeps sleeping: with the watcher and a child process both syncing
    10,000 tenants, the child's catalogue writes waited seconds while the lock was free
    most of the time. A flock tried every ``POLL`` seconds (bounded by the busy timeout,
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


class Catalogue:
    """The tenants of one fleet in the catalogue at ``url``: ``sqlite:///PATH`` (embedded)
    or ``postgresql+psycopg://…`` (fleet). Opening it creates or upgrades the schema.

    ``fleet`` (``Config.fleet``, the replica root's identity) scopes every read and
    write: the object sees only its fleet's rows, so a catalogue shared by several
    fleets never hands one fleet another's tenant.

    ``busy_timeout`` (SQLite only) is how long a write waits for another process's
    write to finish before failing. ``migrate=False`` skips the schema upgrade (for a
    tool that must not change the schema). Extra keyword arguments go to
    ``create_engine``. One object serves every thread of a process; a forked child
    drops the inherited connections and opens its own.
    """

    def __init__(self, url: str | URL, *, fleet: str, busy_timeout: float = 30.0, migrate: bool = True,
                 **engine_kwargs: Any):
        if not fleet:
            raise CatalogueError("catalogue: no fleet given (the replica root names the fleet)")
        self.fleet = fleet
        self._mine = TENANTS.c.fleet == fleet
        self.url = _normalise_url(url)
        self.dialect = self.url.get_backend_name()
        self._writers: _WriterQueue | None = None
        self.engine = self._create_engine(busy_timeout, engine_kwargs)
        self._write_lock = threading.RLock()
        # A forked child (Celery prefork) must not reuse the parent's pooled connections:
        # it forgets them without closing them, and opens its own.
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _forget_pool(ref))
        if migrate:
            try:
                self._migrate()
            except Exception:
                self.engine.dispose()
                raise

    def __repr__(self) -> str:
        return f"Catalogue({self.url.render_as_string(hide_password=True)!r}, fleet={self.fleet!r})"

    def close(self) -> None:
        """Close every pooled connection. The object is unusable afterwards."""
        self.engine.dispose()

    def __enter__(self) -> "Catalogue":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- engine and schema ------------------------------------------------------

    def _create_engine(self, busy_timeout: float, kwargs: dict[str, Any]) -> Engine:
        if self.dialect == "postgresql":
            kwargs.setdefault("pool_pre_ping", True)
            return sa.create_engine(self.url, **kwargs)

        database = self.url.database or ""
        memory = database in ("", ":memory:") or database.startswith("file::memory:")
        if memory:
            # One shared connection, or every pooled connection would see its own empty DB.
            kwargs.setdefault("poolclass", StaticPool)
            kwargs.setdefault("connect_args", {"check_same_thread": False})
        else:
            parent = os.path.dirname(os.path.abspath(database))
            os.makedirs(parent, exist_ok=True)
            if not database.startswith("file:"):  # a URI filename: left to SQLite alone
                self._writers = _WriterQueue(os.path.abspath(database) + ".lock", busy_timeout)
        engine = sa.create_engine(self.url, **kwargs)
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

        return engine

    def _migrate(self) -> None:
        """``alembic upgrade head``, safe when many processes open a fresh database at once.

        Fast path: the schema is at head, nothing is locked. Otherwise the upgrade runs in
        one transaction that first takes a lock every migrating process needs: on
        PostgreSQL a transaction-scoped advisory lock (``pg_advisory_xact_lock``, released
        at commit or rollback, even if the process dies); on SQLite the database write
        lock (``BEGIN IMMEDIATE``). The loser waits, then finds the schema at head and does
        nothing. Both dialects have transactional DDL, so a failed upgrade leaves nothing.
        Within one process a lock also serialises upgrades, as Alembic's ``context`` is
        global.
        """
        if self._schema_version() == {SCHEMA_HEAD}:
            return  # the usual case: every process after the first, without Alembic's import
        from alembic import command
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        cfg = alembic_config()
        heads = set(ScriptDirectory.from_config(cfg).get_heads())
        with self.engine.connect() as conn:
            current = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_heads()
            conn.rollback()
            if set(current) == heads:
                return
            if self.dialect == "sqlite":
                conn.execution_options(tenantsync_begin="IMMEDIATE")
            try:
                with _MIGRATE_GUARD, conn.begin():
                    if self.dialect == "postgresql":
                        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATE_LOCK_KEY)))
                    cfg.attributes["connection"] = conn
                    command.upgrade(cfg, "head")
            except sa.exc.SQLAlchemyError as e:
                raise CatalogueError(f"{self!r}: migrating the schema failed: {e}") from e

    def _schema_version(self) -> set[str]:
        """The revisions in the version table (none in a fresh database, which has no such
        table). A database that cannot be read (not a database, no permission, a server
        refusing us) is one clear error, not a migration attempt."""
        table = sa.table(VERSION_TABLE, sa.column("version_num"))
        try:
            with self.engine.connect() as conn:
                if not sa.inspect(conn).has_table(VERSION_TABLE):
                    return set()
                return set(conn.execute(sa.select(table.c.version_num)).scalars())
        except sa.exc.DBAPIError as e:
            raise CatalogueError(f"{self!r}: cannot read the schema version: {e.orig or e}") from e

    # -- transactions -----------------------------------------------------------

    @contextmanager
    def _tx(self, write: bool) -> Iterator[sa.Connection]:
        # Core connections, not ORM sessions: a session's bookkeeping was a third of
        # every sync's catalogue time, and no caller needs an identity map.
        if not (write and self.dialect == "sqlite"):
            with self.engine.begin() as conn:
                yield conn
            return
        # This process's writers queue on a lock first: waiting in SQLite's busy handler
        # sleeps 1, 2, 5, 10 ms ... between tries, so with a few job threads most of a
        # sync's time went to sleeping while the write lock was free (fleet benchmark F5).
        # The busy handler is then only for other processes.
        with self._write_lock, self._writers or contextlib.nullcontext(), self.engine.connect() as conn:
            conn.execution_options(tenantsync_begin="IMMEDIATE")
            with conn.begin():
                yield conn

    def _insert(self):
        insert = pg_dialect.insert if self.dialect == "postgresql" else sqlite_dialect.insert
        return insert(TENANTS)

    def _update(self, name: str, values: dict[str, Any]) -> None:
        """Update one tenant's row; raise UnknownTenant if there is none."""
        self._update_row(name, sa.update(TENANTS).where(self._mine, TENANTS.c.name == name).values(**values))

    def _update_row(self, name: str, stmt: sa.Update, params: dict[str, Any] | None = None) -> None:
        with self._tx(write=True) as s:
            if s.execute(stmt, params or {}).rowcount == 0:
                raise UnknownTenant(f"catalogue: no tenant named {name!r}")

    # -- discovery --------------------------------------------------------------

    @staticmethod
    def _on_conflict(stmt):
        """… ON CONFLICT (fleet, name) DO UPDATE path/host WHERE either changed.

        A new tenant is inserted idle; an existing one keeps its state, TXID, position
        and times, and its row is only written when its path or host differ."""
        ex = stmt.excluded
        return stmt.on_conflict_do_update(
            index_elements=[TENANTS.c.fleet, TENANTS.c.name],
            set_={"path": ex.path, "host": ex.host, "updated_at": ex.updated_at},
            where=sa.or_(TENANTS.c.path != ex.path, TENANTS.c.host != ex.host),
        )

    def _new_row(self, name: str, path: str, host: str, now: datetime) -> dict[str, Any]:
        return {
            "name": name,
            "path": path,
            "fleet": self.fleet,
            "host": host,
            "state": TenantState.idle,
            "generation": 0,
            "txid": 0,
            "bytes_stored": 0,
            "created_at": now,
            "updated_at": now,
        }

    def discover(self, name: str, path: str, host: str) -> TenantRecord:
        """Register tenant ``name`` at ``path`` on ``host``; idempotent.

        Missing: inserted with state idle. Present: path and host are updated if they
        changed; state, TXID, position and every time are left as they are."""
        self.adopt([(name, path)])
        with self._tx(write=True) as s:
            s.execute(self._on_conflict(self._insert()), self._new_row(name, path, host, _now()))
            return TenantRecord(*s.execute(_BY_NAME, {"fleet": self.fleet, "name": name}).one())

    def discover_many(self, items: Iterable[tuple[str, str]], host: str) -> int:
        """``discover()`` for many ``(name, path)`` pairs on ``host``, in one transaction
        of ``INSERT … ON CONFLICT`` statements (same rule as ``discover``).

        SQLite: one statement executed for every row (SQLAlchemy batches them into
        multi-row INSERTs). PostgreSQL: ``INSERT … SELECT FROM unnest(names, paths)``,
        two array parameters per statement, which spares the driver from parsing
        thousands of placeholders.

        Returns how many rows were written: tenants inserted plus tenants whose path or
        host changed (0 when everything was already known as given). A name given twice
        takes its last path. Rows are written in name order, so two hosts discovering
        overlapping sets at once cannot deadlock on PostgreSQL."""
        now = _now()
        latest = dict(items)
        self.adopt(latest.items())
        names = sorted(latest)  # one lock order for every writer (see above)
        written = 0
        with self._tx(write=True) as s:
            for i in range(0, len(names), _BULK_ROWS):
                chunk = names[i : i + _BULK_ROWS]
                if self.dialect == "postgresql":
                    stmt, params = self._unnest_upsert(host, now), {
                        "names": chunk,
                        "paths": [latest[n] for n in chunk],
                    }
                else:
                    stmt = self._on_conflict(self._insert())
                    params = [self._new_row(n, latest[n], host, now) for n in chunk]
                # Counted by RETURNING on both paths (a batched executemany reports rowcount -1).
                written += len(s.execute(stmt.returning(TENANTS.c.name), params).all())
        return written

    def _unnest_upsert(self, host: str, now: datetime):
        c = TENANTS.c
        src = (
            sa.func.unnest(
                sa.bindparam("names", type_=pg_dialect.ARRAY(sa.Text)),
                sa.bindparam("paths", type_=pg_dialect.ARRAY(sa.Text)),
            )
            .table_valued("name", "path")
            .render_derived(name="src")
        )
        row = self._new_row("", "", host, now)
        columns = list(row)
        select = sa.select(
            src.c.name,
            src.c.path,
            *(sa.literal(row[k], c[k].type) for k in columns[2:]),
        )
        return self._on_conflict(pg_dialect.insert(TENANTS).from_select(columns, select))

    # -- reads ------------------------------------------------------------------

    def get(self, name: str) -> TenantRecord | None:
        with self._tx(write=False) as s:
            row = s.execute(_BY_NAME, {"fleet": self.fleet, "name": name}).first()
            return TenantRecord(*row) if row is not None else None

    def _select(self, stmt: sa.Select) -> list[TenantRecord]:
        # Plain rows, not ORM objects: three times faster for 10,000 tenants.
        with self._tx(write=False) as s:
            return [TenantRecord(*row) for row in s.execute(stmt)]

    def _names(self, stmt: sa.Select) -> list[str]:
        with self._tx(write=False) as s:
            return list(s.scalars(stmt))

    def positions(self, names: Iterable[str]) -> dict[str, dict[str, Any] | None]:
        """``{name: stored capture position}`` of those ``names`` in the catalogue, in one
        transaction: the watcher's rescan asks for the tenants whose main file changed."""
        names = sorted(set(names))
        with self._tx(write=False) as s:
            return {name: position for chunk in _chunks(names)
                    for name, position in s.execute(sa.select(TENANTS.c.name, TENANTS.c.position)
                                                    .where(self._mine, TENANTS.c.name.in_(chunk)))}

    def records(self, state: TenantState | None = None, host: str | None = None) -> list[TenantRecord]:
        """Tenants by name, optionally only those in ``state`` and/or on ``host``."""
        stmt = sa.select(*TENANTS.c).where(self._mine).order_by(TENANTS.c.name)
        if state is not None:
            stmt = stmt.where(TENANTS.c.state == TenantState(state))
        if host is not None:
            stmt = stmt.where(TENANTS.c.host == host)
        return self._select(stmt)

    def count_by_state(self) -> dict[str, int]:
        """``{state value: tenants}``, with every state present (0 when none)."""
        counts = {s.value: 0 for s in TenantState}
        with self._tx(write=False) as s:
            for state, n in s.execute(sa.select(TENANTS.c.state, sa.func.count()).where(self._mine)
                                      .group_by(TENANTS.c.state)):
                counts[TenantState(state).value] = n
        return counts

    def lagging(self, now: datetime, older_than: timedelta, host: str | None = None) -> list[TenantRecord]:
        """Tenants written since their last sync (or never synced) whose last write is
        more than ``older_than`` before ``now``: writes a watcher's event should have
        shipped by now. Oldest write first."""
        stmt = (
            sa.select(*TENANTS.c)
            .where(
                self._mine,
                TENANTS.c.last_write_at < _utc(now, "now") - older_than,
                sa.or_(TENANTS.c.last_sync_at.is_(None), TENANTS.c.last_write_at > TENANTS.c.last_sync_at),
            )
            .order_by(TENANTS.c.last_write_at, TENANTS.c.name)
        )
        if host is not None:
            stmt = stmt.where(TENANTS.c.host == host)
        return self._select(stmt)

    def failing(self, before: datetime, host: str | None = None) -> list[str]:
        """Names of tenants in state error whose row has not changed since ``before``: a
        failed sync (a transient EMFILE, a locked file, a storage outage) is retried by the
        catch-up schedule then, instead of waiting for the tenant's next write, which may
        never come."""
        stmt = (sa.select(TENANTS.c.name)
                .where(self._mine, TENANTS.c.state == TenantState.error, TENANTS.c.updated_at < _utc(before, "before"))
                .order_by(TENANTS.c.updated_at, TENANTS.c.name))
        if host is not None:
            stmt = stmt.where(TENANTS.c.host == host)
        return self._names(stmt)

    def idle_since(self, before: datetime, host: str | None = None) -> list[TenantRecord]:
        """Active tenants not written since ``before``: candidates for idle.

        A tenant with no recorded write counts from its last sync, so a tenant synced
        once and never written still goes idle."""
        quiet = sa.func.coalesce(TENANTS.c.last_write_at, TENANTS.c.last_sync_at)
        stmt = (
            sa.select(*TENANTS.c)
            .where(self._mine, TENANTS.c.state == TenantState.active, quiet < _utc(before, "before"))
            .order_by(quiet, TENANTS.c.name)
        )
        if host is not None:
            stmt = stmt.where(TENANTS.c.host == host)
        return self._select(stmt)

    def synced_since(self, since: datetime) -> list[str]:
        """Names of tenants synced at or after ``since``: the ones a periodic compaction,
        snapshot or retention pass can have work for. Filtered in SQL: a pass over an idle
        fleet of 10,000 reads no rows into Python."""
        return self._names(sa.select(TENANTS.c.name).where(self._mine, TENANTS.c.last_sync_at >= _utc(since, "since"))
                           .order_by(TENANTS.c.name))

    # -- writes -----------------------------------------------------------------

    def record_sync(
        self,
        name: str,
        *,
        txid: int,
        position: dict[str, Any] | None,
        at: datetime | None,
        state: TenantState | None,
        bytes_added: int = 0,
        lease: tuple[str | None, datetime | None, int] | None = None,
    ) -> None:
        """A sync pass shipped up to ``txid``: store it with the capture ``position``, add
        ``bytes_added`` to ``bytes_stored``, clear ``last_error`` and move the tenant to
        ``state``, all in one transaction. The caller decides ``state`` from what the pass
        did (active after shipping, idle after a release, None for no change within an
        archival); it is applied only from a REPLICATED state, never over a hydration's or
        archival's mark. ``lease`` (holder, expiry, generation) also does
        :meth:`record_lease`. ``at=None`` stores the position only (nothing was shipped):
        ``last_sync_at`` is what the schedule picks tenants to compact by.

        The TXID and position never move backwards: two processes of one host may both
        sync a tenant, and the slower one must not overwrite the newer position."""
        values: dict[str, Any] = {"fleet": self.fleet, "name": name, "txid": txid, "position": position,
                                  "bytes_added": bytes_added}
        if at is not None:
            values["at"] = _utc(at, "at")
        if lease is not None:
            values |= self._lease_values(*lease)
        params = {"b_" + k: v for k, v in values.items()}
        with self._tx(write=True) as s:
            if s.execute(_sync_statement(at is not None, lease is not None), params).rowcount == 0:
                raise UnknownTenant(f"catalogue: no tenant named {name!r}")
            if state is not None:
                s.execute(_SYNC_STATE, {"b_fleet": self.fleet, "b_name": name, "b_state": TenantState(state)})

    def record_caught_up(self, name: str, at: datetime) -> None:
        """A pass found nothing to ship at ``at``: the replica is current. Only
        ``last_sync_at`` moves (forward); state and position stay as they are."""
        c = TENANTS.c
        at = _utc(at, "at")
        self._update(name, {"last_sync_at": sa.case((sa.or_(c.last_sync_at.is_(None), c.last_sync_at < at),
                                                     sa.literal(at, c.last_sync_at.type)), else_=c.last_sync_at)})

    def record_writes(self, names: Iterable[str], at: datetime) -> None:
        """These tenants' databases were written at ``at`` (one batch of the watcher's
        events, one transaction). Only moves ``last_write_at`` forward, so events handled
        out of order cannot make a tenant look older; names not in the catalogue are
        ignored (a file that vanished between the event and this call)."""
        names = sorted(set(names))
        if not names:
            return
        at = _utc(at, "at")
        col = TENANTS.c.last_write_at
        later = sa.case((sa.or_(col.is_(None), col < at), sa.literal(at, col.type)), else_=col)
        with self._tx(write=True) as s:
            for chunk in _chunks(names):
                s.execute(sa.update(TENANTS).where(self._mine, TENANTS.c.name.in_(chunk)).values(last_write_at=later))

    def record_error(self, name: str, message: str) -> None:
        """An operation failed: state error, ``last_error`` = ``message``."""
        self._update(name, {"state": TenantState.error, "last_error": message})

    def record_lease(self, name: str, holder: str | None, expires_at: datetime | None, generation: int) -> None:
        """Mirror of the tenant's lease (the lease itself lives in object storage)."""
        self._update(name, self._lease_values(holder, expires_at, generation))

    @staticmethod
    def _lease_values(holder: str | None, expires_at: datetime | None, generation: int) -> dict[str, Any]:
        return {
            "lease_holder": holder,
            "lease_expires_at": None if expires_at is None else _utc(expires_at, "expires_at"),
            "generation": generation,
        }

    def record_storage_times(self, *, compacted: dict[str, datetime], snapshotted: dict[str, datetime]) -> None:
        """When each tenant's last compaction or snapshot wrote a file, many tenants in one
        transaction; names no longer in the catalogue are ignored."""
        with self._tx(write=True) as s:
            for column, times in (("last_compact_at", compacted), ("last_snapshot_at", snapshotted)):
                if times:
                    stmt = sa.update(TENANTS).where(self._mine, TENANTS.c.name == sa.bindparam("tenant")).values(
                        {column: sa.bindparam("at")})
                    s.execute(stmt, [{"tenant": name, "at": _utc(at, "at")} for name, at in times.items()])

    def transition(self, name: str, to: TenantState, *, expected: set[TenantState] | None = None) -> bool:
        """Move tenant ``name`` to state ``to`` if its state is one of ``expected`` (any
        state when None), in a single ``UPDATE … WHERE name = … AND state IN (…)``.

        True if this call moved it; False if the tenant is missing or was in another
        state: of several processes racing for the same move, exactly one gets True.
        Moving to archived also sets ``archived_txid`` to the tenant's ``txid``."""
        to = TenantState(to)
        values: dict[str, Any] = {"state": to}
        if to is TenantState.archived:
            values["archived_txid"] = TENANTS.c.txid
        stmt = sa.update(TENANTS).where(self._mine, TENANTS.c.name == name).values(**values)
        if expected is not None:
            allowed = sorted({TenantState(s) for s in expected}, key=lambda s: s.value)
            if not allowed:
                return False
            stmt = stmt.where(TENANTS.c.state.in_(allowed))
        with self._tx(write=True) as s:
            return s.execute(stmt).rowcount == 1

    # -- hydration and archival marks ---------------------------------------------

    def mark(self, name: str, to: TenantState, *, expected: set[TenantState], owner: str) -> bool:
        """Move the tenant to ``to`` (hydrating or archiving) from one of ``expected``, as
        :meth:`transition` does, and note ``owner`` (the process doing it) and the state
        it came from, in the same UPDATE: :meth:`unmark` puts that state back if the work
        fails, and :meth:`recover_marks` if the owner dies."""
        c = TENANTS.c
        allowed = sorted({TenantState(s) for s in expected}, key=lambda s: s.value)
        stmt = (sa.update(TENANTS).where(self._mine, c.name == name, c.state.in_(allowed))
                .values(state=TenantState(to), mark_owner=owner, mark_from=c.state))
        with self._tx(write=True) as s:
            return s.execute(stmt).rowcount == 1

    def claim_new(self, name: str, path: str, host: str, owner: str) -> bool:
        """Insert a tenant the catalogue does not hold yet directly as ``hydrating`` by
        ``owner``; False if a row exists. :meth:`unmark` without a new state deletes it
        again: a hydration that fails leaves no row behind (every unknown name asked for
        once left a permanent ``error`` row, retried every two minutes)."""
        row = self._new_row(name, path, host, _now()) | {"state": TenantState.hydrating, "mark_owner": owner}
        with self._tx(write=True) as s:
            stmt = self._insert().values(row).on_conflict_do_nothing(index_elements=[TENANTS.c.fleet, TENANTS.c.name])
            return len(s.execute(stmt.returning(TENANTS.c.name)).all()) == 1

    def unmark(self, name: str, owner: str, *, error: str | None = None, **finished: Any) -> bool:
        """End ``owner``'s hydration or archival of ``name`` in one write.

        With ``finished`` (``state`` and the columns the work set, e.g. ``txid``,
        ``position``, ``last_sync_at``, ``archived_txid``), those are stored. Without, the
        work is undone: the tenant goes back to the state it was marked from, with
        ``error`` as its ``last_error``; a row :meth:`claim_new` inserted is deleted.
        False if ``owner`` no longer holds the mark (it was recovered as dead)."""
        c = TENANTS.c
        mine = sa.and_(self._mine, c.name == name, c.mark_owner == owner)
        with self._tx(write=True) as s:
            if finished:
                values = dict(finished, mark_owner=None, mark_from=None)
                values["state"] = TenantState(values["state"])
                return s.execute(sa.update(TENANTS).where(mine).values(values)).rowcount == 1
            if s.execute(sa.delete(TENANTS).where(mine, c.mark_from.is_(None))).rowcount:
                return True
            back = sa.update(TENANTS).where(mine).values(state=c.mark_from, mark_owner=None, mark_from=None,
                                                        last_error=error)
            return s.execute(back).rowcount == 1

    def marked(self, host: str) -> list[TenantRecord]:
        """This fleet's tenants of ``host`` in hydrating or archiving (marked by a process, or
        without an owner: left so by a version before marks)."""
        busy = [TenantState.hydrating, TenantState.archiving]
        return self._select(sa.select(*TENANTS.c).where(self._mine, TENANTS.c.host == host,
                                                        TENANTS.c.state.in_(busy)))

    # -- rows from before fleets ----------------------------------------------------

    def adopt(self, items: Iterable[tuple[str, str]]) -> int:
        """Take over rows carried over from before fleets (fleet ``''``) whose name and path
        are these: the tenant keeps its position (no full upload) and, archived, its state.
        A row with another path is not this fleet's tenant and stays where it is. How many
        were adopted (0 at once when the catalogue holds no such row)."""
        c = TENANTS.c
        legacy = c.fleet == ""
        with self._tx(write=True) as s:
            if s.execute(sa.select(c.name).where(legacy).limit(1)).first() is None:
                return 0
            other = TENANTS.alias("other")
            taken = sa.select(other.c.name).where(other.c.fleet == self.fleet, other.c.name == sa.bindparam("n"))
            stmt = (sa.update(TENANTS).where(legacy, c.name == sa.bindparam("n"), c.path == sa.bindparam("p"),
                                             ~sa.exists(taken))
                    .values(fleet=self.fleet))
            return sum(s.execute(stmt, {"n": name, "p": path}).rowcount for name, path in items)

    def import_legacy(self, path: str) -> int:
        """Copy the rows of the SQLite catalogue every fleet shared by default before each
        had its own (``config.LEGACY_CATALOGUE``) into this one, as rows from before fleets:
        :meth:`adopt` then hands each to the fleet whose tenant it is. Rows already here
        are kept. How many were copied."""
        if self.dialect != "sqlite":
            return 0
        columns = [c.name for c in TENANTS.c if c.name not in ("fleet", "mark_owner", "mark_from")]
        listed = ", ".join(columns)
        conn = sqlite3.connect(self.url.database, timeout=30, isolation_level=None)
        try:
            conn.execute("ATTACH DATABASE ? AS legacy", (f"file:{path}?mode=ro",))
            have = {row[1] for row in conn.execute("PRAGMA legacy.table_info(tenants)")}
            if not set(columns) <= have:
                return 0
            only_unowned = " WHERE fleet = ''" if "fleet" in have else ""
            conn.execute("BEGIN IMMEDIATE")
            copied = conn.execute(f"INSERT OR IGNORE INTO main.tenants (fleet, {listed}) "
                                  f"SELECT '', {listed} FROM legacy.tenants{only_unowned}").rowcount
            conn.execute("COMMIT")
            return copied
        except sqlite3.Error as e:
            raise CatalogueError(f"catalogue {path}: cannot carry its rows over: {e}") from e
        finally:
            conn.close()


def open_catalogue(config, **kwargs: Any) -> Catalogue:
    """The catalogue of ``config``'s fleet (``Config.catalogue_url``), scoped to it.

    A fleet's own default catalogue that does not exist yet starts with the rows of the
    catalogue all fleets shared by default before (``config.LEGACY_CATALOGUE``), as rows
    from before fleets, which the fleet adopts by name and path (nothing lost in an
    upgrade: positions, archived tenants)."""
    from .config import LEGACY_CATALOGUE

    url = config.catalogue_url()
    fresh = not config.catalogue and not os.path.exists(make_url(url).database)
    catalogue = Catalogue(url, fleet=config.fleet, **kwargs)
    if fresh and os.path.exists(LEGACY_CATALOGUE):
        catalogue.import_legacy(LEGACY_CATALOGUE)
    return catalogue
