"""Building the next L0 file of a database: from the WAL's new frames, or every page.

An incremental L0 holds the newest committed image of each page written since the
position; a full-page L0 holds pages 1..commit, each from the WAL if a committed frame
has it, else from the main file. Either is encoded here, before any upload, together
with the position it establishes once uploaded (``Position.after_l0``): the caller
uploads, then advances, never the other way round.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from typing import BinaryIO

from . import wal as walmod
from .errors import DatabaseError
from .ltx import HEADER_FLAG_NO_CHECKSUM, Encoder, Header, encode_file, lock_pgno
from .outcome import Full
from .position import DBStat, Position

log = logging.getLogger(__name__)

# Full-page files above this size spill from memory to a temporary file.
SPOOL_BYTES = 64 << 20
# Main-file bytes read per step of a full-page file.
READ_CHUNK = 4 << 20
# WAL bytes read per step of an incremental pass (about 1000 frames of 4 KiB).
WAL_CHUNK = 4 << 20


@dataclass
class PendingL0:
    """An L0 file encoded but not yet uploaded, and the position it will establish."""

    header: Header
    data: bytes | BinaryIO  # a spooled temporary file (positioned at 0) for full-page files
    size: int
    position: Position
    pages: int
    full: Full | None = None

    def close(self) -> None:
        if not isinstance(self.data, bytes):
            self.data.close()


@dataclass(frozen=True)
class Committed:
    """The committed frames a WAL holds from some offset: where they end, the running
    checksum there, the database size after the last of them, and each page's newest image."""

    end: int
    checksum: tuple[int, int]
    commit: int | None
    pages: dict


def committed_frames(wal_path: str, header: walmod.WALHeader, wal_size: int, start: int,
                     checksum: tuple[int, int], index: walmod.WALIndex | None) -> Committed:
    """Committed frames from ``start``, read in chunks that stop at the first frame that
    does not verify: after a WAL restart the file's tail holds the previous generation's
    frames, and reading (and checksumming) them every pass is waste.

    ``index`` (SQLite's wal-index, if readable) bounds the read at SQLite's last committed
    frame as the pass begins: reading on would chase the application's newer commits (the
    next pass's) or the previous generation's frames past a restarted WAL's end.
    """
    frame_size = header.frame_size
    limit, chunk = wal_size, WAL_CHUNK
    if index is not None and index.of_generation(header.salt1, header.salt2):
        limit = min(wal_size, index.end_offset(header.page_size))
        chunk = max(limit - start, frame_size)
    offset, commit, pages = start, None, {}
    while offset < limit:
        end = min(limit, offset + chunk)
        data = walmod.read_range(wal_path, offset, end)
        scan = walmod.scan(data, header, offset, checksum)
        final = scan.stopped is not None and not scan.stopped.partial
        if scan.end_offset == offset:
            # One transaction larger than the chunk: read more of it. Not when the file
            # ended before ``end`` (shortened since its size was taken): nothing more is there.
            if not final and end < limit and len(data) == end - offset:
                chunk *= 2
                continue
            break
        pages.update(scan.pages)
        offset, checksum, commit = scan.end_offset, scan.checksum, scan.commit
        chunk = max(chunk, WAL_CHUNK)
        if final:
            break
    return Committed(offset, checksum, commit, pages)


def incremental(pos: Position, header: walmod.WALHeader, new: Committed, start: int, node_id: int = 0) -> PendingL0:
    """The L0 at the next TXID holding the WAL frames ``new`` found from ``start`` (not empty);
    ``node_id`` names the database file it was read from (fence.file_node_id)."""
    lock = lock_pgno(pos.page_size)
    pages = [(p, new.pages[p]) for p in sorted(new.pages) if p <= new.commit and p != lock]
    hdr = _header(header.page_size, new.commit, pos.txid + 1, header, start, new.end - start, node_id)
    blob = encode_file(hdr, pages)
    return PendingL0(hdr, blob, len(blob), Position.after_l0(hdr, checksum=new.checksum), len(pages))


