"""Encryption at rest as a storage layer: ``SealedStorage`` wraps any Storage, encrypting
every object written and verifying and decrypting every object read.

Everything above the storage contract (LTX files, compaction, retention, restore) works
unchanged on plaintext; the store only ever holds sealed objects. Each tenant has its
own data key (``tenant_key.py``), so one tenant's key opens nothing of another's.

A sealed object (all integers big-endian)::

    offset  size  field
    0       4     magic b"TSE1" (not LTX1: Litestream refuses the file instead of misreading it)
    4       1     format version (1)
    5       4     segment size S: plaintext bytes per segment
    9       8     key id: fingerprint of the data key (``tenant_key.key_id``)
    17      8     plaintext size
    25      32    salt: random per object
    57      16    header tag: GCM tag over bytes 0..56 and the object's key
    73      ...   segments 0..n-1: ciphertext (S bytes, the last 0..S) + GCM tag (16)

The object's AES-256-GCM key is HKDF-SHA256(data key, salt): unique per object, so a
segment's nonce can simply be its index, unique without any bookkeeping. Each segment's
associated data is the object's key (relative to the sealed root), its index and whether
it is the last, so an object moved to another key, segments reordered, or an object cut
at a segment boundary does not decrypt. The header tag (nonce 0xff…ff, never a segment
index) authenticates the header and the key before any size in it is trusted.

An empty plaintext is one empty last segment. Since S is fixed, the plaintext size is a
function of the stored size, so ``list`` reports plaintext sizes without reading objects,
and a ranged read fetches only the segments it covers.

Two objects stay plain: the lease (``lock.json``), which Litestream's leaser must read,
and the tenant's wrapped data key, which must be read before anything can be decrypted.
"""

from __future__ import annotations

import io
import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import SealedObjectError, StorageError
from ..layout import LEASE_KEY
from .base import ObjectInfo, Storage, check_key, check_prefix, check_range

MAGIC = b"TSE1"
VERSION = 1
DEFAULT_SEGMENT_SIZE = 64 * 1024
TAG_BYTES = 16
KEY_BYTES = 32
SALT_BYTES = 32
_FIELDS = struct.Struct(">4sBI8sQ32s")
HEADER_BYTES = _FIELDS.size + TAG_BYTES  # 73
_HEADER_NONCE = b"\xff" * 12
_SEGMENT_AAD = struct.Struct(">QB")  # index, last flag
_HKDF_INFO = b"tenantsync sealed object v1"
_KEY_ID = re.compile(r"[0-9a-f]{16}")

#: The tenant's wrapped data key (tenant_key.py), stored beside the replica.
KEY_OBJECT = "tenantsync-key.json"
#: Object names stored as they are (see the module docstring), wherever they are.
PLAIN_NAMES = frozenset({LEASE_KEY, KEY_OBJECT})

#: A ranged read fetches from the object's start, header and segments in one request, when
#: that costs at most this many extra bytes; further in, it reads the header first (two
#: requests, one round trip more, instead of downloading what lies before the range).
ONE_REQUEST_SLACK = 256 * 1024


@dataclass(frozen=True)
class SealedHeader:
    """What a sealed object's header says, before it is authenticated (for ``ltx dump``)."""

    version: int
    segment_size: int
    key_id: str
    plaintext_size: int


def sealed_header(first_bytes: bytes) -> SealedHeader | None:
    """The header of a sealed object from its first bytes (HEADER_BYTES are enough), or None
    if they do not start with the sealed magic. Raises SealedObjectError for a sealed
    object's header that is cut short. Not authenticated: this needs no key."""
    if first_bytes[:4] != MAGIC:
        return None
    if len(first_bytes) < _FIELDS.size:
        raise SealedObjectError(f"sealed object header is truncated: {len(first_bytes)} of {HEADER_BYTES} bytes")
    _, version, segment_size, key_id, size, _ = _FIELDS.unpack_from(first_bytes)
    return SealedHeader(version, segment_size, key_id.hex(), size)


