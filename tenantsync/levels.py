"""Compaction levels: each level's interval, the snapshot interval and retention.

Its own module because the watcher and the config need these figures but none of the
compaction code (which pulls in the LTX codec and numpy): a process that only decides
*when* to compact stays small.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone


@dataclass(frozen=True)
class Levels:
    """Compaction intervals per level and retention; defaults are Litestream 0.5's."""

    intervals: dict[int, timedelta] = field(
        default_factory=lambda: {1: timedelta(seconds=30), 2: timedelta(minutes=5), 3: timedelta(hours=1)}
    )
    snapshot_interval: timedelta = timedelta(hours=24)
    retention: timedelta = timedelta(hours=24)
    l0_retention: timedelta = timedelta(minutes=5)
    #: Keep one restore point per second for the whole retention window (level 8) when L0
    #: files expire; off, a restore older than ``l0_retention`` only reaches L1 boundaries.
    pitr_seconds: bool = True

    @property
    def max_level(self) -> int:
        return max(self.intervals)

    def source(self, level: int) -> int:
        return level - 1


def aligned(now: datetime, interval: timedelta) -> datetime:
    """``now`` truncated to a multiple of ``interval`` since the epoch (Go's Time.Truncate)."""
    step = interval.total_seconds()
    return datetime.fromtimestamp((now.timestamp() // step) * step, tz=timezone.utc)
