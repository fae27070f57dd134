"""Where a database's capture stands, and the rules that say whether it can go on.

The position is the only state a sync pass needs; it is small and serialisable so the
catalogue (fleet mode) or the replica itself (single-database mode, read back from the
last L0 header) can hold it, and no process has to stay alive per tenant.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace


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


@dataclass(frozen=True)
class Position:
    """The last transaction shipped and the WAL state it was read from.

    ``wal_offset`` is the file offset just past the last captured commit frame of the WAL
    generation identified by ``salt1``/``salt2``; ``checksum`` is SQLite's cumulative
    frame checksum at that offset (None when the position was rebuilt from an L0 header,
    which does not carry it). ``backfilled`` is set when our own checkpoint copied every
    frame up to ``wal_offset`` into the main file, and ``db_stat`` is the main file's stat
    right after that checkpoint.
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
