"""Where a database's capture stands, and the rules that say whether it can go on.

The position is the only state a sync pass needs; it is small and serialisable so the
catalogue (fleet mode) or the replica itself (single-database mode, read back from the
last L0 header) can hold it, and no process has to stay alive per tenant.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, replace

from .wal import WAL_HEADER_SIZE


@dataclass(frozen=True)
class DBStat:
    """Identity and last-modification of the main database file.

    SQLite writes the main file only when a checkpoint copies WAL frames into it (or on
    a rollback-journal commit). So an unchanged stat since a moment when the WAL was fully
    backfilled proves nothing was checkpointed behind our back since then.
    """

    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str) -> "DBStat | None":
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return cls(st.st_ino, st.st_size, st.st_mtime_ns)

    @classmethod
    def settled(cls, path: str, known: "DBStat | None" = None) -> "DBStat | None":
        """The stat to keep as proof, taken while nothing can write the main file (our
        read mark is held, or the file is ours alone).

        The kernel stamps writes with a coarse clock: a checkpoint a few milliseconds
        after the one that set the stat can leave size and mtime equal, and the proof
        would then hold over frames nobody shipped. So a fresh mtime is moved one
        nanosecond back: no later write can be stamped earlier than the one that set it.
        ``known`` is the proof already kept: if the file still matches it nothing has
        been written since, and it is kept as it is (moving the mtime again would make a
        value an earlier proof may hold).
        """
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        stat = cls(st.st_ino, st.st_size, st.st_mtime_ns)
        if stat == known or time.time_ns() - st.st_mtime_ns > SETTLED_NS:
            return stat
        back = st.st_mtime_ns - (2 if known is not None and known.mtime_ns == st.st_mtime_ns - 1 else 1)
        try:
            os.utime(path, ns=(st.st_atime_ns, back))
        except PermissionError:
            # Not the file's owner: wait (the file cannot change meanwhile) until the
            # clock has moved on, so the next write gets another mtime.
            time.sleep(max(0.0, (st.st_mtime_ns + SETTLED_NS - time.time_ns()) / 1e9))
            return stat
        return cls(st.st_ino, st.st_size, back)


# Older than this, an mtime cannot be given again by the kernel's coarse clock (its tick
# is 1 to 10 ms); a margin for a clock read late on a loaded machine.
SETTLED_NS = 50_000_000


@dataclass(frozen=True)
class Position:
    """The last transaction shipped and the WAL state it was read from.

    ``wal_offset`` is the file offset just past the last captured commit frame of the WAL
    generation identified by ``salt1``/``salt2``; ``checksum`` is SQLite's cumulative
    frame checksum at that offset (None when the position was rebuilt from an L0 header,
    which does not carry it). ``backfilled`` is set when our own checkpoint copied every
    frame up to ``wal_offset`` into the main file, and ``db_stat`` is the main file's stat
    right after that checkpoint.

    Made only by the classmethods below (and read back by ``from_dict``): each names the
    moment a position is taken, so the WAL fields follow from what happened, not from
    literals at the call sites.
    """

    txid: int
    page_size: int
    commit: int
    salt1: int = 0
    salt2: int = 0
    wal_offset: int = 0
    checksum: tuple[int, int] | None = None
    backfilled: bool = False
    db_stat: DBStat | None = None

    @classmethod
    def after_l0(cls, header, checksum: tuple[int, int] | None = None, db_stat: DBStat | None = None) -> "Position":
        """The position an L0 file's header establishes: just past the WAL frames it holds.

        ``checksum`` is the WAL's running checksum there, when the frames were just read
        (a header read back from the replica does not carry it). ``db_stat`` is given when
        every committed frame was already in the main file: the stat then anchors the
        next pass. A header without a WAL offset (0, written by a tool that did not read a
        WAL) names no WAL place: the next pass cannot continue incrementally from it.
        """
        if header.wal_offset == 0:
            return cls.after_compaction(header)
        return cls(
            txid=header.max_txid,
            page_size=header.page_size,
            commit=header.commit,
            salt1=header.wal_salt1,
            salt2=header.wal_salt2,
            wal_offset=header.wal_offset + header.wal_size,
            checksum=checksum,
            backfilled=db_stat is not None,
            db_stat=db_stat,
        )

    @classmethod
    def after_compaction(cls, header) -> "Position":
        """The position a compacted (level 1+) file's header establishes: its TXID only,
        as such a file records no WAL place."""
        return cls(txid=header.max_txid, page_size=header.page_size, commit=header.commit)

    @classmethod
    def of_replica(cls, replica) -> "Position | None":
        """The position the replica's newest file establishes (an L0 header keeps its WAL
        place, as Litestream's do); None for an empty replica."""
        files = replica.all_files()
        newest = max((f[-1] for f in files.values() if f), key=lambda i: i.max_txid, default=None)
        if newest is None:
            return None
        header = replica.read_header(newest)
        return cls.after_l0(header) if newest.level == 0 else cls.after_compaction(header)

    @classmethod
    def after_restore(cls, txid: int, page_size: int, commit: int, db_stat: DBStat | None) -> "Position":
        """A database just restored from its replica: everything in the main file, no WAL
        yet; ``db_stat`` (the restored file's) proves on the next pass that it is unchanged."""
        return cls(txid=txid, page_size=page_size, commit=commit, wal_offset=WAL_HEADER_SIZE,
                   backfilled=True, db_stat=db_stat)

    def advanced(self, **changes) -> "Position":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Position":
        d = dict(d)
        if d.get("checksum") is not None:
            d["checksum"] = tuple(d["checksum"])
        if d.get("db_stat") is not None:
            d["db_stat"] = DBStat(**d["db_stat"])
        return cls(**d)
