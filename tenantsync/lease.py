"""The per-replica lease: one writer per replica, in Litestream 0.5's format.

The lease is one small JSON object at ``lock.json`` in the replica root, exactly as
Litestream's ``s3.Leaser`` writes it (litestream ``leaser.go``, ``s3/leaser.go``)::

    {"generation":3,"expires_at":"2026-11-25T13:15:23.123456Z","owner":"host:1234"}

- ``generation`` increases by one each time a *different* owner takes the lease over
  (1 for the first one ever) and stays the same while one owner renews it, so it is
  a fencing token: a writer can stamp its work with it and a stale holder is
  recognisable.
- ``expires_at`` is RFC 3339 as Go's ``time.Time`` marshals it (``RFC3339Nano``:
  trailing zeros of the fraction dropped, any zone offset). We write UTC with ``Z``.
- ``owner`` names the holder (Litestream: ``hostname:pid``); Go omits it when empty.

Every change is a conditional write, so the object store arbitrates: creating the
first lease is ``write_if_absent`` (``If-None-Match: *``) and renewing or taking over
is ``write_if_match`` with the etag that was read (``If-Match``). Of several processes
racing for one lease exactly one write succeeds; the others get PreconditionFailed.

Reading: the storage interface has no "read with etag", so the lease is read as
``list`` (for the etag) *then* ``read`` (for the content). In that order the content is
never older than the etag; if the object changed between the two calls, the decision
is made on newer content and the conditional write with the older etag fails, which
is safe. (The one way it could succeed is the object going back to byte-identical
content in between, as S3 etags are content MD5s: that needs a writer whose clock
repeats an earlier microsecond within one generation, i.e. a clock stepped backwards.)

Time and safety. A lease is valid until ``expires_at`` for everyone else (a takeover
needs ``now > expires_at``, Litestream's ``IsExpired``), but its holder only treats it
as held until ``expires_at - margin`` (``Leaser.held``; margin defaults to ttl/5). The
holder must check ``held`` before every write it fences with the lease. This is safe as
long as (clock skew between any two participants) + (time from a ``held`` check to the
end of the write it guards, including process pauses) < margin. ``expires_at`` is
computed from the clock reading taken *before* the conditional write is sent, so write
latency only shortens the holder's own window. Clocks are assumed NTP-synchronised to
well under the margin (seconds for the default 30 s ttl).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone

from .config import Config
from . import metrics
from .errors import LeaseHeld, ObjectNotFound, PreconditionFailed, StorageError
from .layout import LEASE_KEY
from .storage.base import Storage

__all__ = [
    "DEFAULT_TTL", "HeldLease", "Lease", "Leaser", "decode_lease", "default_owner", "encode_lease", "format_time", "parse_time",
]

log = logging.getLogger(__name__)

#: Litestream's ``s3.DefaultLeaseTTL``, the config's ``lease-ttl`` default.
DEFAULT_TTL = Config.lease_ttl


@dataclass(frozen=True)
class Lease:
    """One version of the lease object: who holds it, until when, and the etag of the
    stored version (the ``If-Match`` condition for the next renew or release)."""

    owner: str
    generation: int
    expires_at: datetime
    etag: str
    # Set by ``Leaser.acquire`` when it took the lease over from another owner: who held it.
    taken_from: str = field(default="", compare=False)

    def expired(self, now: datetime) -> bool:
        """True once ``now`` is past ``expires_at``: anyone may take it over then."""
        return now > self.expires_at

    def _same_content(self, other: Lease | None) -> bool:
        return (
            other is not None
            and (other.owner, other.generation, other.expires_at) == (self.owner, self.generation, self.expires_at)
        )


def default_owner() -> str:
    """``hostname:pid``, as Litestream's NewLeaser names its owner. Owners must be
    unique among live processes: two processes with one owner name would both treat
    the lease as theirs (see Leaser.acquire)."""
    host = socket.gethostname()
    return f"{host}:{os.getpid()}" if host else f"pid-{os.getpid()}"


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Leaser:
    """Acquires, renews and releases the lease of the replica rooted at ``storage``.

    ``owner`` identifies this process (unique among live processes, e.g.
    ``default_owner()``). ``ttl`` is how long each write keeps the lease; renew well
    within ``ttl - margin`` (every ttl/3 is customary). ``margin`` (default ttl/5) is
    how long before ``expires_at`` the holder stops trusting its lease (see the module
    doc for the clock-skew assumption). ``clock`` returns the current tz-aware time
    (injectable for tests). A Leaser keeps no state: it is safe to share across threads.
    """

    def __init__(
        self,
        storage: Storage,
        owner: str,
        ttl: timedelta = DEFAULT_TTL,
        clock: Callable[[], datetime] = _utcnow,
        margin: timedelta | None = None,
    ):
        if not owner:
            raise ValueError("lease owner must be a non-empty string")
        if ttl <= timedelta(0):
            raise ValueError(f"lease ttl must be positive, got {ttl}")
        margin = ttl / 5 if margin is None else margin
        if not timedelta(0) <= margin < ttl:
            raise ValueError(f"lease margin must be in [0, ttl={ttl}), got {margin}")
        self.storage = storage
        self.owner = owner
        self.ttl = ttl
        self.margin = margin
        self._clock = clock

    def now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError(f"lease clock must return timezone-aware times, got {now!r}")
        return now.astimezone(timezone.utc)

    # -- acquire / renew / release ------------------------------------------------

    def acquire(self, likely_absent: bool = False, presumed: Lease | None = None) -> Lease:
        """Take the lease and return it, or raise LeaseHeld.

        ``likely_absent`` (the tenant never had a lease: a new one) skips the first read
        and tries to create the object at once: one request instead of three (list, read,
        write) where round trips cost tens of milliseconds. If the object exists after
        all, the write fails and this goes on as below from a fresh read.

        ``presumed`` is the version last seen written (the catalogue's mirror, with its
        etag): if it is ours or has expired, the first read is skipped as well and the
        conditional write goes against its etag, one request for a tenant waking after its
        lease lapsed. A stale guess only costs the failed write and the read it would have
        made anyway; a live lease of another owner is read again rather than believed.

        No lease object: create it (generation 1) with write_if_absent. A lease that
        has expired, or that is already ours (same owner): overwrite it with
        write_if_match on its etag; a takeover from another owner increments the
        generation, our own lease keeps its generation (a renewal). A live lease of
        another owner: LeaseHeld naming the holder and its expiry.

        Losing the conditional write means someone else wrote in between: the lease is
        re-read, and if it now holds exactly what we wrote (our request was retried by
        the client after it had landed) it is ours; if another owner holds it, LeaseHeld;
        otherwise (it is ours under another version, or was released or removed) the
        whole attempt is made once more.
        """
        if presumed is not None and presumed.etag and (presumed.owner == self.owner or presumed.expired(self.now())):
            current: Lease | None = presumed
        else:
            current = None if likely_absent else self.read()
        for _attempt in range(2):
            now = self.now()
            if current is None:
                wanted = Lease(self.owner, 1, now + self.ttl, "")
            elif current.owner == self.owner:
                wanted = Lease(self.owner, current.generation, now + self.ttl, "")
            elif current.expired(now):
                wanted = Lease(self.owner, current.generation + 1, now + self.ttl, "")
            else:
                raise self._held(current)
            data = encode_lease(wanted)
            try:
                if current is None:
                    etag = self.storage.write_if_absent(LEASE_KEY, data)
                else:
                    etag = self.storage.write_if_match(LEASE_KEY, data, current.etag)
            except PreconditionFailed:
                replaced, current = current, self.read()
                if wanted._same_content(current):
                    # Our write landed; a client retry then lost to it. Taken from whoever
                    # held the version it replaced, as if its answer had come.
                    taken = replaced.owner if replaced is not None and replaced.owner != self.owner else ""
                    return replace(current, taken_from=taken)
                if current is not None and current.owner != self.owner and not current.expired(self.now()):
                    raise self._held(current) from None
                continue  # from what was just read
            taken_from = current.owner if current is not None and current.owner != self.owner else ""
            if taken_from:
                metrics.lease_handover()  # taken over after its holder let it expire
            return Lease(wanted.owner, wanted.generation, wanted.expires_at, etag, taken_from)
        if current is not None and current.owner != self.owner:
            raise self._held(current)
        raise LeaseHeld(
            f"{self.storage}: lease contended: lost the conditional write of {LEASE_KEY} twice; retrying later"
        )

    def renew(self, lease: Lease) -> Lease:
        """Extend ``lease`` to now + ttl, keeping its generation; return the new version.

        A conditional write on ``lease.etag``: if the object changed since (taken over
        after we expired, released, removed) we no longer hold the lease and LeaseHeld
        says who does. Renewing a lease that expired but that nobody took over is
        allowed and safe (nobody else can have written in between).
        """
        if lease.owner != self.owner:
            raise ValueError(f"cannot renew a lease of {lease.owner!r} as {self.owner!r}")
        wanted = Lease(self.owner, lease.generation, self.now() + self.ttl, "")
        try:
            etag = self.storage.write_if_match(LEASE_KEY, encode_lease(wanted), lease.etag)
        except PreconditionFailed:
            current = self.read()
            if wanted._same_content(current):
                return current  # our write landed; a client retry then lost to it
            raise self._lost(lease, current) from None
        return Lease(wanted.owner, wanted.generation, wanted.expires_at, etag)

    def release(self, lease: Lease) -> bool:
        """Give the lease up so the next acquirer takes over at once; best effort.

        Litestream deletes the object with ``DeleteObject If-Match``; our storage has
        no conditional delete, and an unconditional one could remove a lease someone
        else has taken over meanwhile. So release *overwrites* the lease, on its etag,
        with a copy that expired one ttl ago (same owner and generation): anyone, a
        Litestream leaser included, sees an expired lease and takes it over with the
        next generation, at once and despite clock skew below one ttl. Returns True if
        released; False if the lease was no longer ours (nothing to release) or the
        store failed (logged; the lease then simply expires at ``expires_at``).
        """
        if lease.owner != self.owner:
            raise ValueError(f"cannot release a lease of {lease.owner!r} as {self.owner!r}")
        expired = Lease(self.owner, lease.generation, self.now() - self.ttl, "")
        try:
            self.storage.write_if_match(LEASE_KEY, encode_lease(expired), lease.etag)
        except PreconditionFailed:
            return False
        except StorageError as e:
            log.warning("%s: release of lease generation %d failed, it expires at %s: %s",
                        self.storage, lease.generation, format_time(lease.expires_at), e)
            return False
        return True

    def held(self, lease: Lease, now: datetime | None = None) -> bool:
        """Whether the holder may still act on ``lease``: ``now < expires_at - margin``.

        Check this immediately before every write fenced by the lease. The margin
        absorbs clock skew and the delay between this check and the write landing
        (see the module doc); a False answer means renew (or re-acquire) first.
        """
        return (self.now() if now is None else now) < lease.expires_at - self.margin

    # -- reading ------------------------------------------------------------------

    def read(self) -> Lease | None:
        """The stored lease with its etag, or None if there is none.

        ``list`` first, then ``read``: the content is then never older than the etag
        (see the module doc). A malformed object raises StorageError rather than being
        overwritten: it may be a newer format's, or a sign of a misconfigured prefix.
        """
        etag = next((o.etag for o in self.storage.list(LEASE_KEY) if o.key == LEASE_KEY), None)
        if etag is None:
            return None
        try:
            data = self.storage.read(LEASE_KEY)
        except ObjectNotFound:
            return None  # removed since it was listed; the conditional write decides
        try:
            generation, expires_at, owner = decode_lease(data)
        except ValueError as e:
            raise StorageError(f"{self.storage}: {LEASE_KEY}: malformed lease object: {e}") from None
        return Lease(owner, generation, expires_at, etag)

    # -- messages -----------------------------------------------------------------

    def _held(self, current: Lease) -> LeaseHeld:
        return LeaseHeld(
            f"{self.storage}: lease held by {current.owner or '(unnamed owner)'} until "
            f"{format_time(current.expires_at, digits=3)}; retrying after it expires",
            owner=current.owner,
            expires_at=current.expires_at,
            generation=current.generation,
        )

    def _lost(self, lease: Lease, current: Lease | None) -> LeaseHeld:
        where = f"{self.storage}: lease generation {lease.generation} lost"
        if current is None:
            return LeaseHeld(f"{where}: {LEASE_KEY} was removed")
        return LeaseHeld(
            f"{where}: now generation {current.generation} held by {current.owner or '(unnamed owner)'} "
            f"until {format_time(current.expires_at, digits=3)}",
            owner=current.owner,
            expires_at=current.expires_at,
            generation=current.generation,
        )


class HeldLease:
    """This process's hold on one replica's lease: the one place a fleet keeps it.

    It owns the ``Leaser``, the current ``Lease`` (None while not held) and whether the
    catalogue's lease columns have seen it: they are written with the tenant's next
    catalogue write (:meth:`unrecorded`), not in a transaction of their own. It outlives
    the tenant's open capture: after an idle release it is kept until the lease expires, so
    a tenant that wakes up within the TTL needs no lease write at once, and one renewal
    later, instead of a release and a new acquisition (two conditional, fsynced writes).

    :meth:`check` is the capture's fence (``capture.fence = held.check``). It refers to
    nothing but the lease, never to the capture: a released capture is freed by reference
    counting, with no cycle for the garbage collector to find.
    """

    __slots__ = ("leaser", "lease", "renewed", "handed_over", "known_generation", "_unrecorded", "_never_held",
                 "_presumed")

    def __init__(self, leaser: Leaser, never_held: bool = False, presumed: Lease | None = None):
        self.leaser = leaser
        self.lease: Lease | None = None
        self._unrecorded = False
        # What the catalogue knows of this tenant's lease: none (its first acquisition
        # creates the object without reading first), or the version last written (the
        # first acquisition writes on its etag): Leaser.acquire's likely_absent, presumed.
        self._never_held = never_held
        self._presumed = presumed
        # Whether the last hold wrote a new version of a lease that stayed ours throughout
        # (same owner, same generation: a takeover always increments it). Nobody else can
        # then have written to the replica, so a position recorded under it still stands.
        self.renewed = False
        # Whether a hold took the lease over from another owner, who may have written the
        # replica since this process's position, and the fleet has not checked yet (it fences
        # the tenant if so, or clears this). Kept across holds: a check that failed (the store
        # did not answer) is made again by the next pass, before anything is uploaded.
        self.handed_over = False
        # The newest generation this process knows its host held (held here, or recorded
        # in the catalogue): another owner's lease of a newer one was taken over from it.
        self.known_generation = presumed.generation if presumed is not None and presumed.owner == leaser.owner else 0

    def hold(self) -> None:
        """Take the lease, or renew it once half its TTL has passed (well inside the
        margin ``held`` keeps); raise LeaseHeld, and hold nothing, if another owner has it."""
        self.renewed = False
        lease = self.lease
        if lease is not None and self.leaser.now() < lease.expires_at - self.leaser.ttl / 2:
            return
        presumed, self._presumed = self._presumed, None
        before = lease or presumed
        try:
            if lease is not None:
                self.lease = self.leaser.renew(lease)
            else:
                likely_absent, self._never_held = self._never_held, False
                self.lease = self.leaser.acquire(likely_absent=likely_absent, presumed=presumed)
        except LeaseHeld:
            self.lease = None
            raise
        self.renewed = (before is not None and before.owner == self.lease.owner
                        and before.generation == self.lease.generation)
        self.handed_over = self.handed_over or bool(self.lease.taken_from)
        self.known_generation = max(self.known_generation, self.lease.generation)
        self._unrecorded = True

    def taken_over(self, error: LeaseHeld) -> bool:
        """Whether ``error`` (from :meth:`hold`) says another owner holds a generation newer
        than any this host held: the lease was taken over from it while it was gone or cut
        off (or, never held here, another host replicates a tenant of that name)."""
        return (error.owner not in (None, self.leaser.owner) and error.generation is not None
                and error.generation > self.known_generation)

    def held(self) -> bool:
        """Whether a write fenced by the lease may go ahead now (``Leaser.held``)."""
        return self.lease is not None and self.leaser.held(self.lease)

    def check(self) -> None:
        """The fence, run before every upload and before a checkpoint copies frames not
        yet shipped: a process paused after :meth:`hold`, or releasing a tenant whose
        lease has passed to another host, must not write (nor let the WAL restart). A
        clock comparison, no I/O: it also runs under the checkpoint barrier."""
        if self.lease is None:
            metrics.fence_refusal()
            raise LeaseHeld(f"{self.leaser.storage}: lease not held by this process")
        if not self.leaser.held(self.lease):
            metrics.fence_refusal()
            raise LeaseHeld(f"{self.leaser.storage}: lease generation {self.lease.generation} no longer held")

    def expired(self) -> bool:
        """Nothing left worth keeping: no lease, or one past its expiry."""
        return self.lease is None or self.lease.expired(self.leaser.now())

    def unrecorded(self) -> tuple[str, datetime, int, str] | None:
        """The lease columns (holder, expiry, generation, etag) for the tenant's next
        catalogue write, once per lease taken or renewed; None when the catalogue has them."""
        if not self._unrecorded or self.lease is None:
            return None
        self._unrecorded = False
        return self.lease.owner, self.lease.expires_at, self.lease.generation, self.lease.etag

    def give_up(self) -> tuple[None, None, int, None] | None:
        """Release the lease so the next acquirer takes over at once (a shutdown, an
        archival); the lease columns that say so, for the tenant's catalogue write, or None
        if nothing was held."""
        lease, self.lease = self.lease, None
        if lease is None:
            return None
        self.leaser.release(lease)
        return None, None, lease.generation, None


# -- the lease object's format -----------------------------------------------------


def encode_lease(lease: Lease) -> bytes:
    """The object's bytes, as Go's ``json.Marshal(litestream.Lease)`` lays them out."""
    fields: dict[str, object] = {"generation": lease.generation, "expires_at": format_time(lease.expires_at)}
    if lease.owner:  # `json:"owner,omitempty"`
        fields["owner"] = lease.owner
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()


def decode_lease(data: bytes) -> tuple[int, datetime, str]:
    """``(generation, expires_at, owner)`` of a lease object; ValueError if malformed.
    Unknown fields are ignored, as Go's decoder does; a missing owner is empty."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    generation = obj.get("generation", 0)
    if not isinstance(generation, int) or isinstance(generation, bool) or not 0 <= generation < 1 << 63:
        raise ValueError(f"generation {generation!r} is not a non-negative int64")
    expires_at = obj.get("expires_at")
    if not isinstance(expires_at, str):
        raise ValueError(f"expires_at {expires_at!r} is not an RFC 3339 string")
    owner = obj.get("owner") or ""
    if not isinstance(owner, str):
        raise ValueError(f"owner {owner!r} is not a string")
    return generation, parse_time(expires_at), owner


