"""The tenant catalogue: one row per tenant database, in SQLite or PostgreSQL.

Embedded mode keeps it in a SQLite file beside the host's state (``sqlite:///PATH``);
fleet mode shares one PostgreSQL database between several hosts
(``postgresql+psycopg://USER@HOST/DB``; a bare ``postgresql://`` means psycopg 3 too).
Each row holds what a job needs to pick a tenant up in any process: its path and
owning host, its lifecycle state, the capture position and the times of its last write,
sync, compaction and snapshot, so schedulers only look at tenants that changed.

Rules every part of the catalogue keeps:

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

The catalogue's parts, each in its own module, all imported from here:

- ``catalogue_schema``: the table, ``TenantRecord``, ``TenantState``, the errors;
- ``catalogue_engine``: connecting (SQLite pragmas, the host's write lock, PostgreSQL);
- ``catalogue_migrations``: the schema brought to head on open (Alembic);
- ``catalogue_reads``, ``catalogue_marks``, ``catalogue_legacy``: the queries, the
  hydration/archival marks and rows from before fleets, mixed into ``Catalogue``;
- this module: ``Catalogue`` itself (transactions, discovery, the writes of sync passes)
  and ``open_catalogue``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, make_url

from .catalogue_engine import _normalise_url, open_engine
from .catalogue_legacy import LegacyRows
from .catalogue_marks import Marks
from .catalogue_migrations import SCHEMA_HEAD, VERSION_TABLE, alembic_config, upgrade_to_head
from .catalogue_reads import CatalogueReads
from .catalogue_fenced import FencedCopies, FencedCopy
from .catalogue_hosts import Hosts
from .errors import CatalogueUnavailable
from .catalogue_schema import (_BY_NAME, MARKED, METADATA, TENANTS, CatalogueError, TenantRecord, TenantState,
                               UnknownTenant, _chunks, _now, _states, _utc)

__all__ = [
    "MARKED",
    "METADATA",
    "SCHEMA_HEAD",
    "VERSION_TABLE",
    "Catalogue",
    "CatalogueError",
    "FencedCopy",
    "TenantRecord",
    "TenantState",
    "UnknownTenant",
    "alembic_config",
    "open_catalogue",
]

# Tenants per statement in discover_many (bounds the memory of one statement).
_BULK_ROWS = 5000


# The states a sync may move a tenant between. The others belong to a hydration, an
# archival or a freeze (mark / unmark), which a sync in another process, racing it, must not undo.
REPLICATED = (TenantState.active, TenantState.idle, TenantState.error)


@functools.cache
def _sync_statement(with_at: bool, with_lease: bool, with_state: bool) -> sa.Update:
    """record_sync's one UPDATE, built once per variant: building it per call (CASE
    clauses, coercions) cost as much as executing it. One statement, because the host's
    catalogue write lock is held while it runs and every sync on the host queues on it.
    The new state is the caller's; the CASE only keeps a hydration's or archival's mark."""
    c = TENANTS.c

    def param(key: str, column: sa.Column) -> sa.BindParameter:
        return sa.bindparam("b_" + key, type_=column.type)  # column names are reserved in SET

    txid = param("txid", c.txid)
    newer = sa.or_(c.txid.is_(None), c.txid <= txid)
    values: dict[str, Any] = {
        "txid": sa.case((newer, txid), else_=c.txid),
        "position": sa.case((newer, param("position", c.position)), else_=c.position),
        "last_sync_at": param("at", c.last_sync_at) if with_at else c.last_sync_at,
        "shipped_at": param("at", c.shipped_at) if with_at else c.shipped_at,
        "pending_since": _still_pending(param("at", c.pending_since)) if with_at else c.pending_since,
        "bytes_stored": c.bytes_stored + param("bytes_added", c.bytes_stored),
        "last_error": None,
        "wal_bytes": param("wal_bytes", c.wal_bytes),
    }
    if with_lease:
        values |= {k: param(k, c[k]) for k in ("lease_holder", "lease_expires_at", "generation", "lease_etag")}
    if with_state:
        values["state"] = sa.case((c.state.in_(REPLICATED), param("state", c.state)), else_=c.state)
    return sa.update(TENANTS).where(c.fleet == param("fleet", c.fleet), c.name == param("name", c.name)).values(values)


