"""What the tenant catalogue holds: the ``tenants`` table, its row as ``TenantRecord``, the
lifecycle ``TenantState``, and the errors a catalogue raises.

Its own module because every other part of the catalogue (engine, migrations, reads,
writes, marks) and Alembic's ``env.py`` build on these definitions and on nothing else of
each other; import the public names from ``tenantsync.catalogue``. The table is SQLAlchemy
Core, and the datetime type stores UTC the same way on SQLite and PostgreSQL.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa

from .errors import TenantSyncError

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

    Entered: by a sync that shipped (``record_sync(state=active)``); from ``hydrating``
    once the restored database is in place (``unmark(state=active)``, one write).
    Left: for ``idle`` when a fleet process releases it (``record_sync(state=idle)``), for
    ``archiving`` when it is retired (``mark``), for ``error`` on a failure (``record_error()``).
    """

    idle = "idle"
    """Known and local, but not written lately: it holds no file descriptor, connection
    or worker; only this row.

    Entered: on discovery (``discover()`` inserts every new tenant as idle); when a fleet
    process releases it.
    Left: for ``active`` on its next successful sync; for ``archiving`` when retired.
    """

    archiving = "archiving"
    """A final sync and snapshot are being shipped before the local file is removed.

    Entered: from ``active`` or ``idle`` by ``mark``, by exactly one process, which is
    noted with the state it came from.
    Left: for ``archived`` once the snapshot is stored and the local file is gone
    (``unmark(state=archived)``); back to the state it came from if anything fails, or if
    the marking process died (``OnDemand.recover``).
    """

    archived = "archived"
    """Only the replica holds the database; no local file. ``archived_txid`` records the
    TXID the replica ends at, which a later hydration must reach.

    Entered: from ``archiving``.
    Left: for ``hydrating`` when the tenant is needed again, or for ``freezing`` once it
    has been archived for its ``cold-after``, by exactly one process (``mark`` is a
    compare-and-set: two processes racing from archived cannot both win).
    """

    hydrating = "hydrating"
    """The database is being restored from the replica to its local path.

    Entered: from ``archived`` (or any local state, for a restore to a point in time) by
    ``mark``, or for a name the catalogue does not hold by ``claim_new``.
    Left: for ``active`` once restored and verified (``unmark``, one write); back to the
    state it came from if the restore fails or its process died.
    """

    error = "error"
    """The last operation on the tenant failed; ``last_error`` says why.

    Entered: from a local state by ``record_error()``.
    Left: for ``active`` by the next sync that ships (``record_sync()``, which clears
    ``last_error``).
    """

    freezing = "freezing"
    """Its replica is being turned into one bundle (cold.py), by exactly one process of the
    tenant's host, noted as for archiving.

    Entered: from ``archived`` by ``mark`` (a freeze job: ``cold-after`` or ``tenantsync freeze``).
    Left: for ``frozen`` once the bundle verified and the LTX files are gone; back to
    ``archived`` if anything fails, or if the marking process died (``OnDemand.recover``).
    A hydration waits for it: the freeze deletes the LTX files the restore would read.
    """

    frozen = "frozen"
    """Archived, with the replica held as one bundle object instead of LTX levels: no point
    in time before the bundle's TXID can be restored any more.

    Entered: from ``freezing``.
    Left: for ``hydrating`` when the tenant is needed again (the hydration thaws the bundle
    back into a level-9 snapshot first).
    """

    shredded = "shredded"
    """Erased on purpose (``tenantsync shred``): its wrapped data key and its replica were
    deleted, so nothing sealed under that key can be read again. The row stays as the
    record of it (``last_error`` says when).

    Entered: from any state but hydrating and archiving, with no local database left.
    Left: never; hydrating or syncing the name is refused.
    """


# The states one process holds a tenant in while it works on it (catalogue_marks.Marks).
MARKED = (TenantState.hydrating, TenantState.archiving, TenantState.freezing)


def _states(states) -> list[TenantState]:
    """``states`` (members or their values) as TenantStates in one order, so a statement
    naming them renders the same SQL whatever order the caller's set iterates in."""
    return sorted({TenantState(s) for s in states}, key=lambda s: s.value)


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
# unimported keeps its memory out of every process. The schema is created by migration 0001,
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
    # mark left by a process that died is undone (OnDemand.recover).
    sa.Column("mark_owner", sa.String(255)),
    sa.Column("mark_from", sa.String(16)),
    sa.Column("created_at", UTCDateTime, nullable=False, default=_now),
    sa.Column("updated_at", UTCDateTime, nullable=False, default=_now, onupdate=_now),
    # Bytes in the tenant's -wal file after its last sync attempt: it grows while the store
    # fails (the read mark keeps every unshipped frame), so an outage's cost on disk shows.
    sa.Column("wal_bytes", sa.BigInteger),
    # When a sync last added files to the replica: periodic compaction, snapshots and
    # retention can only have work for tenants that shipped since their previous run, so
    # they pick tenants by this, not by last_sync_at, which a pass finding nothing new
    # also moves (an idle tenant must cost no request).
    sa.Column("shipped_at", UTCDateTime),
    # The etag of the lease object this catalogue last saw written (with lease_holder,
    # lease_expires_at, generation): a tenant woken after its lease lapsed renews it with
    # one conditional PUT on it, instead of reading the object first.
    sa.Column("lease_etag", sa.String(255)),
    # Since when the tenant has had writes its replica does not hold (the first write
    # recorded after a pass); None when it is current. Lag is measured from it.
    sa.Column("pending_since", UTCDateTime),
    sa.Index("ix_tenants_fleet_host_state", "fleet", "host", "state"),
    sa.Index("ix_tenants_fleet_last_write_at", "fleet", "last_write_at"),
    sa.Index("ix_tenants_fleet_shipped_at", "fleet", "shipped_at"),
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
    wal_bytes: int | None
    shipped_at: datetime | None
    lease_etag: str | None
    pending_since: datetime | None


def lag_seconds(pending_since: datetime | None, now: datetime) -> float:
    """How long a tenant's oldest write not in its replica has waited: 0 when none is pending."""
    return 0.0 if pending_since is None else max(0.0, (now - pending_since).total_seconds())


_RECORD_FIELDS = tuple(f.name for f in fields(TenantRecord))
# Records are built from rows positionally.
assert tuple(TENANTS.c.keys()) == _RECORD_FIELDS, "TenantRecord fields must follow the table's columns"
_BY_NAME = sa.select(*TENANTS.c).where(TENANTS.c.fleet == sa.bindparam("fleet"), TENANTS.c.name == sa.bindparam("name"))
