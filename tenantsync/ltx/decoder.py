"""LTX v3 decoder: reads both page frame layouts Litestream 0.5.x has written, and verifies
every checksum the file carries before a caller may trust its pages."""

from __future__ import annotations

import bisect
import struct

import lz4.block
import lz4.frame

from tenantsync.errors import ChecksumMismatch, LTXError
from tenantsync.ltx.checksum import crc64, page_checksum
from tenantsync.ltx.format import (
    CHECKSUM_FLAG, HEADER_SIZE, PAGE_FLAG_SIZE, PAGE_HEADER_SIZE, TRAILER_SIZE, Header,
    Trailer, decode_page_index, encode_page_index, label, lock_pgno,
)

_FRAME = struct.Struct(">IHI")
_FRAME_SIZE = _FRAME.size
_TRAILER = struct.Struct(">QQ")
_INDEX_SIZE = struct.Struct(">Q")
_READ_CHUNK = 1 << 20
_CRC_BATCH = 1 << 20
_decompress = lz4.block.decompress


class _Source:
    """One buffer the frame parser slices into. Bytes are used in place; a stream is read
    in 1 MiB chunks so per-frame work stays a slice, never a read() call."""

    def __init__(self, source, name: str):
        self.name = name
        self.base = 0  # file offset of buf[0]
        if isinstance(source, (bytes, bytearray, memoryview)):
            self.buf = memoryview(source).cast("B")
            self.stream = None
        else:
            self.buf = memoryview(b"")
            self.stream = source

    def fill(self, pos: int, n: int) -> tuple[memoryview, int]:
        """Make buf[pos:pos+n] available; returns the (possibly new) buffer and position."""
        kept = self.buf[pos:]
        if self.stream is None:
            self.truncated(pos, n, len(kept))
        parts, have = [bytes(kept)], len(kept)
        while have < n:
            chunk = self.stream.read(max(n - have, _READ_CHUNK))
            if not chunk:
                self.truncated(pos, n, have)
            parts.append(chunk)
            have += len(chunk)
        self.base += pos
        self.buf = memoryview(b"".join(parts))
        return self.buf, 0

    def rest(self, pos: int) -> memoryview:
        if self.stream is None:
            return self.buf[pos:]
        parts = [bytes(self.buf[pos:])]
        while chunk := self.stream.read(_READ_CHUNK):
            parts.append(chunk)
        return memoryview(b"".join(parts))

    def truncated(self, pos: int, needed: int, left: int):
        raise LTXError(
            f"{label(self.name)}: truncated: {needed} bytes needed at offset {self.base + pos}, "
            f"only {left} left")


