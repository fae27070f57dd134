"""The continuity proof: does the WAL on disk still continue our position?

A pass may ship only the WAL's frames past the position if nothing between the position
and those frames can have been lost: the WAL is the generation we read (same salts, the
frame at the position carries the checksum we ended on), or it was restarted only after
our own checkpoint copied every shipped frame into the main file and nobody has written
the main file since (its stat is unchanged, or our read mark was held the whole time).
Anything else (another process's checkpoint restarted or truncated the WAL, the file was
swapped) breaks the proof, and the pass writes a full-page L0 instead of leaving a gap.

These functions read two headers and at most one frame header; none opens SQLite, so
``may_have_news`` can judge an idle tenant without touching its ``-wal`` file.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from . import wal as walmod
from .errors import TenantSyncError
from .outcome import Full
from .position import DBStat, Position


@dataclass(frozen=True)
class Resume:
    """Incremental capture goes on at WAL ``offset``, where the running checksum is ``checksum``."""

    offset: int
    checksum: tuple[int, int]


@dataclass(frozen=True)
class InMainFile:
    """There is no WAL and every shipped frame is in the unchanged main file: nothing is new."""


@dataclass(frozen=True)
class Broken:
    """The WAL does not continue the position (``why``): only a full-page L0 is safe."""

    why: Full


Continuity = Resume | InMainFile | Broken


def continuity(pos: Position, header: walmod.WALHeader | None, wal_size: int, wal_path: str,
               db_path: str, held: bool) -> Continuity:
    """Whether and where the WAL (``header`` and ``wal_size`` as just read) continues ``pos``.

    ``held`` is true while our read mark has been held without a gap since the position
    was set: nobody can then have checkpointed past it, so the main file's stat need not
    be taken.
    """
    if pos.wal_offset == 0 and not pos.backfilled:
        return Broken(Full.NO_WAL_POSITION)
    if header is None:
        if backfill_holds(pos, db_path, held):
            return InMainFile()
        return Broken(Full.WAL_TRUNCATED)
    if header.page_size != pos.page_size:
        return Broken(Full.PAGE_SIZE_CHANGED)
    if (header.salt1, header.salt2) != (pos.salt1, pos.salt2):
        if backfill_holds(pos, db_path, held):
            return Resume(walmod.WAL_HEADER_SIZE, (header.checksum1, header.checksum2))
        return Broken(Full.WAL_RESTARTED)
    if wal_size < pos.wal_offset:
        return Broken(Full.WAL_SHORTENED)
    checksum = _checksum_at(pos, header, wal_path)
    if checksum is None:
        return Broken(Full.WAL_REPLACED)
    return Resume(pos.wal_offset, checksum)


def backfill_holds(pos: Position, db_path: str, held: bool) -> bool:
    """True if every frame up to the position is in the main file and nothing since was."""
    if not pos.backfilled:
        return False
    return held or DBStat.of(db_path) == pos.db_stat


def wal_empty(pos: Position | None, wal_path: str, db_path: str, held: bool) -> bool:
    """The WAL holds no frame and the main file is as shipped (a fresh tenant's first
    release: its snapshot came from the main file)."""
    if pos is None or not backfill_holds(pos, db_path, held):
        return False
    try:
        return os.path.getsize(wal_path) <= walmod.WAL_HEADER_SIZE
    except FileNotFoundError:
        return True


def may_have_news(pos: Position, wal_path: str, db_path: str) -> bool:
    """Whether a pass over a closed database could ship anything: a committed frame where
    the next one would follow the position, or a broken proof. Reads the WAL header and
    one frame header; a false positive only costs a pass."""
    try:
        header, wal_size = walmod.read_header(wal_path)
    except TenantSyncError:
        return True
    if header is None:
        return not backfill_holds(pos, db_path, held=False)
    if (header.salt1, header.salt2) != (pos.salt1, pos.salt2):
        if not backfill_holds(pos, db_path, held=False):
            return True
        offset = walmod.WAL_HEADER_SIZE
    else:
        offset = pos.wal_offset
    if wal_size < offset:
        return True
    frame = walmod.read_range(wal_path, offset, offset + walmod.FRAME_HEADER_SIZE)
    if len(frame) < walmod.FRAME_HEADER_SIZE:
        return False
    return struct.unpack(">II", frame[8:16]) == (header.salt1, header.salt2)


def _checksum_at(pos: Position, header: walmod.WALHeader, wal_path: str) -> tuple[int, int] | None:
    """The running checksum at the position, proving the WAL is the one we read; None if not.

    With the checksum we ended on, the frame just before the position must carry it (one
    small read). A position rebuilt from an L0 header has none: the WAL up to it is
    scanned once, and the pass then records the checksum it found.
    """
    head_sum = (header.checksum1, header.checksum2)
    if pos.wal_offset == walmod.WAL_HEADER_SIZE:
        return head_sum
    frame_size = walmod.FRAME_HEADER_SIZE + pos.page_size
    if pos.checksum is not None:
        start = pos.wal_offset - frame_size
        frame = walmod.read_range(wal_path, start, start + walmod.FRAME_HEADER_SIZE)
        if len(frame) < walmod.FRAME_HEADER_SIZE:
            return None  # shortened since its size was taken
        salt1, salt2, sum1, sum2 = struct.unpack(">4I", frame[8:24])
        if (salt1, salt2) == (pos.salt1, pos.salt2) and (sum1, sum2) == pos.checksum:
            return pos.checksum
        return None
    data = walmod.read_range(wal_path, walmod.WAL_HEADER_SIZE, pos.wal_offset)
    scan = walmod.scan(data, header, walmod.WAL_HEADER_SIZE, head_sum)
    return scan.checksum if scan.end_offset == pos.wal_offset else None
