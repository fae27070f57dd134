"""An LTX file's page block decoded in independent ranges, so a restore can use every core.

The page index at the end of a file gives each frame's offset and size: the page block can be
cut at frame boundaries without parsing it first, and every range decoded on its own (in a
worker process). The file checksum is one CRC over the header, the frames and the tail in
order; each range's CRC is combined into it (CRC combination), so the whole file is still
verified byte for byte.

Nothing is checked less than by ``Decoder``: the frames must be exactly the ones the index
lists (page numbers, sizes, contiguous from the header to the 6-byte zero frame), the index
must be encoded as Go encodes it, page numbers ascend within commit, a snapshot holds every
page, and the file and post-apply checksums must match.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import lz4.block
import lz4.frame

from tenantsync.errors import LTXError
from tenantsync.ltx.checksum import crc64, crc64_combine, page_checksum
from tenantsync.ltx.decoder import check_file_checksum, check_post_apply, check_snapshot_pages
from tenantsync.ltx.format import (
    CHECKSUM_FLAG, HEADER_SIZE, PAGE_FLAG_SIZE, PAGE_HEADER_SIZE, TRAILER_SIZE, Header,
    decode_page_index, encode_page_index, label, lock_pgno,
)
from tenantsync.page_runs import PageRuns

# numpy is imported inside the functions that use it: the restore workers
# (restore_worker.py) never touch a page index, and start up without it.
if TYPE_CHECKING:
    import numpy as np

_HEAD = struct.Struct(">IH")
_SIZE = struct.Struct(">I")
_SIZED_HEADER = PAGE_HEADER_SIZE + _SIZE.size
_INDEX_LENGTH = struct.Struct(">Q")
_TRAILER = struct.Struct(">QQ")
# Bytes after the 6-byte zero frame that are not index entries: the u64 index length and the trailer.
_AFTER_ENTRIES = _INDEX_LENGTH.size + TRAILER_SIZE
# First guess at the tail to fetch with the header: a second read only for huge indexes.
_TAIL_GUESS = 4 << 20
_CRC_BATCH = 1 << 20


@dataclass(frozen=True)
class Layout:
    """What the header and the tail (zero frame, index, trailer) say about a file."""

    name: str
    header: Header
    header_crc: int
    rows: np.ndarray  # (pgno, offset, size) per frame, in file order
    tail: bytes  # from the zero frame to the end of the file


@dataclass(frozen=True)
class RangeJob:
    """One worker's share: the bytes of consecutive frames and what the index says they hold."""

    name: str
    data: bytes
    start: int  # file offset of data[0]
    rows: list  # flat pgno, offset, size triples
    page_size: int
    track: bool  # sum page checksums (snapshots that carry a post-apply checksum)
    output: str  # database file the pages are written into
    # With data empty: (root, key) of a file:// replica's file the worker reads the range
    # from itself, up to the end of its last frame (restore_worker.py).
    source: tuple[str, str] | None = None

    @property
    def end(self) -> int:
        """File offset just past the range's last frame."""
        return self.rows[-2] + self.rows[-1]


@dataclass(frozen=True)
class RangeSum:
    crc: int  # CRC-64 of the range's frame headers and decompressed pages, as hashed by Decoder
    length: int  # bytes that CRC covers
    db_checksum: int  # XOR of the range's page checksums (0 unless tracked)


def exactly(name: str, data: bytes, offset: int, length: int) -> bytes:
    """``data``, read at ``offset``, if it holds the ``length`` bytes asked for; LTXError if
    the object was replaced by a shorter one since it was listed."""
    if len(data) != length:
        _fail(name, f"truncated: {length} bytes needed at offset {offset}, only {len(data)} left")
    return data


def tail_range(size: int) -> tuple[int, int]:
    """(offset, length) to fetch alongside the header: the index and trailer of most files."""
    guess = max(0, min(size - HEADER_SIZE, _TAIL_GUESS))
    return size - guess, guess


def read_layout(read: Callable[[int, int], bytes], header_raw: bytes, tail: bytes, size: int,
                name: str) -> Layout:
    """Parse and check header and tail. ``tail`` is the range ``tail_range`` gave;
    ``read(offset, length)`` fetches more when the index is longer than that."""
    header = Header.decode(header_raw, name)
    if len(tail) < PAGE_HEADER_SIZE + _AFTER_ENTRIES:
        _fail(name, f"truncated: {size} bytes cannot hold a page block, index and trailer")
    (entries,) = _INDEX_LENGTH.unpack_from(tail, len(tail) - _AFTER_ENTRIES)
    need = PAGE_HEADER_SIZE + entries + _AFTER_ENTRIES
    if entries < 1 or need > size - HEADER_SIZE:
        _fail(name, f"page index size {entries} does not fit in a file of {size} bytes")
    tail = tail[-need:] if need <= len(tail) else read(size - need, need)
    if any(tail[:PAGE_HEADER_SIZE]):
        _fail(name, "page index does not match the page frames")
    rows = decode_page_index(tail[PAGE_HEADER_SIZE:PAGE_HEADER_SIZE + entries], name)
    layout = Layout(name, header, crc64(header_raw), rows, tail)
    _check_index(layout, size)
    return layout