def full(pos: Position | None, header: walmod.WALHeader | None, wal_size: int, why: Full, *,
         path: str, wal_path: str, fd: int, reader: sqlite3.Connection, node_id: int = 0) -> PendingL0:
    """Every page of the current database state at the next TXID.

    ``fd`` reads the main file and ``reader`` holds our read mark: reading the main file
    while the application runs is safe, as the mark keeps every frame newer than it out of
    the main file, and every older frame that could be copied in is overlaid from the WAL.
    """
    log.info("%s: writing full-page L0 (%s)", path, why.value)
    scan = None
    if header is not None:
        data = walmod.read_range(wal_path, walmod.WAL_HEADER_SIZE, wal_size)
        scan = walmod.scan(data, header, walmod.WAL_HEADER_SIZE, (header.checksum1, header.checksum2))
    page_size = header.page_size if header else reader.execute("PRAGMA page_size").fetchone()[0]
    if pos is not None and pos.page_size != page_size:
        raise DatabaseError(
            f"{path}: page size changed from {pos.page_size} to {page_size}; "
            f"replicate it to a new replica path"
        )
    if scan is not None and scan.commit is not None:
        commit = scan.commit
    else:
        commit = reader.execute("PRAGMA page_count").fetchone()[0]
    wal_pages = scan.pages if scan is not None else {}
    in_wal = scan is not None and scan.end_offset > walmod.WAL_HEADER_SIZE
    # (32, 0) with no committed frames: "start of a WAL, nothing yet", the position
    # Litestream (and Position.of_replica) can continue from; (0, 0) stops it.
    hdr = _header(page_size, commit, 1 if pos is None else pos.txid + 1, header, walmod.WAL_HEADER_SIZE,
                  scan.end_offset - walmod.WAL_HEADER_SIZE if in_wal else 0, node_id)
    spool = tempfile.SpooledTemporaryFile(SPOOL_BYTES)
    try:
        enc = Encoder(spool, hdr)
        for pgno, page in _all_pages(path, fd, page_size, commit, wal_pages):
            enc.add_page(pgno, page)
        enc.close()
        size = spool.tell()
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    if in_wal:
        position = Position.after_l0(hdr, checksum=scan.checksum)
    else:
        # Everything is in the main file, and our read mark stops anyone copying
        # new frames into it: the stat taken now anchors the next pass.
        position = Position.after_l0(hdr, db_stat=DBStat.settled(path))
    return PendingL0(hdr, spool, size, position, commit, why)


def _header(page_size: int, commit: int, txid: int, wal: walmod.WALHeader | None,
            wal_offset: int, wal_size: int, node_id: int) -> Header:
    return Header(
        flags=HEADER_FLAG_NO_CHECKSUM,
        page_size=page_size,
        commit=commit,
        min_txid=txid,
        max_txid=txid,
        timestamp=time.time_ns() // 1_000_000,
        wal_offset=wal_offset,
        wal_size=wal_size,
        wal_salt1=wal.salt1 if wal else 0,
        wal_salt2=wal.salt2 if wal else 0,
        node_id=node_id,
    )


def _all_pages(path: str, fd: int, page_size: int, commit: int, wal_pages: dict):
    """Pages 1..commit: the WAL's newest committed image, else the main file's."""
    lock = lock_pgno(page_size)
    per_chunk = max(1, READ_CHUNK // page_size)
    for first in range(1, commit + 1, per_chunk):
        last = min(commit, first + per_chunk - 1)
        chunk = os.pread(fd, (last - first + 1) * page_size, (first - 1) * page_size)
        view = memoryview(chunk)
        for pgno in range(first, last + 1):
            if pgno == lock:
                continue
            page = wal_pages.get(pgno)
            if page is None:
                off = (pgno - first) * page_size
                page = view[off : off + page_size]
                if len(page) != page_size:
                    raise DatabaseError(f"{path}: page {pgno} is beyond the end of the file")
            yield pgno, page
