"""Compaction, snapshots and retention: storage-only work on a replica.

Nothing here touches a local database or SQLite, so any worker on any host can run it
while the database is still being replicated. Levels follow Litestream 0.5: level N
merges level N-1's newer files on a wall-clock-aligned interval; level 9 holds
snapshots, built here by merging the restore chain (not from the live database). Every
output is written with write-if-absent, so a second run of the same step finds its file
already there and does nothing.
"""

from __future__ import annotations

import heapq
import logging
import tempfile
from datetime import datetime, timedelta, timezone

from . import layout
from .errors import LTXError, PreconditionFailed
from .levels import Levels, aligned
from .ltx import HEADER_FLAG_NO_CHECKSUM, HEADER_SIZE, Decoder, Encoder, Header
from .replica import LTXInfo, Replica
from .restore import plan

log = logging.getLogger(__name__)

SPOOL_BYTES = 64 << 20


def is_due(newest: LTXInfo | None, interval: timedelta, now: datetime) -> bool:
    """Litestream's rule: compact once per aligned interval, after the previous output."""
    return newest is None or newest.created_at <= aligned(now, interval)


def merge(replica: Replica, inputs: list[LTXInfo], level: int, *, snapshot: bool = False,
          sources: list | None = None) -> LTXInfo:
    """Merge contiguous files into one at ``level``; the newest image of each page wins.

    The header follows superfly/ltx's compactor: first input's min TXID and pre-apply
    checksum, last input's max TXID, commit, timestamp and node id, NoChecksum, no WAL fields.
    Pages above the final commit are dropped. Inputs are verified before anything is written.
    ``sources`` are the inputs' bytes when the caller has already read them.
    """
    sources = sources or [replica.source(info) for info in inputs]
    decoders = [replica.decoder(info, data) for info, data in zip(inputs, sources)]
    first, last = decoders[0].header, decoders[-1].header
    for prev, cur in zip(decoders, decoders[1:]):
        if cur.header.page_size != first.page_size:
            raise LTXError(f"{replica}: cannot merge page sizes {first.page_size} and {cur.header.page_size}")
        if cur.header.min_txid > prev.header.max_txid + 1:  # overlaps are fine: the later file wins
            raise LTXError(
                f"{replica}: cannot merge non-contiguous files "
                f"{prev.header.max_txid:016x} -> {cur.header.min_txid:016x}"
            )
    min_txid = 1 if snapshot else first.min_txid
    header = Header(
        flags=HEADER_FLAG_NO_CHECKSUM,
        page_size=first.page_size,
        commit=last.commit,
        min_txid=min_txid,
        max_txid=last.max_txid,
        timestamp=last.timestamp,
        pre_apply_checksum=0 if min_txid == 1 else first.pre_apply_checksum,
        node_id=last.node_id,  # who wrote the newest commits in it (fence.py)
    )
    with tempfile.SpooledTemporaryFile(SPOOL_BYTES) as spool:
        enc = Encoder(spool, header)
        for pgno, page in _newest_pages(decoders, header.commit):
            enc.add_page(pgno, page)
        for dec in decoders:
            dec.close()  # raises on a checksum mismatch before the upload below
        enc.close()
        size = spool.tell()
        spool.seek(0)
        try:
            return replica.write(level, header, spool, size)
        except PreconditionFailed:
            log.info("%s: level %d file %016x-%016x already exists", replica, level, header.min_txid, header.max_txid)
            return next(i for i in replica.files(level) if (i.min_txid, i.max_txid) == (min_txid, header.max_txid))


def _newest_pages(decoders: list[Decoder], commit: int):
    """K-way merge of the inputs' ascending page streams, newest input first on ties."""
    streams = [dec.pages() for dec in decoders]
    heap: list = []

    def advance(i: int) -> None:
        item = next(streams[i], None)
        if item is not None:
            heapq.heappush(heap, (item[0], -i, item[1]))

    for i in range(len(streams)):
        advance(i)
    while heap:
        pgno, neg_i, page = heapq.heappop(heap)
        advance(-neg_i)
        while heap and heap[0][0] == pgno:  # older images of the same page
            advance(-heapq.heappop(heap)[1])
        if pgno <= commit:
            yield pgno, page


def compact(replica: Replica, level: int, levels: Levels = Levels(), *, now: datetime | None = None,
            force: bool = False) -> LTXInfo | None:
    """Merge the source level's files newer than ``level``'s newest into one file."""
    if level == layout.SNAPSHOT_LEVEL:
        return snapshot(replica, levels, now=now, force=force)
    if level not in levels.intervals:
        raise LTXError(f"{replica}: level {level} is not a compaction level (1..{levels.max_level} or 9)")
    now = now or datetime.now(timezone.utc)
    existing = replica.files(level)
    newest = existing[-1] if existing else None
    if not force and not is_due(newest, levels.intervals[level], now):
        return None
    after = newest.max_txid if newest else 0
    inputs = _contiguous([i for i in replica.files(levels.source(level)) if i.min_txid > after], after)
    if not inputs:
        return None
    return merge(replica, inputs, level)