def sealed_size(plaintext_size: int, segment_size: int) -> int:
    """Stored size of a plaintext of ``plaintext_size`` bytes."""
    segments = max(1, -(-plaintext_size // segment_size))
    return HEADER_BYTES + plaintext_size + segments * TAG_BYTES


def plaintext_size(stored_size: int, segment_size: int) -> int | None:
    """Plaintext size of a sealed object of ``stored_size`` bytes, None if none has that size."""
    body = stored_size - HEADER_BYTES
    if body < TAG_BYTES:
        return None
    size = body - TAG_BYTES * -(-body // (segment_size + TAG_BYTES))
    return size if sealed_size(size, segment_size) == stored_size else None


def is_plain(key: str) -> bool:
    """Whether ``key`` is stored unencrypted (the lease and the wrapped data key)."""
    return key.rpartition("/")[2] in PLAIN_NAMES


class SealedStorage(Storage):
    """``inner`` with every object but the plain ones sealed under ``data_key``.

    ``key_id`` is the data key's fingerprint, written into every header so that an object
    sealed under another key is named as such instead of failing as tampered. Etags,
    timestamps and keys are the inner store's; sizes are plaintext sizes.
    """

    def __init__(self, inner: Storage, data_key: bytes, key_id: str, *, segment_size: int = DEFAULT_SEGMENT_SIZE):
        if len(data_key) != KEY_BYTES:
            raise ValueError(f"data key must be {KEY_BYTES} bytes, got {len(data_key)}")
        if not _KEY_ID.fullmatch(key_id):
            raise ValueError(f"key id must be 16 lowercase hex digits, got {key_id!r}")
        if not 1 <= segment_size < 1 << 32:
            raise ValueError(f"segment size must be 1..2**32-1 bytes, got {segment_size}")
        self.inner = inner
        self.key_id = key_id
        self.segment_size = segment_size
        self._data_key = data_key
        self._scope = ""  # this view's prefix below the sealed root, bound into every object

    @property
    def url(self) -> str:
        return self.inner.url

    @property
    def kind(self) -> str:
        return self.inner.kind

    def __repr__(self) -> str:
        return f"SealedStorage({self.inner.url!r}, key_id={self.key_id!r})"

    def _child(self, prefix: str) -> SealedStorage:
        child = SealedStorage(self.inner.child(prefix), self._data_key, self.key_id, segment_size=self.segment_size)
        child._scope = f"{self._scope}{prefix}/"
        return child

    # -- list and deletes: keys as they are, sizes of the plaintext --------------------

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for info in self.inner.list(check_prefix(prefix)):
            if not is_plain(info.key):
                # A size no sealed object has (a foreign or cut-short file) is reported as
                # it is: reading the object says what is wrong with it.
                size = plaintext_size(info.size, self.segment_size)
                if size is not None:
                    info = ObjectInfo(info.key, size, info.etag, info.modified)
            yield info

    def delete(self, keys: Iterable[str]) -> None:
        self.inner.delete(keys)

    def delete_all_versions(self, prefix: str) -> int:
        return self.inner.delete_all_versions(check_prefix(prefix))  # the inner store's versions: all of them

    # -- writes: sealed once per call, so the inner store's retries resend the same bytes --

    def write_if_absent(self, key: str, data: bytes | BinaryIO, *, timestamp: datetime | None = None) -> str:
        if is_plain(check_key(key)):
            return self.inner.write_if_absent(key, data, timestamp=timestamp)
        with self._seal(key, data) as sealed:
            return self.inner.write_if_absent(key, sealed, timestamp=timestamp)

    def write_if_match(
        self, key: str, data: bytes | BinaryIO, etag: str, *, timestamp: datetime | None = None
    ) -> str:
        if is_plain(check_key(key)):
            return self.inner.write_if_match(key, data, etag, timestamp=timestamp)
        with self._seal(key, data) as sealed:
            return self.inner.write_if_match(key, sealed, etag, timestamp=timestamp)

    def _seal(self, key: str, data: bytes | BinaryIO) -> _Sealing:
        """The sealed object for ``data``, encrypted as it is read (one segment held)."""
        source = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
        start = source.tell()
        size = source.seek(0, io.SEEK_END) - start
        source.seek(start)
        salt = os.urandom(SALT_BYTES)
        aead = AESGCM(self._object_key(salt))
        fields = _FIELDS.pack(MAGIC, VERSION, self.segment_size, bytes.fromhex(self.key_id), size, salt)
        bound = self._bound_key(key)
        header = fields + aead.encrypt(_HEADER_NONCE, b"", fields + bound)
        return _Sealing(source, start, size, header, aead, bound, self.segment_size, self.object_url(key))

    # -- read: only the segments covering the range, each verified --------------------

    def read(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        check_range(start, length)
        if is_plain(check_key(key)):
            return self.inner.read(key, start, length)
        s, step = self.segment_size, self.segment_size + TAG_BYTES
        first = start // s
        offset = HEADER_BYTES + first * step  # where segment `first` starts
        # Bytes up to the end of the range's last segment (None: to the object's end).
        end = None if length is None else HEADER_BYTES + ((start + length - 1) // s + 1) * step
        if first * step <= ONE_REQUEST_SLACK:
            blob = memoryview(self.inner.read(key, 0, end))  # a view: the body is not copied
            header, body = blob[:HEADER_BYTES].tobytes(), blob[offset:]
            aead, size = self._open_header(key, header)
        else:
            header = self.inner.read(key, 0, HEADER_BYTES)
            aead, size = self._open_header(key, header)
            if start >= size:
                return b""
            body = memoryview(self.inner.read(key, offset, min(end, sealed_size(size, s)) - offset if end else None))
        if start >= size and start > 0:  # an empty object's one segment is still verified
            return b""
        last = max(1, -(-size // s)) - 1
        upto = last if length is None else min(last, (start + length - 1) // s)
        expected = (upto - first) * step + (size - last * s if upto == last else s) + TAG_BYTES
        if len(body) < expected:
            raise SealedObjectError(f"{self.object_url(key)} is truncated: shorter than the "
                                    f"{sealed_size(size, s)} bytes its header promises")
        if upto == last and end is None and len(body) > expected:  # seen only when read to its end
            raise SealedObjectError(f"{self.object_url(key)} is extended: longer than the "
                                    f"{sealed_size(size, s)} bytes its header promises")
        bound = self._bound_key(key)
        plain = []
        for index in range(first, upto + 1):
            at = (index - first) * step
            segment = body[at : at + step] if index < upto else body[at:expected]
            plain.append(self._decrypt(aead, key, index, segment, bound + _SEGMENT_AAD.pack(index, index == last)))
        skip = start - first * s
        data = b"".join(plain)
        return data[skip:] if length is None else data[skip : skip + length]

    def _open_header(self, key: str, header: bytes):
        """The object's AEAD and plaintext size from its authenticated header."""
        url = self.object_url(key)
        if header[:4] != MAGIC:
            raise SealedObjectError(f"{url} is not encrypted, but this replica is: refusing a plain object in it")
        if len(header) < HEADER_BYTES:
            raise SealedObjectError(f"{url} is truncated: {len(header)} bytes, shorter than a sealed header")
        _, version, segment_size, key_id, size, salt = _FIELDS.unpack_from(header)
        if version != VERSION:
            raise SealedObjectError(f"{url} is sealed in format version {version}; this tenantsync reads {VERSION}")
        if key_id.hex() != self.key_id:
            raise SealedObjectError(
                f"{url} is sealed with key id {key_id.hex()}, but this replica's key is {self.key_id}"
            )
        if segment_size != self.segment_size:
            raise SealedObjectError(
                f"{url} is sealed in {segment_size}-byte segments; this replica reads {self.segment_size}-byte ones"
            )
        aead = AESGCM(self._object_key(salt))
        fields = header[: _FIELDS.size]
        self._decrypt(aead, key, None, header[_FIELDS.size : HEADER_BYTES], fields + self._bound_key(key),
                      nonce=_HEADER_NONCE)
        return aead, size

    def _decrypt(self, aead, key: str, index: int | None, sealed, aad: bytes, nonce: bytes | None = None) -> bytes:
        try:
            return aead.decrypt(_nonce(index) if nonce is None else nonce, sealed, aad)
        except InvalidTag:
            where = "its header" if index is None else f"segment {index}"
            raise SealedObjectError(
                f"{self.object_url(key)} does not decrypt ({where}): tampered with, truncated, "
                "moved from another key or sealed with another key"
            ) from None

    # -- keys --------------------------------------------------------------------------

    def _object_key(self, salt: bytes) -> bytes:
        return HKDF(hashes.SHA256(), KEY_BYTES, salt, _HKDF_INFO).derive(self._data_key)

    def _bound_key(self, key: str) -> bytes:
        """The key every tag binds: relative to the sealed root, so an object copied into
        another tenant's child (same data key or not) does not open there."""
        return (self._scope + key).encode()


class _Sealing(io.RawIOBase):
    """A sealed object made as it is read: the header, then each segment encrypted when the
    reader reaches it, from ``source`` (seekable, the plaintext from ``start``). The inner
    store reads a write's body more than once (hashes, a retry, a comparison after a lost
    answer), each time from its start: the same salt gives the same bytes, with no copy of
    the sealed object on disk or in memory.

    Encrypting a segment again under its nonce is safe only for the same plaintext: each
    segment's tag from the first pass is kept, and a segment whose plaintext changed between
    passes (its tag differs) is refused before its bytes leave."""

    def __init__(self, source: BinaryIO, start: int, size: int, header: bytes, aead: AESGCM, bound: bytes,
                 segment_size: int, url: str):
        super().__init__()
        self._source, self._start, self._size = source, start, size
        self._header, self._aead, self._bound, self._url = header, aead, bound, url
        self._segment_size = segment_size
        self._segments = max(1, -(-size // segment_size))
        self._total = sealed_size(size, segment_size)
        self._pos = 0
        self._held: tuple[int, bytes] | None = None
        self._tags: dict[int, bytes] = {}

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._total}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        end = self._total if n is None or n < 0 else min(self._total, self._pos + n)
        pieces = []
        step = self._segment_size + TAG_BYTES
        while self._pos < end:
            if self._pos < HEADER_BYTES:
                piece = self._header[self._pos:end]
            else:
                index, offset = divmod(self._pos - HEADER_BYTES, step)
                piece = self._segment(index)[offset:offset + end - self._pos]
            pieces.append(piece)
            self._pos += len(piece)
        return b"".join(pieces)

    def readinto(self, buffer) -> int:  # noqa: ANN001 - a writable buffer
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def _segment(self, index: int) -> bytes:
        if self._held is not None and self._held[0] == index:
            return self._held[1]
        last = index == self._segments - 1
        want = self._size - index * self._segment_size if last else self._segment_size
        self._source.seek(self._start + index * self._segment_size)
        chunk = self._source.read(want)
        if len(chunk) != want:
            raise StorageError(f"{self._url}: the data to write ended early (it changed while read)")
        sealed = self._aead.encrypt(_nonce(index), chunk, self._bound + _SEGMENT_AAD.pack(index, last))
        if self._tags.setdefault(index, sealed[-TAG_BYTES:]) != sealed[-TAG_BYTES:]:
            raise StorageError(f"{self._url}: the data to write changed while it was sent")
        self._held = (index, sealed)
        return sealed


def _nonce(index: int) -> bytes:
    return index.to_bytes(12, "big")