def _check_index(layout: Layout, size: int) -> None:
    """The index must be the one Go would write for frames tiling the page block exactly."""
    name, header, rows, tail = layout.name, layout.header, layout.rows, layout.tail
    if encode_page_index(rows.ravel()) != tail[PAGE_HEADER_SIZE:-TRAILER_SIZE]:
        _fail(name, "page index does not match the page frames")
    import numpy as np

    pgnos = rows[:, 0].astype(np.int64)
    offsets, sizes = rows[:, 1].astype(np.int64), rows[:, 2].astype(np.int64)
    starts = np.concatenate(([HEADER_SIZE], offsets + sizes))
    if (starts[:-1] != offsets).any() or starts[-1] != size - len(tail):
        _fail(name, "page index does not match the page frames")
    if (np.diff(pgnos) <= 0).any():
        _fail(name, "out-of-order page numbers in the page index")
    if len(pgnos) and pgnos[-1] > header.commit:
        _fail(name, f"page number {pgnos[-1]} out-of-bounds for commit size {header.commit}")
    check_snapshot_pages(header, pgnos.tolist(), name)


def split(layout: Layout, target: int) -> list[tuple[int, int, list]]:
    """Cut the page block at frame boundaries into (start, end, rows) of about ``target`` bytes."""
    rows = layout.rows
    if not len(rows):
        return []
    import numpy as np

    starts = rows[:, 1]
    cuts = np.searchsorted(starts, np.arange(int(starts[0]), int(starts[-1]) + 1, target)[1:], side="left")
    bounds = [0, *sorted(set(cuts.tolist()) - {0, len(rows)}), len(rows)]
    out = []
    for lo, hi in zip(bounds, bounds[1:]):
        part = rows[lo:hi]
        out.append((int(part[0, 1]), int(part[-1, 1] + part[-1, 2]), part.ravel().tolist()))
    return out


def decode_range(job: RangeJob) -> RangeSum:
    """Decode, verify against the index and write one range's pages (runs in a worker).

    Pages reach the output before the file checksum is known, as with Decoder: the output is a
    temporary file that the restore deletes unless every check passes."""
    data, page_size, rows = memoryview(job.data), job.page_size, job.rows
    lock = lock_pgno(page_size)
    unpack, size_of, decompress, join = _HEAD.unpack_from, _SIZE.unpack_from, lz4.block.decompress, b"".join
    hashed: list = []
    flush_at = 2 * max(1, _CRC_BATCH // page_size)
    crc, length, db_sum = None, 0, 0
    fd = os.open(job.output, os.O_WRONLY)
    try:
        writer = PageRuns(fd, page_size)
        for i in range(0, len(rows), 3):
            pgno, offset, size = rows[i], rows[i + 1], rows[i + 2]
            pos = offset - job.start
            frame_pgno, flags = unpack(data, pos)
            if frame_pgno != pgno:
                _fail(job.name, "page index does not match the page frames")
            if flags == PAGE_FLAG_SIZE:
                if size_of(data, pos + PAGE_HEADER_SIZE)[0] + _SIZED_HEADER != size:
                    _fail(job.name, "page index does not match the page frames")
                head = data[pos:pos + _SIZED_HEADER]
                try:
                    page = decompress(data[pos + _SIZED_HEADER:pos + size], uncompressed_size=page_size)
                except lz4.block.LZ4BlockError as e:
                    _fail(job.name, f"page {pgno}: corrupt LZ4 block at offset {offset}: {e}")
            elif flags == 0:
                head = data[pos:pos + PAGE_HEADER_SIZE]
                page = _frame_page(job.name, data[pos + PAGE_HEADER_SIZE:pos + size], pgno, page_size)
            else:
                _fail(job.name, f"invalid page header flags: 0x{flags:04x} (page {pgno})")
            if len(page) != page_size:
                _fail(job.name, f"page {pgno} decompressed to {len(page)} bytes, expected {page_size}")
            hashed += (head, page)
            length += len(head) + page_size
            if len(hashed) >= flush_at:
                crc = crc64(join(hashed), crc)
                hashed.clear()
            if job.track and pgno != lock:
                db_sum ^= page_checksum(pgno, page)
            writer.add(pgno, page)
        writer.flush()
    finally:
        os.close(fd)
    return RangeSum(crc64(join(hashed), crc), length, db_sum)


def _frame_page(name: str, frame, pgno: int, page_size: int) -> bytes:
    """Old layout (Litestream 0.5.0-0.5.15): one whole LZ4 frame, which must end exactly where
    the index says the next frame starts."""
    decoder = lz4.frame.LZ4FrameDecompressor()
    try:
        page = decoder.decompress(frame, max_length=page_size + 1)
    except RuntimeError as e:
        _fail(name, f"page {pgno}: corrupt LZ4 frame: {e}")
    if not decoder.eof or decoder.unused_data:
        _fail(name, "page index does not match the page frames")
    return page


def verify(layout: Layout, sums: list[RangeSum]) -> None:
    """The file checksum over header + ranges + tail, then the post-apply checksum."""
    crc = layout.header_crc
    for s in sums:
        crc = crc64_combine(crc, s.crc, s.length)
    tail = layout.tail
    post_apply, stored = _TRAILER.unpack_from(tail, len(tail) - TRAILER_SIZE)
    check_file_checksum(layout.name, stored, CHECKSUM_FLAG | crc64(tail[:-8], crc))
    db_sum = 0
    for s in sums:
        db_sum ^= s.db_checksum
    check_post_apply(layout.header, post_apply, db_sum, layout.name)


def _fail(name: str, message: str):
    raise LTXError(f"{label(name)}: {message}")
