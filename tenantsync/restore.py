"""Restore: choose the LTX files that rebuild a database at a target, apply, verify.

The plan follows Litestream's: the newest snapshot at or before the target, then, from
any level, the file that extends the contiguous TXID range furthest without passing the
target. Every file's checksum is verified as it is applied to a temporary file next to the
output; the result must pass ``PRAGMA quick_check`` before it is renamed into place, so
the output path only ever holds a complete, verified database.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections import deque
from collections.abc import Callable
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from . import layout, restore_pool
from .errors import InvalidArgument, ReplicaEmpty, ReplicaGap, RestoredCorrupt, TargetUnavailable
from .output import fsync_path, put_in_place, remove_quietly, temporary_beside
from .page_runs import PageRuns
from .replica import LEVELS, STREAM_ABOVE, LTXInfo, Replica

#: ``progress(done, total)``: bytes of a restore applied so far, of its total.
Progress = Callable[[int, int], None]

log = logging.getLogger(__name__)

# S3 listings give upload times truncated to the second; an LTX file is uploaded within
# this long of its header timestamp. Files closer than that to a target time have their
# header read to decide which side of the target they fall.
UPLOAD_SLACK = timedelta(seconds=120)
# Files fetched ahead of the one being applied; a file counts min(size, STREAM_ABOVE) bytes.
PREFETCH_FILES = 16
PREFETCH_BYTES = 64 << 20


@dataclass(frozen=True)
class RestoreResult:
    txid: int
    files: int
    pages: int
    size: int
    page_size: int
    commit: int
    timestamp: datetime  # of the last transaction in the restored state (LTX header, ms)


def plan(replica: Replica, txid: int | None = None, timestamp: datetime | None = None) -> list[LTXInfo]:
    """The files to apply, in order, to reach ``txid``/``timestamp`` (default: latest)."""
    if txid is not None and timestamp is not None:
        raise InvalidArgument("give a TXID or a timestamp, not both")
    files = replica.all_files()
    if not any(files.values()):
        raise ReplicaEmpty(f"{replica}: no LTX files in the replica")
    before = _TimeFilter(replica, timestamp)

    def eligible(info: LTXInfo) -> bool:
        return (txid is None or info.max_txid <= txid) and before(info)

    chosen: list[LTXInfo] = []
    snapshots = [i for i in files[layout.SNAPSHOT_LEVEL] if eligible(i)]
    if snapshots:
        chosen.append(snapshots[-1])
    current = chosen[-1].max_txid if chosen else 0
    others = sorted(
        (i for level in LEVELS if level != layout.SNAPSHOT_LEVEL for i in files[level]),
        key=lambda i: (i.min_txid, -i.max_txid),
    )
    while txid is None or current < txid:
        best = None
        for info in others:
            if info.min_txid > current + 1:
                break
            if info.max_txid <= current or not eligible(info):
                continue
            if best is None or _better(best, info):
                best = info
        if best is None:
            break
        chosen.append(best)
        current = best.max_txid
    if not chosen or chosen[0].min_txid != 1:
        raise TargetUnavailable(_unavailable(replica, files, txid, timestamp))
    if txid is not None and current < txid:
        raise TargetUnavailable(_unavailable(replica, files, txid, timestamp))
    newest = max(i.max_txid for level in files.values() for i in level)
    if timestamp is not None and current < newest:
        _check_exact(replica, files, current, before)
    if txid is None and timestamp is None:
        if current < newest:
            raise ReplicaGap(f"{replica}: TXIDs are not contiguous: have up to {current:016x}, newest is {newest:016x}")
    return chosen


def _check_exact(replica: Replica, files, current: int, before) -> None:
    """A time target is met only if the next transaction provably happened at or after
    it, or (past the L0 retention) in the target's own second: an L0 file's timestamp is
    its only transaction's time, and a level-8 file holds one second's transactions. If
    the next transaction survives only inside a compacted file that ends after the
    target, the state then cannot be rebuilt; say so instead of returning an older one."""
    after = next((i for i in files[0] if i.min_txid == current + 1), None)
    if after is not None and not before(after):
        return
    second = next((i for i in files[layout.PITR_LEVEL] if i.min_txid <= current + 1 <= i.max_txid), None)
    if second is not None and before.second_of(second) >= int(before.timestamp.timestamp()):
        return
    raise TargetUnavailable(
        f"{replica}: no exact state just before {before.timestamp.isoformat()}: the transactions after "
        f"{current:016x} survive only in compacted files that end after it; restore to that TXID or give "
        f"a time covered by L0 files or per-second restore points"
    )


def _better(current: LTXInfo, candidate: LTXInfo) -> bool:
    """Same preference order as Litestream: reach furthest, start earliest, higher level."""
    if candidate.max_txid != current.max_txid:
        return candidate.max_txid > current.max_txid
    if candidate.min_txid != current.min_txid:
        return candidate.min_txid < current.min_txid
    return candidate.level > current.level


def _unavailable(replica, files, txid, timestamp) -> str:
    every = [i for level in files.values() for i in level]
    newest = max(i.max_txid for i in every)
    if txid is not None:
        return f"{replica}: txid {txid:016x} is not available (replica holds up to {newest:016x})"
    if timestamp is not None:
        oldest = min(i.created_at for i in every)
        return f"{replica}: no restorable state before {timestamp.isoformat()} (oldest file is from {oldest.isoformat()})"
    return f"{replica}: no snapshot to start a restore from"


class _TimeFilter:
    """Is a file's LTX timestamp strictly before the target? Reads headers only when unsure.

    On S3 a listing gives the upload time: an L0 file is uploaded within UPLOAD_SLACK of
    its timestamp, but a compacted or level-8 file may be written long after the
    transactions it holds, so for those only an upload before the target decides alone.
    """

    def __init__(self, replica: Replica, timestamp: datetime | None):
        self.replica = replica
        self.timestamp = timestamp
        self.exact = replica.storage.kind == "file"  # mtime is set to the LTX timestamp
        self._ms: dict[str, int] = {}

    def __call__(self, info: LTXInfo) -> bool:
        t = self.timestamp
        if t is None:
            return True
        if self.exact:
            return info.created_at < t
        if info.created_at + timedelta(seconds=1) < t:
            return True
        if info.level == 0 and info.created_at > t + UPLOAD_SLACK:
            return False
        return self._header_ms(info) < int(t.timestamp() * 1000)

    def second_of(self, info: LTXInfo) -> int:
        """The UTC second (epoch) of a file's LTX timestamp."""
        if self.exact:
            return int(info.created_at.timestamp())
        return self._header_ms(info) // 1000

    def _header_ms(self, info: LTXInfo) -> int:
        if info.key not in self._ms:
            self._ms[info.key] = self.replica.read_header(info).timestamp
        return self._ms[info.key]


