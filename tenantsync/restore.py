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
from collections import deque
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from . import layout
from .errors import InvalidArgument, OutputExists, ReplicaEmpty, ReplicaGap, RestoredCorrupt, TargetUnavailable
from .replica import LEVELS, LTXInfo, Replica

log = logging.getLogger(__name__)

# S3 listings give upload times truncated to the second; an LTX file is uploaded within
# this long of its header timestamp. Files closer than that to a target time have their
# header read to decide which side of the target they fall.
UPLOAD_SLACK = timedelta(seconds=120)
WRITE_BATCH = 8 << 20
PREFETCH = 4


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
) -> RestoreResult:
    """Rebuild the database at ``output``; nothing is left there unless it verified."""
    output = os.path.abspath(output)
    if os.path.exists(output) and not force:
        raise OutputExists(f"{output}: already exists (use --force to replace it)")
    infos = plan(replica, txid, timestamp)
    directory = os.path.dirname(output)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(output)}.tenantsync-restore-{os.getpid()}")
    try:
        pages, size, page_size, commit, ms = _apply(replica, infos, tmp)
        with ThreadPoolExecutor(1) as pool:
            # The disk writes back while SQLite checks the b-trees from the page cache.
            synced = pool.submit(_fsync_path, tmp)
            _structure_check(tmp, output)
            synced.result()
        for suffix in ("-wal", "-shm"):
            # A stale WAL beside the new file would be replayed over it by SQLite.
            _remove(output + suffix)
        os.replace(tmp, output)
        _fsync_path(directory)
    except BaseException:
        _remove(tmp)
        raise
    log.info("restored %s to txid %016x from %d files", output, infos[-1].max_txid, len(infos))
    return RestoreResult(infos[-1].max_txid, len(infos), pages, size, page_size, commit,
                         datetime.fromtimestamp(ms / 1000, timezone.utc))


def _apply(replica: Replica, infos: list[LTXInfo], path: str) -> tuple[int, int, int, int, int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    page_size = None
    pages = total = commit = ms = 0
    try:
        with ThreadPoolExecutor(PREFETCH) as pool:
            # At most PREFETCH files in flight or waiting: memory stays bounded however
            # long the plan is.
            # Files above replica.STREAM_ABOVE come as streams of ranged reads, not bytes.
            ahead = deque(pool.submit(replica.source, info) for info in infos[:PREFETCH])
            for i, info in enumerate(infos):
                data = ahead.popleft().result()
                if i + PREFETCH < len(infos):
                    ahead.append(pool.submit(replica.source, infos[i + PREFETCH]))
                total += info.size
                name = replica.url(info)
                dec = replica.decoder(info, data)
                if page_size is None:
                    page_size = dec.header.page_size
                elif dec.header.page_size != page_size:
                    raise RestoredCorrupt(f"{name}: page size {dec.header.page_size} differs from {page_size}")
                pages += _write_pages(fd, dec.pages(), page_size)
                dec.close()
                commit, ms = dec.header.commit, dec.header.timestamp
                os.ftruncate(fd, commit * page_size)
    finally:
        os.close(fd)
    return pages, total, page_size, commit, ms


def _write_pages(fd: int, pages, page_size: int) -> int:
    """pwrite runs of consecutive pages in large batches, not one syscall per page."""
    run: list = []
    run_start = next_pgno = 0
    count = 0
    for pgno, page in pages:
        count += 1
        if run and (pgno != next_pgno or len(run) * page_size >= WRITE_BATCH):
            os.pwrite(fd, b"".join(run), (run_start - 1) * page_size)
            run = []
        if not run:
            run_start = pgno
        run.append(page)
        next_pgno = pgno + 1
    if run:
        os.pwrite(fd, b"".join(run), (run_start - 1) * page_size)
    return count


def _structure_check(path: str, output: str) -> None:
    uri = "file:" + urllib.parse.quote(path) + "?immutable=1"
    try:
        conn = sqlite3.connect(uri, uri=True)
        try:
            # Every page already matched its file checksum; quick_check adds the b-tree
            # structure at a fraction of integrity_check's cost (no index cross-checks).
            rows = conn.execute("PRAGMA quick_check").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        raise RestoredCorrupt(f"{output}: restored database is not readable: {e}") from e
    if rows != [("ok",)]:
        raise RestoredCorrupt(f"{output}: restored database failed quick_check: {rows[0][0]}")


def _fsync_path(path: str) -> None:
    """fsync a file or a directory by name (any descriptor flushes the whole file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass

