"""LTX v3 encoder writing the current page frame layout (Litestream >= 0.5.16, ltx v0.5.2)."""

from __future__ import annotations

import io
import struct
from collections.abc import Iterable

import lz4.block

from tenantsync.errors import LTXError
from tenantsync.ltx.checksum import crc64
from tenantsync.ltx.format import (
    CHECKSUM_FLAG, HEADER_SIZE, PAGE_FLAG_SIZE, PAGE_HEADER_SIZE, Header, Trailer,
    encode_page_index, format_filename, lock_pgno,
)

_FRAME = struct.Struct(">IHI")
_U64 = struct.Struct(">Q")
_compress = lz4.block.compress
_BATCH_BYTES = 1 << 20


class Encoder:
    """Streams one LTX file in constant memory. Pages are compressed as they arrive but
    written and hashed in ~1 MiB batches: per-call costs of write() and anycrc dominate
    at 4 KiB. Page rules are checked before anything is queued, so a refused page leaves
    the encoder usable. Nothing is complete on fileobj until close() returns."""

    def __init__(self, fileobj, header: Header):
        self._name = format_filename(header.min_txid, header.max_txid)
        try:
            header.validate()
        except LTXError as e:
            raise LTXError(f"encode {self._name}: invalid header: {e}") from None
        raw = header.encode()
        fileobj.write(raw)
        self.header = header
        self._file = fileobj
        self._crc = crc64(raw)
        self._unwritten: list = []
        self._unhashed: list = []
        self._flush_at = 2 * max(1, _BATCH_BYTES // header.page_size)
        self._offset = HEADER_SIZE
        self._index: list[int] = []  # flat (pgno, offset, size) triples
        self._prev = 0
        self._lock = lock_pgno(header.page_size)
        self._trailer: Trailer | None = None

    def add_page(self, pgno: int, data) -> None:
        if self._trailer is not None:
            self._fail("ltx encoder closed")
        if type(data) is not bytes:
            data = bytes(data)  # hashed later: the caller may reuse its buffer meanwhile
        self._check_page(pgno, len(data))
        block = _compress(data, store_size=False)
        frame = _FRAME.pack(pgno, PAGE_FLAG_SIZE, len(block))
        self._unwritten += (frame, block)
        # Go hashes the frame header as stored but the page *decompressed*: the checksum
        # must not depend on which LZ4 implementation compressed it.
        self._unhashed += (frame, data)
        if len(self._unhashed) >= self._flush_at:
            self._flush()
        size = len(frame) + len(block)
        self._index += (pgno, self._offset, size)
        self._offset += size
        self._prev = pgno

    def close(self, post_apply_checksum: int = 0) -> Trailer:
        """Idempotent like Go's Close: a second call returns the same trailer."""
        if self._trailer is not None:
            return self._trailer
        self._check_complete()
        self._check_post_apply(post_apply_checksum)
        tail = bytes(PAGE_HEADER_SIZE) + encode_page_index(self._index) + _U64.pack(post_apply_checksum)
        self._unwritten.append(tail)
        self._unhashed.append(tail)
        self._flush()
        file_checksum = CHECKSUM_FLAG | self._crc
        self._file.write(_U64.pack(file_checksum))
        self._trailer = Trailer(post_apply_checksum, file_checksum)
        return self._trailer

    def _flush(self) -> None:
        self._file.write(b"".join(self._unwritten))
        self._crc = crc64(b"".join(self._unhashed), self._crc)
        self._unwritten.clear()
        self._unhashed.clear()

    def _check_page(self, pgno: int, size: int) -> None:
        header = self.header
        if pgno > header.commit:
            self._fail(f"page number {pgno} out-of-bounds for commit size {header.commit}")
        if pgno < 1:
            self._fail("page number required")
        if size != header.page_size:
            self._fail(f"invalid page buffer size: {size}, expecting {header.page_size}")
        if pgno == self._lock:
            self._fail(f"cannot encode lock page: pgno={pgno}")
        if header.is_snapshot:
            self._check_snapshot_sequence(pgno)
        elif pgno <= self._prev:
            self._fail(f"out-of-order page numbers: {self._prev},{pgno}")

    def _check_snapshot_sequence(self, pgno: int) -> None:
        """A snapshot replaces the database, so a gap would silently lose a page."""
        prev = self._prev
        if prev == 0 and pgno != 1:
            self._fail("snapshot transaction file must start with page number 1")
        if prev == self._lock - 1 and pgno != prev + 2:
            self._fail(f"nonsequential page numbers in snapshot transaction (skip lock page): {prev},{pgno}")
        if prev != 0 and prev != self._lock - 1 and pgno != prev + 1:
            self._fail(f"nonsequential page numbers in snapshot transaction: {prev},{pgno}")

    def _check_complete(self) -> None:
        """Go checks the snapshot sequence per page but not that it reaches commit; a
        truncated snapshot would restore to a corrupt database, so refuse it here."""
        commit = self.header.commit
        last = commit - 1 if commit == self._lock else commit
        if self.header.is_snapshot and self._prev != last:
            self._fail(f"snapshot ends at page {self._prev}, commit size {commit} needs page {last}")

    def _check_post_apply(self, checksum: int) -> None:
        """Go's Trailer.Validate plus its zero-length-database rule."""
        if self.header.no_checksum:
            if checksum != 0:
                self._fail("post-apply checksum not allowed")
        elif checksum == 0:
            self._fail("post-apply checksum required")
        elif not checksum & CHECKSUM_FLAG:
            self._fail("invalid post-apply checksum format")
        if self.header.commit == 0 and checksum != CHECKSUM_FLAG:
            self._fail("post-apply checksum must be empty for zero-length database")

    def _fail(self, message: str):
        raise LTXError(f"encode {self._name}: {message}")


def encode_file(header: Header, pages: Iterable[tuple[int, bytes]], post_apply_checksum: int = 0) -> bytes:
    buf = io.BytesIO()
    encoder = Encoder(buf, header)
    for pgno, data in pages:
        encoder.add_page(pgno, data)
    encoder.close(post_apply_checksum)
    return buf.getvalue()