def restore(
    replica: Replica,
    output: str,
    *,
    txid: int | None = None,
    timestamp: datetime | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> RestoreResult:
    """Rebuild the database at ``output``; nothing is left there unless it verified.
    ``progress(done, total)`` is told the LTX bytes applied so far as they are."""
    output, tmp = temporary_beside(output, force, "restore")
    infos = plan(replica, txid, timestamp)
    try:
        pages, size, page_size, commit, ms = _apply(replica, infos, tmp, _Progress(progress, infos))
        with ThreadPoolExecutor(1) as pool:
            # The disk writes back while SQLite checks the b-trees from the page cache.
            synced = pool.submit(fsync_path, tmp)
            _structure_check(tmp, output)
            synced.result()
        put_in_place(tmp, output)
    except BaseException:
        remove_quietly(tmp)
        raise
    log.info("restored %s to txid %016x from %d files", output, infos[-1].max_txid, len(infos))
    return RestoreResult(infos[-1].max_txid, len(infos), pages, size, page_size, commit,
                         datetime.fromtimestamp(ms / 1000, timezone.utc))


class _Progress:
    """The bytes of the plan's LTX files applied so far, told to ``report(done, total)``
    (nothing without one); ranges of a large file count as their workers finish them."""

    def __init__(self, report: Callable[[int, int], None] | None, infos: list[LTXInfo]):
        self.report, self.total, self.done = report, sum(i.size for i in infos), 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        if self.report is not None:
            with self._lock:
                self.done += n
                self.report(self.done, self.total)


def _apply(replica: Replica, infos: list[LTXInfo], path: str, progress: _Progress) -> tuple[int, int, int, int, int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    page_size = None
    pages = total = commit = ms = 0
    try:
        with ThreadPoolExecutor(PREFETCH_FILES, thread_name_prefix="tenantsync-restore-fetch") as pool:
            ahead = _Prefetch(replica, infos, pool)
            for info in infos:
                data = ahead.next()
                total += info.size
                if data is None:
                    # Pages reach the file before its checksum is verified, as from Decoder:
                    # the caller deletes the file on any error.
                    header, count = restore_pool.apply_file(replica, info, path, progress.add)
                else:
                    dec = replica.decoder(info, data)
                    header = dec.header
                    runs = PageRuns(fd, header.page_size)
                    for pgno, page in dec.pages():
                        runs.add(pgno, page)
                    runs.flush()
                    count = runs.count
                    dec.close()
                    progress.add(info.size)
                if page_size not in (None, header.page_size):
                    raise RestoredCorrupt(f"{replica.url(info)}: page size {header.page_size} differs from {page_size}")
                page_size, pages = header.page_size, pages + count
                commit, ms = header.commit, header.timestamp
                os.ftruncate(fd, commit * page_size)
    finally:
        os.close(fd)
    return pages, total, page_size, commit, ms


class _Prefetch:
    """The planned files' sources, fetched ahead in plan order: up to PREFETCH_FILES at once
    while their sizes stay within PREFETCH_BYTES. A chain of small L0 files on S3 then costs
    about one round trip per PREFETCH_FILES files, not one per file, and memory stays bounded
    however long the plan. A file restore_pool takes fetches its own ranges: its source is None."""

    def __init__(self, replica: Replica, infos: list[LTXInfo], pool: ThreadPoolExecutor):
        self.replica, self.infos, self.pool = replica, infos, pool
        self.queued: deque = deque()
        self.submitted = self.in_flight = 0
        if any(restore_pool.worth_it(i) for i in infos):
            restore_pool.warm_up()  # workers start while the first files are fetched

    def next(self):
        self._fill()
        future, cost = self.queued.popleft()
        self.in_flight -= cost
        return future.result()

    def _fill(self) -> None:
        while self.submitted < len(self.infos) and len(self.queued) < PREFETCH_FILES:
            info = self.infos[self.submitted]
            cost = 0 if restore_pool.worth_it(info) else min(info.size, STREAM_ABOVE)
            if self.queued and self.in_flight + cost > PREFETCH_BYTES:
                return
            self.queued.append((self.pool.submit(self._source, info), cost))
            self.submitted += 1
            self.in_flight += cost

    def _source(self, info: LTXInfo):
        """Files above STREAM_ABOVE come as streams of ranged reads, not bytes."""
        return None if restore_pool.worth_it(info) else self.replica.source(info)


def _structure_check(path: str, output: str) -> None:
    uri = "file:" + urllib.parse.quote(path) + "?immutable=1"
    try:
        conn = sqlite3.connect(uri, uri=True)
        try:
            # Pages read in place from the page cache instead of copied into SQLite's own:
            # on a big restore this check is a large share of the time after decoding.
            conn.execute(f"PRAGMA mmap_size={os.path.getsize(path)}").fetchall()
            # Every page already matched its file checksum; quick_check adds the b-tree
            # structure at a fraction of integrity_check's cost (no index cross-checks).
            rows = conn.execute("PRAGMA quick_check").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        raise RestoredCorrupt(f"{output}: restored database is not readable: {e}") from e
    if rows != [("ok",)]:
        raise RestoredCorrupt(f"{output}: restored database failed quick_check: {rows[0][0]}")