def _contiguous(files: list[LTXInfo], after: int) -> list[LTXInfo]:
    """The run of files that continues ``after`` without a gap (empty if none does)."""
    out: list[LTXInfo] = []
    expected = after + 1 if after else None
    for info in files:
        if expected is not None and info.min_txid != expected:
            break
        out.append(info)
        expected = info.max_txid + 1
    return out


def snapshot(replica: Replica, levels: Levels = Levels(), *, now: datetime | None = None,
             force: bool = False) -> LTXInfo | None:
    """Write a level-9 snapshot of the newest state by merging its restore chain."""
    now = now or datetime.now(timezone.utc)
    existing = replica.files(layout.SNAPSHOT_LEVEL)
    newest = existing[-1] if existing else None
    if not force and not is_due(newest, levels.snapshot_interval, now):
        return None
    chain = plan(replica)
    if newest is not None and newest.max_txid >= chain[-1].max_txid:
        return None
    return merge(replica, chain, layout.SNAPSHOT_LEVEL, snapshot=True)


def retain(replica: Replica, levels: Levels = Levels(), *, now: datetime | None = None) -> list[LTXInfo]:
    """Delete what no restore inside the retention window can need; returns what went.

    The newest snapshot older than the window is kept (it is where a restore to the
    window's first second starts); files wholly below it go. L0 files go once a level-1
    file covers them and they are older than ``l0_retention``, after their states have been
    kept as per-second restore points (``pitr_seconds``). The newest file of every level
    always stays: capture rebuilds its position from the newest L0.
    """
    now = now or datetime.now(timezone.utc)
    files = replica.all_files()
    cutoff = now - levels.retention
    snaps = files[layout.SNAPSHOT_LEVEL]
    old = [i for i, s in enumerate(snaps) if s.created_at < cutoff]
    keep_from = old[-1] if old else 0
    doomed = snaps[:keep_from]
    floor = snaps[keep_from].max_txid if old else 0
    for level in range(1, layout.SNAPSHOT_LEVEL):
        # Inputs the next level has not merged yet stay, or its compaction would stall.
        merged = files[level + 1][-1].max_txid if level < levels.max_level and files[level + 1] else None
        doomed += [i for i in files[level][:-1]
                   if i.max_txid < floor and (merged is None or i.max_txid <= merged)]
    l0_cutoff = now - levels.l0_retention
    # Only an L1 file that is itself older than the grace period makes L0 files redundant:
    # a newer one would take the in-between states with them.
    compacted = max((i.max_txid for i in files[1] if i.created_at < l0_cutoff), default=0)
    expiring = [i for i in files[0][:-1] if i.max_txid <= compacted and i.created_at < l0_cutoff]
    if levels.pitr_seconds:
        # Written before anything is deleted: a crash in between leaves both, and the
        # next run skips what level 8 already holds.
        _keep_seconds(replica, expiring, files, floor)
    doomed += expiring
    if doomed:
        replica.delete(doomed)
        log.info("%s: retention deleted %d files", replica, len(doomed))
    return doomed


def _keep_seconds(replica: Replica, expiring: list[LTXInfo], files: dict[int, list[LTXInfo]], floor: int) -> None:
    """Merge expiring L0 files into one level-8 file per UTC second of their timestamps.

    A group never crosses where a compacted file or snapshot ends, so a restore that
    reaches that point continues with level-8 files without re-applying pages. Files below
    the snapshot kept for the window (``floor``) are not worth keeping; each L0 file is
    read once here.
    """
    done = max((i.max_txid for i in files[layout.PITR_LEVEL]), default=0)
    ends = {i.max_txid for level, infos in files.items() if level not in (0, layout.PITR_LEVEL) for i in infos}
    group: list[LTXInfo] = []
    data: list = []
    second = None
    for info in expiring:
        if info.min_txid <= done or info.max_txid < floor:
            continue
        source = replica.source(info)
        header = Header.decode(source[:HEADER_SIZE], name=replica.url(info)) if isinstance(source, bytes) \
            else replica.read_header(info)
        if group and (header.timestamp // 1000 != second or group[-1].max_txid in ends
                      or info.min_txid != group[-1].max_txid + 1):
            merge(replica, group, layout.PITR_LEVEL, sources=data)
            group, data = [], []
        group.append(info)
        data.append(source)
        second = header.timestamp // 1000
    if group:
        merge(replica, group, layout.PITR_LEVEL, sources=data)
