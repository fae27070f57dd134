"""What one job did to one tenant: the typed outcomes every job returns.

A job (sync, compact, snapshot, retain, archive, freeze, hydrate, fork) returns exactly one
outcome per tenant, and the runtimes (the embedded dispatcher, the Celery tasks, the CLI,
the HTTP API) decide what comes next from its type alone: a ``Contended`` tenant is
offered again after ``retry_after``, a ``Failed`` one with a transient error is retried
with backoff, everything else is done. Nothing above the jobs reads a dict key or a
message's text to tell outcomes apart.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields

from .errors import CatalogueUnavailable, StorageUnavailable, WorkerDied


class Skip(enum.Enum):
    """Why a job did nothing, by design rather than by failure."""

    NOT_REPLICABLE = "unknown, archived, hydrating or being archived: that job ships it"
    NOTHING_TO_WRITE = "not due yet, or nothing new to merge"
    IN_USE = "in use by the application or another process"
    ALREADY_ARCHIVED = "already archived"
    ALREADY_FROZEN = "already frozen"
    NOT_ARCHIVED = "not archived: only archived tenants are frozen"
    FENCED = "fenced: another host took it over; this host's copy is kept aside, never uploaded"
    GONE = "its file is not on this host (deleted, or moved away): nothing to ship; hydrate brings it back"
    HOST_BACK = "its host is alive again, or the tenant moved: the failover is not needed"


class Full(enum.Enum):
    """Why an L0 file carries every page of the database instead of the WAL's frames:
    the pass could not prove that the WAL still continues the position (see
    ``tenantsync.continuity``). The value is the text for logs and reports."""

    FIRST = "the replica holds nothing yet: the first sync of this database"
    FILE_REPLACED = "the database file was replaced (another inode at its path)"
    NO_WAL_POSITION = "the replica's newest file names no WAL position (compacted, or written elsewhere)"
    WAL_TRUNCATED = "the WAL was truncated by another process after our checkpoint"
    WAL_RESTARTED = "the WAL was restarted by another process past frames not yet shipped"
    WAL_SHORTENED = "the WAL is shorter than the position (truncated or replaced)"
    WAL_REPLACED = "the WAL's frames at the position are not the ones last shipped"
    PAGE_SIZE_CHANGED = "the WAL's page size differs from the position's"
    WAL_CEILING = "the WAL passed wal-ceiling while the store failed and was checkpointed unshipped"


class Contention(enum.Enum):
    """Why a sync shipped nothing for now: another writer holds the tenant."""

    LEASE_HELD = "another host holds the tenant's lease"
    TXID_TAKEN = "another process wrote the next TXID first"


@dataclass(frozen=True)
class Shipped:
    """A sync uploaded an L0 file; ``full`` says why it holds every page, if it does."""

    tenant: str
    txid: int
    pages: int
    bytes: int
    full: Full | None = None


@dataclass(frozen=True)
class NothingNew:
    """A sync found nothing committed since the tenant's position."""

    tenant: str


@dataclass(frozen=True)
class Contended:
    """Nothing shipped because another writer holds the tenant; try again after ``retry_after`` s."""

    tenant: str
    why: Contention
    retry_after: float
    detail: str = ""


@dataclass(frozen=True)
class Skipped:
    """The job did nothing, by design (``reason``)."""

    tenant: str
    reason: Skip
    detail: str = ""

    def __str__(self) -> str:
        """One line for a person: the detail if there is one, else the reason."""
        return self.detail or f"tenant {self.tenant}: {self.reason.value}"


@dataclass(frozen=True)
class Failed:
    """The job raised ``error``; ``transient`` errors (storage unreachable) are worth a retry."""

    tenant: str
    error: BaseException
    transient: bool = False


@dataclass(frozen=True)
class Written:
    """A storage job (compact, snapshot) wrote ``file`` to the replica."""

    tenant: str
    job: str
    file: str
    level: int | None = None


@dataclass(frozen=True)
class Deleted:
    """Retention deleted ``count`` files of the tenant's replica."""

    tenant: str
    count: int


@dataclass(frozen=True)
class Archived:
    """The tenant's local files (``freed`` bytes) are gone; its replica holds it up to ``txid``."""

    tenant: str
    txid: int
    freed: int


@dataclass(frozen=True)
class Frozen:
    """The tenant's replica is one bundle object (``key``, ``bytes``) of its state at ``txid``;
    its LTX files are gone."""

    tenant: str
    txid: int
    key: str
    bytes: int


@dataclass(frozen=True)
class Hydrated:
    """The tenant is local at ``path`` as of ``txid``; ``restored`` if it was fetched (False:
    it was local and replicated already). ``moved_aside`` is where a file found at ``path``
    that was not the replica's database went."""

    tenant: str
    path: str
    txid: int
    restored: bool
    moved_aside: str | None = None


Outcome = Shipped | NothingNew | Contended | Skipped | Failed | Written | Deleted | Archived | Frozen | Hydrated


def as_dict(outcome: Outcome) -> dict:
    """The outcome as JSON-ready fields, ``outcome`` naming its type (enums by member name,
    an error as its type and message): for results that cross a JSON serializer (Celery's)."""
    out: dict = {"outcome": type(outcome).__name__}
    for f in fields(outcome):
        value = getattr(outcome, f.name)
        if isinstance(value, enum.Enum):
            value = value.name.lower()
        elif isinstance(value, BaseException):
            value = f"{type(value).__name__}: {value}"
        out[f.name] = value
    return out


def failed(tenant: str, error: BaseException) -> Failed:
    """A job's exception as its outcome: storage or a catalogue that cannot be reached, or
    a process that died under the job (its commits would otherwise wait for the next
    write), is worth a retry."""
    return Failed(tenant, error, transient=isinstance(error, (StorageUnavailable, CatalogueUnavailable, WorkerDied)))


# The enum-valued fields, for reading ``as_dict``'s member names back.
_ENUMS = {"full": Full, "why": Contention, "reason": Skip}
# The outcomes that cross the broker, by ``as_dict``'s ``outcome`` (not Failed: see from_dict).
_KINDS = {cls.__name__: cls for cls in (Shipped, NothingNew, Contended, Skipped, Written, Deleted, Archived, Frozen,
                                              Hydrated)}


def from_dict(data: dict) -> Outcome:
    """The outcome ``as_dict`` wrote (a job's result back from the broker). A ``Failed``
    outcome does not cross: a failed job raises its error, which Celery carries itself."""
    cls = _KINDS[data["outcome"]]
    values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
    for name, kind in _ENUMS.items():
        if values.get(name) is not None:
            values[name] = kind[values[name].upper()]
    return cls(**values)
