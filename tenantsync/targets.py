"""Restore targets as people write them: a TXID or a point in time.

The command line and the HTTP API take the same spellings, checked here once, before
anything acts on them: a TXID in decimal or the 16 hex digits Litestream prints, a time
in RFC 3339 with a zone. A bad value is an InvalidArgument naming it.
"""

from __future__ import annotations

from datetime import MAXYEAR, datetime, timezone

from .errors import InvalidArgument

MAX_TXID = (1 << 64) - 1


def parse_txid(value: str | int) -> int:
    """``value`` as a TXID: an int, or a string in decimal, ``0x…`` or 16 hex digits."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidArgument(f"{value!r} is not a TXID (decimal or 16 hex digits)", argument="txid")
    number = value
    if isinstance(value, str):
        text = value.strip().lower()
        try:
            number = int(text, 16) if text.startswith("0x") or len(text) == 16 else int(text, 10)
        except ValueError:
            raise InvalidArgument(f"{value!r} is not a TXID (decimal or 16 hex digits)", argument="txid") from None
    if not 1 <= number <= MAX_TXID:
        raise InvalidArgument(f"{value!r} is out of range (TXIDs are 1 to {MAX_TXID})", argument="txid")
    return number


def parse_timestamp(value: str) -> datetime:
    """``value`` (RFC 3339 with a zone, e.g. ``2026-11-25T10:00:00Z``) as a UTC datetime."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{value!r} is not an RFC 3339 time (like 2026-11-25T10:00:00Z)", argument="timestamp")
    try:
        t = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidArgument(f"{value!r} is not an RFC 3339 time (like 2026-11-25T10:00:00Z)", argument="timestamp") from None
    if t.tzinfo is None:
        raise InvalidArgument(f"{value!r} has no time zone (add Z or +00:00)", argument="timestamp")
    return check_timestamp(t, shown=value)


def check_timestamp(t: datetime, *, shown: object = None) -> datetime:
    """An aware datetime ``t`` a restore can aim at, as UTC: library callers' datetimes meet
    the same bounds as the parsed ones (``shown`` is how the caller wrote it)."""
    shown = t if shown is None else shown
    if not isinstance(t, datetime) or t.utcoffset() is None:
        raise InvalidArgument(f"{shown!r} is not a time with a zone (like 2026-11-25T10:00:00Z)", argument="timestamp")
    try:
        t = t.astimezone(timezone.utc)
    except OverflowError:
        t = None
    # Year 9999 too: a restore looks a little past its target, which would overflow.
    if t is None or t.year == MAXYEAR:
        raise InvalidArgument(f"{shown!r} is out of range (in UTC, years 1 to {MAXYEAR - 1})", argument="timestamp")
    return t