def _still_pending(started: sa.ColumnElement) -> sa.Case:
    """``pending_since`` after a pass that ``started``: a pass reads the WAL after it starts,
    so every write recorded before then is shipped (None); a write recorded since is still
    pending, and has waited at most since the pass started."""
    c = TENANTS.c
    later = sa.case((sa.or_(c.pending_since.is_(None), c.pending_since < started), started), else_=c.pending_since)
    return sa.case((c.last_write_at > started, later), else_=None)


def _forget_pool(ref: "weakref.ref[Catalogue]") -> None:
    catalogue = ref()
    if catalogue is not None:
        catalogue.engine.dispose(close=False)
        catalogue._write_lock = threading.RLock()  # a thread of the parent may have held it
        if catalogue._writers is not None:
            catalogue._writers.forget()


class Catalogue(CatalogueReads, Marks, LegacyRows, FencedCopies, Hosts):
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
        self.engine, self._writers = open_engine(self.url, busy_timeout, engine_kwargs)
        self._write_lock = threading.RLock()
        # A forked child (Celery prefork) must not reuse the parent's pooled connections:
        # it forgets them without closing them, and opens its own.
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _forget_pool(ref))
        if migrate:
            try:
                upgrade_to_head(self.engine, self.dialect, repr(self))
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

    # -- transactions -----------------------------------------------------------

    @contextmanager
    def _tx(self, write: bool) -> Iterator[sa.Connection]:
        """A transaction. A database that cannot be reached, or drops the connection
        during it, raises CatalogueUnavailable (one line, and a transient failure for the
        jobs): the transaction did not commit."""
        try:
            with self._transaction(write) as conn:
                yield conn
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as e:
            if self.dialect == "sqlite" and not e.connection_invalidated:
                raise  # a local file's error (locked, corrupt, full) is not an outage
            reason = str(e.orig).strip().splitlines()[0] if e.orig is not None else type(e).__name__
            raise CatalogueUnavailable(f"catalogue {self.url.render_as_string(hide_password=True)}: {reason}") from e

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[sa.Connection]:
        # Core connections, not ORM sessions: a session's bookkeeping would be a large
        # share of every sync's catalogue time, and no caller needs an identity map.
        if not (write and self.dialect == "sqlite"):
            with self.engine.begin() as conn:
                yield conn
            return
        # This process's writers queue on a lock first: waiting in SQLite's busy handler
        # sleeps 1, 2, 5, 10 ms ... between tries, so with a few job threads most of a
        # sync's time would go to sleeping while the write lock is free.
        # The busy handler is then only for other processes.
        with self._write_lock, self._writers or contextlib.nullcontext(), self.engine.connect() as conn:
            conn.execution_options(tenantsync_begin="IMMEDIATE")
            with conn.begin():
                yield conn

    def _insert(self):
        return self._dialect_insert(TENANTS)

    def _dialect_insert(self, table: sa.Table):
        """An INSERT with this dialect's ON CONFLICT clauses."""
        insert = pg_dialect.insert if self.dialect == "postgresql" else sqlite_dialect.insert
        return insert(table)

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
        """… ON CONFLICT (fleet, name) DO UPDATE path WHERE the host is the same and the
        path changed.

        A new tenant is inserted idle; an existing one keeps its state, TXID, position
        and times, and its row is only written when the same host found it at another
        path. Discovery never moves a tenant to another host: in a catalogue that hosts
        share, a file of the same name on a second host is a copy (a host back after its
        tenants failed over, or a name two hosts both use), and taking the row would hand
        it the other host's position, as if that were its own. Its sync fences it
        instead (``Fleet.sync``); a tenant moves between hosts by hydration only."""
        ex = stmt.excluded
        return stmt.on_conflict_do_update(
            index_elements=[TENANTS.c.fleet, TENANTS.c.name],
            set_={"path": ex.path, "updated_at": ex.updated_at},
            where=sa.and_(TENANTS.c.host == ex.host, TENANTS.c.path != ex.path),
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

        Missing: inserted with state idle. Present: its path is updated if ``host`` is its
        host and the path changed (see ``_on_conflict``); state, TXID, position and every
        time are left as they are. Returns the row, whichever host it is of."""
        with self._tx(write=True) as s:
            self._adopt(s, [(name, path)])
            s.execute(self._on_conflict(self._insert()), self._new_row(name, path, host, _now()))
            return TenantRecord(*s.execute(_BY_NAME, {"fleet": self.fleet, "name": name}).one())

    def discover_many(self, items: Iterable[tuple[str, str]], host: str) -> int:
        """``discover()`` for many ``(name, path)`` pairs on ``host``, in one transaction
        of ``INSERT … ON CONFLICT`` statements (same rule as ``discover``).

        SQLite: one statement executed for every row (SQLAlchemy batches them into
        multi-row INSERTs). PostgreSQL: ``INSERT … SELECT FROM unnest(names, paths)``,
        two array parameters per statement, which spares the driver from parsing
        thousands of placeholders.

        Returns how many rows were written: tenants inserted plus this host's tenants
        whose path changed (0 when everything was already known as given). A name given twice
        takes its last path. Rows are written in name order, so two hosts discovering
        overlapping sets at once cannot deadlock on PostgreSQL."""
        now = _now()
        latest = dict(items)
        names = sorted(latest)  # one lock order for every writer (see above)
        written = 0
        with self._tx(write=True) as s:
            self._adopt(s, [(n, latest[n]) for n in names])
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
        lease: tuple[str | None, datetime | None, int, str | None] | None = None,
        wal_bytes: int | None = None,
    ) -> None:
        """A sync pass shipped up to ``txid``: store it with the capture ``position``, add
        ``bytes_added`` to ``bytes_stored``, clear ``last_error`` and move the tenant to
        ``state``, all in one transaction. The caller decides ``state`` from what the pass
        did (active after shipping, idle after a release, None for no change within an
        archival); it is applied only from a REPLICATED state, never over a hydration's or
        archival's mark. ``lease`` (holder, expiry, generation, etag) also does
        :meth:`record_lease`. ``wal_bytes`` is the WAL's size after the pass. ``at``, when
        the pass started, becomes both ``last_sync_at`` and ``shipped_at`` (what the
        schedule picks tenants to compact by); ``at=None`` stores the position only
        (nothing was shipped).

        The TXID and position never move backwards: two processes of one host may both
        sync a tenant, and the slower one must not overwrite the newer position."""
        values: dict[str, Any] = {"fleet": self.fleet, "name": name, "txid": txid, "position": position,
                                  "bytes_added": bytes_added, "wal_bytes": wal_bytes}
        if at is not None:
            values["at"] = _utc(at, "at")
        if state is not None:
            values["state"] = TenantState(state)
        if lease is not None:
            values |= self._lease_values(*lease)
        self._update_row(name, _sync_statement(at is not None, lease is not None, state is not None),
                         {"b_" + k: v for k, v in values.items()})

    def record_caught_up(self, name: str, at: datetime) -> None:
        """A pass found nothing to ship at ``at``: the replica is current. ``last_sync_at``
        moves (forward); a tenant in ``error`` is active again, its error cleared (a failed
        pass, a lease renewal the store dropped, had left nothing unshipped: else this pass
        would have shipped it, not found nothing); position and other states stay."""
        c = TENANTS.c
        at = _utc(at, "at")
        failed = c.state == TenantState.error
        self._update(name, {"last_sync_at": sa.case((sa.or_(c.last_sync_at.is_(None), c.last_sync_at < at),
                                                     sa.literal(at, c.last_sync_at.type)), else_=c.last_sync_at),
                            "pending_since": _still_pending(sa.literal(at, c.pending_since.type)),
                            "state": sa.case((failed, sa.literal(TenantState.active, c.state.type)), else_=c.state),
                            "last_error": sa.case((failed, sa.null()), else_=c.last_error)})

    def record_writes(self, names: Iterable[str], at: datetime, host: str | None = None,
                      since: datetime | None = None) -> None:
        """These tenants' databases were written at ``at`` (one batch of the watcher's
        events, one transaction; with ``since``, writes from then until ``at``, seen while
        the catalogue did not answer). Only moves ``last_write_at`` forward, so events
        handled out of order cannot make a tenant look older, and sets ``pending_since``
        (to ``since``) unless it is set or a pass started since ``at`` (it read the WAL
        after it started, so it shipped these writes: a batch recorded after that pass's
        own write must not leave the tenant pending, looking ever more behind, with
        nothing left to ship); names not in the catalogue are ignored (a file that
        vanished between the event and this call), as are, given ``host``, other hosts'
        tenants (writes to a copy fenced here)."""
        names = sorted(set(names))
        if not names:
            return
        at = _utc(at, "at")
        since = at if since is None else min(_utc(since, "since"), at)
        c = TENANTS.c
        col, pending = c.last_write_at, c.pending_since
        later = sa.case((sa.or_(col.is_(None), col < at), sa.literal(at, col.type)), else_=col)
        unshipped = sa.and_(pending.is_(None), sa.or_(c.last_sync_at.is_(None), c.last_sync_at < at))
        first = sa.case((unshipped, sa.literal(since, pending.type)), else_=pending)
        with self._tx(write=True) as s:
            for chunk in _chunks(names):
                rows = sa.update(TENANTS).where(self._mine, TENANTS.c.name.in_(chunk))
                if host is not None:
                    rows = rows.where(TENANTS.c.host == host)
                s.execute(rows.values(last_write_at=later, pending_since=first))

    def record_error(self, name: str, message: str, wal_bytes: int | None = None) -> None:
        """An operation failed: state error, ``last_error`` = ``message``, and the WAL's
        size if the caller knows it (a failed sync: what the outage holds on disk)."""
        values: dict[str, Any] = {"state": TenantState.error, "last_error": message}
        if wal_bytes is not None:
            values["wal_bytes"] = wal_bytes
        self._update(name, values)

    def record_shredded(self, name: str, at: datetime) -> None:
        """The tenant was erased (keys.shred): state shredded, ``last_error`` says when."""
        self._update(name, {"state": TenantState.shredded,
                            "last_error": f"shredded at {at.isoformat(timespec='seconds')}"})

    def record_lease(self, name: str, holder: str | None, expires_at: datetime | None, generation: int,
                     etag: str | None = None) -> None:
        """Mirror of the tenant's lease (the lease itself lives in object storage), with
        the etag of the version written, if known."""
        self._update(name, self._lease_values(holder, expires_at, generation, etag))

    @staticmethod
    def _lease_values(holder: str | None, expires_at: datetime | None, generation: int,
                      etag: str | None = None) -> dict[str, Any]:
        return {
            "lease_holder": holder,
            "lease_expires_at": None if expires_at is None else _utc(expires_at, "expires_at"),
            "generation": generation,
            "lease_etag": etag,
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
            allowed = _states(expected)
            if not allowed:
                return False
            stmt = stmt.where(TENANTS.c.state.in_(allowed))
        with self._tx(write=True) as s:
            return s.execute(stmt).rowcount == 1


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