class Decoder:
    """Iterate pages(), then close() to verify. Pages are yielded before the file checksum
    can be checked (it sits at the end), so callers must not commit them until close()
    returns: that is what lets a restore stream a 1 GB snapshot in constant memory."""

    def __init__(self, source, name: str = ""):
        self.name = name
        self._src = _Source(source, name)
        buf, pos = self._src.buf, 0
        if len(buf) < HEADER_SIZE:
            buf, pos = self._src.fill(0, HEADER_SIZE)
        raw = buf[pos:pos + HEADER_SIZE]
        self.header = Header.decode(raw, name)
        self._crc = crc64(raw)
        self._pos = pos + HEADER_SIZE
        self._frames: list[int] = []  # flat (pgno, offset, size) triples, as in the index
        self._db_checksum = CHECKSUM_FLAG
        self._pages_done = False
        self._trailer: Trailer | None = None
        self._pages = self._iter_pages()

    def pages(self):
        """The same iterator on every call, so close() can finish what a caller left."""
        return self._pages

    def close(self) -> Trailer:
        if self._trailer is None:
            for _ in self._pages:
                pass
            if not self._pages_done:
                self._fail("cannot close: page block was not decoded")
            self._trailer = self._verify_tail()
        return self._trailer

    def _iter_pages(self):
        """The hot path of a restore: per page one unpack, one slice, one decompress. The
        CRC is fed in ~1 MiB joins because each anycrc call costs more than hashing 4 KiB."""
        header, src, frames = self.header, self._src, self._frames
        page_size, commit = header.page_size, header.commit
        track = header.is_snapshot and not header.no_checksum
        lock = lock_pgno(page_size)
        unpack, decompress, crc, join = _FRAME.unpack_from, _decompress, crc64, b"".join
        hashed: list = []
        hash_later = hashed.append
        flush_at = 2 * max(1, _CRC_BATCH // page_size)
        buf, pos, running, prev = src.buf, self._pos, self._crc, 0
        while True:
            if pos + _FRAME_SIZE > len(buf):
                buf, pos = src.fill(pos, _FRAME_SIZE)
            pgno, flags, size = unpack(buf, pos)
            if flags == PAGE_FLAG_SIZE and prev < pgno <= commit:
                end = pos + _FRAME_SIZE + size
                if end > len(buf):
                    buf, pos = src.fill(pos, _FRAME_SIZE + size)
                    end = pos + _FRAME_SIZE + size
                try:
                    page = decompress(buf[pos + _FRAME_SIZE:end], uncompressed_size=page_size)
                except lz4.block.LZ4BlockError as e:
                    self._fail(f"page {pgno}: corrupt LZ4 block at offset {src.base + pos}: {e}")
                hash_later(buf[pos:pos + _FRAME_SIZE])
                frames += (pgno, src.base + pos, end - pos)
            elif pgno == 0 and flags == 0:
                hash_later(buf[pos:pos + PAGE_HEADER_SIZE])
                break
            else:
                self._check_frame(pgno, flags, prev)
                start = src.base + pos
                hash_later(buf[pos:pos + PAGE_HEADER_SIZE])
                page, buf, end = self._read_lz4_frame(buf, pos + PAGE_HEADER_SIZE, pgno)
                frames += (pgno, start, src.base + end - start)
            if len(page) != page_size:
                self._fail(f"page {pgno} decompressed to {len(page)} bytes, expected {page_size}")
            hash_later(page)
            if len(hashed) >= flush_at:
                running = crc(join(hashed), running)
                hashed.clear()
            if track and pgno != lock:
                self._db_checksum ^= page_checksum(pgno, page)
            prev, pos = pgno, end
            yield pgno, page
        self._crc, self._pos = crc(join(hashed), running), pos + PAGE_HEADER_SIZE
        self._check_snapshot_complete()
        self._pages_done = True

    def _check_frame(self, pgno: int, flags: int, prev: int) -> None:
        """Go's PageHeader.Validate, plus the ordering and bounds Go's decoder leaves to callers."""
        if pgno == 0:
            self._fail("page number required")
        if flags & ~PAGE_FLAG_SIZE:
            self._fail(f"invalid page header flags: 0x{flags:04x} (page {pgno})")
        if pgno <= prev:
            self._fail(f"out-of-order page numbers: {prev},{pgno}")
        if pgno > self.header.commit:
            self._fail(f"page number {pgno} out-of-bounds for commit size {self.header.commit}")

    def _read_lz4_frame(self, buf, pos: int, pgno: int):
        """Old layout (Litestream 0.5.0-0.5.15) has no length prefix: only the LZ4 frame
        decoder knows where the frame ends; it hands back its overshoot as unused_data.
        Output is capped just past one page so a corrupt frame cannot balloon in memory."""
        src, page_size = self._src, self.header.page_size
        decoder = lz4.frame.LZ4FrameDecompressor()
        parts, produced = [], 0
        try:
            while not decoder.eof and produced <= page_size:
                chunk = b""
                if decoder.needs_input:
                    if pos >= len(buf):
                        buf, pos = src.fill(pos, 1)
                    chunk = buf[pos:pos + page_size + 64]
                    pos += len(chunk)
                parts.append(decoder.decompress(chunk, max_length=page_size + 1 - produced))
                produced += len(parts[-1])
        except RuntimeError as e:
            self._fail(f"page {pgno}: corrupt LZ4 frame: {e}")
        return b"".join(parts), buf, pos - len(decoder.unused_data or b"")

    def _check_snapshot_complete(self) -> None:
        check_snapshot_pages(self.header, self._frames[0::3], self.name)

    def _verify_tail(self) -> Trailer:
        """Go ignores the index when verifying; here it must equal the one the frames imply,
        because ranged readers trust it and the file checksum cannot vouch for its meaning."""
        rest = self._src.rest(self._pos)
        index = encode_page_index(self._frames)
        need = len(index) + TRAILER_SIZE
        if len(rest) < need:
            self._fail(f"truncated: {len(rest)} bytes after the page block, {need} expected")
        if len(rest) > need:
            self._fail(f"{len(rest) - need} unexpected bytes after the trailer")
        post_apply, stored = _TRAILER.unpack_from(rest, len(index))
        check_file_checksum(self.name, stored, CHECKSUM_FLAG | crc64(rest[:-8], self._crc))
        if rest[:len(index)] != index:
            self._fail("page index does not match the page frames")
        check_post_apply(self.header, post_apply, self._db_checksum, self.name)
        return Trailer(post_apply, stored)

    def _fail(self, message: str):
        raise LTXError(f"{label(self.name)}: {message}")


def check_snapshot_pages(header: Header, pgnos: list[int], name: str) -> None:
    """A snapshot replaces the database: a missing page would restore as corruption.
    ``pgnos`` are already known ascending and within commit, so counting suffices."""
    if not header.is_snapshot:
        return
    lock = lock_pgno(header.page_size)
    want = header.commit - (header.commit >= lock)
    i = bisect.bisect_left(pgnos, lock)
    have = len(pgnos) - (i < len(pgnos) and pgnos[i] == lock)
    if have != want:
        raise LTXError(f"{label(name)}: snapshot holds {have} pages, commit size {header.commit} needs {want}")


def check_file_checksum(name: str, stored: int, computed: int) -> None:
    if computed != stored:
        raise ChecksumMismatch(
            f"{label(name)}: file checksum mismatch: trailer has {stored:016x}, "
            f"content hashes to {computed:016x}")


def check_post_apply(header: Header, post_apply: int, db_checksum: int, name: str) -> None:
    """Only snapshots that track the database checksum carry one (Litestream's do not)."""
    if header.is_snapshot and not header.no_checksum:
        computed = CHECKSUM_FLAG | db_checksum
        if post_apply != computed:
            raise ChecksumMismatch(
                f"{label(name)}: post-apply checksum in trailer ({post_apply:016x}) "
                f"does not match calculated checksum ({computed:016x})")


def decode_file(data, name: str = "") -> tuple[Header, list[tuple[int, bytes]], Trailer]:
    decoder = Decoder(data, name)
    pages = list(decoder.pages())
    return decoder.header, pages, decoder.close()


def read_header(data_or_file, name: str = "") -> Header:
    """Only the first 100 bytes are read: enough to plan a restore without fetching pages."""
    if isinstance(data_or_file, (bytes, bytearray, memoryview)):
        return Header.decode(memoryview(data_or_file).cast("B")[:HEADER_SIZE], name)
    raw = b""
    while len(raw) < HEADER_SIZE and (chunk := data_or_file.read(HEADER_SIZE - len(raw))):
        raw += chunk
    return Header.decode(raw, name)


def read_page_index(data, name: str = "") -> dict[int, tuple[int, int]]:
    """`data` may be the whole file or just a tail holding the index and trailer (a ranged
    GET): the index ends 24 bytes before the end and its u64 length says where it starts."""
    tail = memoryview(data).cast("B")
    end = len(tail) - TRAILER_SIZE - _INDEX_SIZE.size
    if end < 1:
        raise LTXError(f"{label(name)}: truncated: {len(tail)} bytes cannot hold a page index")
    (length,) = _INDEX_SIZE.unpack_from(tail, end)
    if length < 1 or length > end:
        raise LTXError(f"{label(name)}: page index size {length} exceeds the {end} bytes before it")
    rows = decode_page_index(tail[end - length:end], name)
    return dict(zip(rows[:, 0].tolist(), zip(rows[:, 1].tolist(), rows[:, 2].tolist())))
