"""What a write sends: resent from its start on every try, sent against a deadline, and
compared with what the store holds when a retry's conditional write fails.

A conditional PUT whose answer was lost (a reset, a timeout) may have been applied. Its
retry then meets 412 PreconditionFailed because of our own first try: write-if-absent
finds the key present, write-if-match finds a new etag. Our writes have deterministic
content (LTX files, lease records with their expiry), so "the store holds exactly these
bytes" means the write landed and the retry must report success, not a conflict.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO

# Bytes read from the payload per call while sending (and compared per ranged read): small
# enough that a deadline is checked often on a slow link, large enough to cost nothing.
BLOCK = 64 * 1024
COMPARE_BLOCK = 8 * 1024 * 1024


class TooSlow(Exception):
    """A transfer ran past its deadline (its size at the minimum transfer rate)."""


class Payload:
    """``data`` (bytes, or a seekable binary file positioned at the content's start)."""

    def __init__(self, data: bytes | BinaryIO):
        self._file = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
        self._start = self._file.tell()
        self.size = self._file.seek(0, io.SEEK_END) - self._start
        self._file.seek(self._start)
        self._md5: str | None = None
        self._sha256: str | None = None

    def sending(self, deadline: float) -> _Sending:
        """A file-like body for one try, from the start, that fails with TooSlow once the
        monotonic clock passes ``deadline``. Always a file, never bytes: a bytes body goes
        out in one sendall() whose socket timeout would bound the whole upload, while a
        file goes out a block at a time, each block bounded by the timeout."""
        self._file.seek(self._start)
        return _Sending(self, deadline)

    def blocks(self, size: int = BLOCK) -> Iterator[bytes]:
        self._file.seek(self._start)
        while block := self._file.read(size):
            yield block

    def md5(self) -> str:
        """Hex MD5 of the content: the etag S3 gives a single-part PUT (unencrypted or SSE-S3)."""
        if self._md5 is None:
            digest = hashlib.md5(usedforsecurity=False)
            for block in self.blocks(COMPARE_BLOCK):
                digest.update(block)
            self._md5 = digest.hexdigest()
        return self._md5

    def sha256(self) -> str:
        """Hex SHA-256 of the content: the payload hash of a request signed over plain HTTP."""
        if self._sha256 is None:
            digest = hashlib.sha256()
            for block in self.blocks(COMPARE_BLOCK):
                digest.update(block)
            self._sha256 = digest.hexdigest()
        return self._sha256

    def is_stored(self, size: int, etag: str, read: Callable[[int, int], bytes]) -> bool:
        """Whether the object the store holds (``size``, ``etag``, ``read(start, length)``)
        has exactly our content. The etag decides when it is the MD5 of ours; other etags
        (SSE-KMS, multipart) say nothing about content, so the bytes are compared then."""
        if size != self.size:
            return False
        if etag == self.md5():
            return True
        offset = 0
        for block in self.blocks(COMPARE_BLOCK):
            if read(offset, len(block)) != block:
                return False
            offset += len(block)
        return True


class _Sending(io.RawIOBase):
    """One try's view of a Payload for the HTTP client: read/seek/tell relative to its start."""

    def __init__(self, payload: Payload, deadline: float):
        self._payload, self._deadline = payload, deadline

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if time.monotonic() > self._deadline:
            raise TooSlow(f"upload of {self._payload.size} bytes ran past its deadline")
        left = self._payload.size - self.tell()
        return self._payload._file.read(left if size is None or size < 0 else min(size, BLOCK, left))

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: self._payload._start, io.SEEK_CUR: self._payload._file.tell(),
                io.SEEK_END: self._payload._start + self._payload.size}[whence]
        return self._payload._file.seek(base + offset) - self._payload._start

    def tell(self) -> int:
        return self._payload._file.tell() - self._payload._start