_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)


def parse_time(text: str) -> datetime:
    """Parse RFC 3339 as Go writes it (``RFC3339Nano``: 0–9 fraction digits, ``Z`` or
    ``±hh:mm``) into a UTC datetime. Nanoseconds are truncated to microseconds."""
    m = _RFC3339.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r} is not an RFC 3339 time")
    year, month, day, hour, minute, second = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    micro = int((m.group(7) or "").ljust(6, "0")[:6])
    if m.group(8):
        tz = timezone.utc
    else:
        offset = timedelta(hours=int(m.group(10)), minutes=int(m.group(11)))
        if offset >= timedelta(hours=24):
            raise ValueError(f"{text!r}: zone offset out of range")
        tz = timezone(-offset if m.group(9) == "-" else offset)
    try:
        return datetime(year, month, day, hour, minute, second, micro, tzinfo=tz).astimezone(timezone.utc)
    except (ValueError, OverflowError) as e:
        raise ValueError(f"{text!r} is not a valid time: {e}") from None


def format_time(t: datetime, digits: int = 6) -> str:
    """RFC 3339 in UTC as Go's ``RFC3339Nano`` formats it: the fraction (at most
    ``digits`` digits, truncated) loses its trailing zeros and is left out when zero."""
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"time must be timezone-aware, got {t!r}")
    t = t.astimezone(timezone.utc)
    frac = f"{t.microsecond:06d}"[:digits].rstrip("0")
    text = f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}"
    return text + (f".{frac}" if frac else "") + "Z"
