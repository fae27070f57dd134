"""Cold bundles: a tenant's whole database at one TXID as one zstd-compressed object.

A tenant archived for longer than its point-in-time window needs none of its history, only
its last state. As LTX levels that state costs an LZ4 snapshot plus the level files still
kept; as a bundle it is one object, compressed by zstd (with a fleet dictionary,
``dictionary.py``, when one is given), which on the many small, similar databases of a SaaS
is a fraction of the snapshot's bytes (``bench/bundles.py``).

The object, integers big-endian as in LTX::

    "TSB1" | manifest length u32 | CRC-64 of the manifest u64 | manifest (JSON) | frames

The manifest says which state the bundle holds (TXID, page size and count, the LTX checksum
and the SHA-256 of the image, the dictionary id) and how long each frame is. A frame is one
independent zstd frame of ``frame_size`` bytes of the image (the last one shorter) carrying
zstd's own content checksum, so a restore decompresses frame by frame into its file and never
holds the database in memory. Nothing at a restore's output path is ever partial or
unverified, and :func:`verify_bundle`, the same checks without a file, is what must pass
before the LTX levels a bundle replaces are deleted.

Encryption is a storage layer below this one: bundles go through the Storage interface
already compressed, and such a layer encrypts what it is given (compress, then encrypt).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import BinaryIO

import zstandard

from . import layout
from .dictionary import Dictionaries
from .errors import BundleError, DictionaryMissing, PreconditionFailed
from .ltx.checksum import crc64, page_checksum
from .ltx.format import CHECKSUM_FLAG, lock_pgno
from .output import put_in_place, remove_quietly, temporary_beside
from .storage.base import Storage
from .tenants import header_page_size

MAGIC = b"TSB1"
FORMAT = 1
_PREFIX = struct.Struct(">4sIQ")  # magic, manifest length, CRC-64 of the manifest
# A manifest lists one length per frame: 64 MiB of JSON would be a database of ~5 PB.
MAX_MANIFEST = 64 << 20

#: Image bytes per zstd frame: the memory a restore holds, and a multiple of every page size.
FRAME_SIZE = 1 << 20
#: zstd level of new bundles. A bundle is written once, when a tenant goes cold, by a
#: background job, and read on each hydration, which zstd decompresses at the same speed
#: whatever the level: the slow, dense end of the scale costs once and saves bytes for
#: months (docs/BENCHMARKS.md, cold bundles).
DEFAULT_LEVEL = 19

#: The first read of a bundle: a small tenant's whole object comes in one GET.
FIRST_READ = 1 << 20
#: Ranged reads after the first, the next one in flight while this one is decompressed.
READ_BLOCK = 8 << 20
# Compressed frames are gathered here before the manifest, which lists their lengths, can
# be written ahead of them: in memory for a small tenant, on disk beyond this.
SPOOL_BYTES = 64 << 20



@dataclass(frozen=True)
class BundleInfo:
    """A bundle's manifest and where it is stored (``size``: the object's bytes)."""

    key: str
    size: int
    txid: int
    page_size: int
    page_count: int
    ltx_checksum: int  # what database_checksum() gives for the image: LTX's post-apply checksum
    image_sha256: str
    dictionary_id: int | None
    level: int
    created: datetime
    frame_size: int
    frames: tuple[int, ...]  # compressed length of each frame, in order

    @property
    def db_size(self) -> int:
        return self.page_count * self.page_size

    def same_state(self, other: BundleInfo) -> bool:
        """Whether two bundles hold the same database, however they were compressed."""
        fields = ("txid", "page_size", "page_count", "ltx_checksum", "image_sha256")
        return all(getattr(self, f) == getattr(other, f) for f in fields)


# -- writing -------------------------------------------------------------------------------


def write_bundle(storage: Storage, db: str | os.PathLike | BinaryIO, txid: int, *,
                 dictionary: zstandard.ZstdCompressionDict | None = None,
                 level: int = DEFAULT_LEVEL) -> BundleInfo:
    """Store the database ``db`` (a path, or a binary file at its start) as the bundle of
    ``txid`` in the tenant's replica ``storage``, and return what was stored.

    ``db`` must be the database at ``txid`` and nothing else: a closed file with no WAL
    beside it, such as a restore's output. The write never overwrites: if the bundle exists
    already and holds the same database (a retried archival), that is success and its
    manifest is returned; if it holds another, BundleError.
    """
    key = layout.bundle_key(txid)
    compressor = _compressor(dictionary, level)
    with _opened(db) as image, tempfile.SpooledTemporaryFile(SPOOL_BYTES) as frames:
        name = getattr(image, "name", "database")
        page_size, page_count, ltx, sha, lengths = 0, 0, 0, hashlib.sha256(), []
        while chunk := image.read(FRAME_SIZE):
            page_size = page_size or _page_size(chunk, name)
            if len(chunk) % page_size:
                raise BundleError(f"{name}: size is not a whole number of {page_size}-byte pages")
            sha.update(chunk)
            ltx ^= _pages_checksum(chunk, page_count + 1, page_size)
            page_count += len(chunk) // page_size
            lengths.append(frames.write(compressor.compress(chunk)))
        if not page_count:
            raise BundleError(f"{name}: empty file, not a SQLite database")
        created = datetime.now(timezone.utc)
        manifest = _encode_manifest(txid, page_size, page_count, CHECKSUM_FLAG | ltx, sha.hexdigest(),
                                    dictionary.dict_id() if dictionary else None, level, created, lengths)
        with tempfile.SpooledTemporaryFile(SPOOL_BYTES) as obj:
            obj.write(_PREFIX.pack(MAGIC, len(manifest), crc64(manifest)) + manifest)
            frames.seek(0)
            shutil.copyfileobj(frames, obj)
            size = obj.tell()
            obj.seek(0)
            info = _manifest(storage, key, size, manifest)
            try:
                storage.write_if_absent(key, obj)
            except PreconditionFailed:
                return _existing(storage, key, info)
    return info


def _existing(storage: Storage, key: str, ours: BundleInfo) -> BundleInfo:
    stored = read_manifest(storage, key)
    if not stored.same_state(ours):
        raise BundleError(
            f"{storage.object_url(key)}: already holds another database at txid {ours.txid:016x} "
            f"(image sha256 {stored.image_sha256[:16]}…, ours {ours.image_sha256[:16]}…)"
        )
    return stored


@contextlib.contextmanager
def _opened(db):
    if isinstance(db, (str, os.PathLike)):
        with open(db, "rb") as f:
            yield f
    else:
        yield db


def _page_size(first: bytes, name: str) -> int:
    size = header_page_size(first)
    if size is None:
        raise BundleError(f"{name}: not a SQLite database (no SQLite header with a valid page size)")
    return size


def _pages_checksum(chunk, first_pgno: int, page_size: int) -> int:
    """XOR of LTX page checksums of the pages in ``chunk``; the lock page is skipped as in
    ``ltx.checksum.database_checksum``, of which this is the piecewise form."""
    lock, view, total = lock_pgno(page_size), memoryview(chunk), 0
    for i, offset in enumerate(range(0, len(chunk), page_size), first_pgno):
        if i != lock:
            total ^= page_checksum(i, view[offset:offset + page_size])
    return total


_local = threading.local()


def _compressor(dictionary: zstandard.ZstdCompressionDict | None, level: int) -> zstandard.ZstdCompressor:
    """One compressor per thread, dictionary and level: building one (and digesting a
    dictionary) costs more than compressing a small tenant."""
    cache = _local.__dict__.setdefault("compressors", {})
    key = (dictionary.dict_id() if dictionary else None, level)
    if key not in cache:
        cache[key] = zstandard.ZstdCompressor(level=level, dict_data=dictionary, write_checksum=True,
                                              write_content_size=True)
    return cache[key]


def _decompressor(dictionary: zstandard.ZstdCompressionDict | None) -> zstandard.ZstdDecompressor:
    cache = _local.__dict__.setdefault("decompressors", {})
    key = dictionary.dict_id() if dictionary else None
    if key not in cache:
        cache[key] = zstandard.ZstdDecompressor(dict_data=dictionary)
    return cache[key]


# -- the manifest --------------------------------------------------------------------------


def _encode_manifest(txid, page_size, page_count, ltx_checksum, sha256, dict_id, level, created, frames) -> bytes:
    return json.dumps({
        "format": FORMAT,
        "txid": f"{txid:016x}",
        "page_size": page_size,
        "page_count": page_count,
        # Hex strings: 64-bit values do not survive every JSON reader as numbers.
        "ltx_checksum": f"{ltx_checksum:016x}",
        "image_sha256": sha256,
        "dictionary_id": dict_id,
        "level": level,
        "created": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "frame_size": FRAME_SIZE,
        "frames": frames,
    }, separators=(",", ":")).encode()


def _manifest(storage: Storage, key: str, size: int, raw: bytes) -> BundleInfo:
    """Parse and check a manifest whose CRC matched: a reader must never act on a field it
    did not check, and the frames must add up to the image the manifest describes."""
    url = storage.object_url(key)
    try:
        m = json.loads(raw)
        if m["format"] != FORMAT:
            raise BundleError(f"{url}: bundle format {m['format']!r}, this version reads {FORMAT}")
        info = BundleInfo(
            key=key, size=size, txid=int(m["txid"], 16), page_size=_int(m["page_size"]),
            page_count=_int(m["page_count"]), ltx_checksum=int(m["ltx_checksum"], 16),
            image_sha256=m["image_sha256"],
            dictionary_id=None if m["dictionary_id"] is None else _int(m["dictionary_id"]),
            level=_level(m["level"]), created=datetime.fromisoformat(m["created"]),
            frame_size=_int(m["frame_size"]), frames=tuple(_int(n) for n in m["frames"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BundleError(f"{url}: malformed bundle manifest: {type(e).__name__}: {e}") from None
    problem = _inconsistency(info, key)
    if problem:
        raise BundleError(f"{url}: bad bundle manifest: {problem}")
    return info


def _int(value) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value


def _level(value) -> int:
    if type(value) is not int:  # zstd's fast levels are negative
        raise ValueError(f"expected an integer zstd level, got {value!r}")
    return value


def _inconsistency(info: BundleInfo, key: str) -> str | None:
    named = layout.parse_bundle_key(key)
    if named is not None and named != info.txid:
        return f"holds txid {info.txid:016x}, not the {named:016x} its name says"
    if info.page_size < 512 or info.page_size & (info.page_size - 1) or info.page_size > 65536:
        return f"invalid page size {info.page_size}"
    if not info.page_count:
        return "no pages"
    if not info.frame_size or info.frame_size % info.page_size:
        return f"frame size {info.frame_size} is not a whole number of {info.page_size}-byte pages"
    if len(info.frames) != -(-info.db_size // info.frame_size):
        return f"{len(info.frames)} frames cannot hold {info.db_size} bytes of {info.frame_size}-byte frames"
    if len(info.image_sha256) != 64:
        return "image SHA-256 is not 64 hex digits"
    return None


def read_manifest(storage: Storage, key: str) -> BundleInfo:
    """The manifest of the bundle at ``key``, checked; ``size`` is what the manifest implies
    (prefix, manifest and frames). Reads the object's head only."""
    return _read_head(storage, key)[0]


def _read_head(storage: Storage, key: str) -> tuple[BundleInfo, bytes, int]:
    """The manifest, the first bytes read, and where the frames start in them."""
    url = storage.object_url(key)
    head = storage.read(key, 0, FIRST_READ)
    if len(head) < _PREFIX.size:
        raise BundleError(f"{url}: truncated bundle: {len(head)} bytes, shorter than its prefix")
    magic, length, crc = _PREFIX.unpack_from(head)
    if magic != MAGIC:
        raise BundleError(f"{url}: bad magic {magic!r}, not a tenantsync bundle")
    if length > MAX_MANIFEST:
        raise BundleError(f"{url}: bundle manifest length {length} is over the {MAX_MANIFEST} limit")
    start = _PREFIX.size + length
    if len(head) < start and len(head) == FIRST_READ:
        head += storage.read(key, len(head), start - len(head))
    if len(head) < start:
        raise BundleError(f"{url}: truncated bundle: {len(head)} bytes, its manifest ends at {start}")
    raw = head[_PREFIX.size:start]
    if crc64(raw) != crc:
        raise BundleError(f"{url}: bundle manifest checksum mismatch: stored {crc:016x}, computed {crc64(raw):016x}")
    info = _manifest(storage, key, 0, raw)
    return replace(info, size=start + sum(info.frames)), head, start


# -- reading -------------------------------------------------------------------------------


def restore_bundle(storage: Storage, key: str, out_path: str, *, dictionaries: Dictionaries | None = None,
                   force: bool = False) -> BundleInfo:
    """Write the database the bundle at ``key`` holds to ``out_path``; return its manifest.

    It is written to a temporary file beside ``out_path``, checked (every frame's zstd
    checksum and length, the page count, the image's SHA-256 and LTX checksum), fsynced and
    only then renamed into place: on any failure there is no file at ``out_path`` and one
    BundleError (DictionaryMissing when the bundle's dictionary is not in ``dictionaries``).
    Unlike an LTX restore there is no ``quick_check``: the checksums prove the bytes are the
    ones bundled, which were a verified database. Raises OutputExists unless ``force``.
    """
    output, tmp = temporary_beside(out_path, force, "bundle")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            info = _decode(storage, key, dictionaries, lambda chunk: _write_all(fd, chunk))
            os.fsync(fd)
        finally:
            os.close(fd)
        put_in_place(tmp, output)
    except BaseException:
        remove_quietly(tmp)
        raise
    return info


def verify_bundle(storage: Storage, key: str, expected_txid: int, expected_checksum: int, *,
                  dictionaries: Dictionaries | None = None) -> BundleInfo:
    """Check that the bundle at ``key`` restores to the database at ``expected_txid`` whose
    LTX checksum is ``expected_checksum``: everything a restore checks, reading the object
    back from storage, without writing a file. This must pass before the LTX levels the
    bundle replaces are deleted; any failure is a BundleError and the levels must stay."""
    url = storage.object_url(key)
    info = read_manifest(storage, key)
    if info.txid != expected_txid:
        raise BundleError(f"{url}: bundle holds txid {info.txid:016x}, expected {expected_txid:016x}")
    if info.ltx_checksum != expected_checksum:
        raise BundleError(f"{url}: bundle's LTX checksum is {info.ltx_checksum:016x}, expected {expected_checksum:016x}")
    return _decode(storage, key, dictionaries, None, fresh=True)


def _decode(storage: Storage, key: str, dictionaries: Dictionaries | None, write, *, fresh: bool = False) -> BundleInfo:
    """Decompress the bundle frame by frame, handing each chunk to ``write`` (if any), and
    check it against its manifest; ``fresh``: read its dictionary from storage, not the cache."""
    url = storage.object_url(key)
    info, head, start = _read_head(storage, key)
    dictionary = _dictionary(info, dictionaries, url, fresh)
    decompressor = _decompressor(dictionary)
    sha, ltx, pgno = hashlib.sha256(), 0, 1
    with _Frames(storage, key, url, head, start, info.size) as frames:
        for i, length in enumerate(info.frames):
            expected = min(info.frame_size, info.db_size - i * info.frame_size)
            chunk = _decompress(decompressor, frames.take(length), expected, info, f"{url}: frame {i + 1}")
            sha.update(chunk)
            ltx ^= _pages_checksum(chunk, pgno, info.page_size)
            pgno += expected // info.page_size
            if write is not None:
                write(chunk)
        frames.check_end()
    if sha.hexdigest() != info.image_sha256:
        raise BundleError(f"{url}: image SHA-256 mismatch: manifest {info.image_sha256}, computed {sha.hexdigest()}")
    if CHECKSUM_FLAG | ltx != info.ltx_checksum:
        raise BundleError(f"{url}: LTX checksum mismatch: manifest {info.ltx_checksum:016x}, "
                          f"computed {CHECKSUM_FLAG | ltx:016x}")
    return info


def _dictionary(info: BundleInfo, dictionaries: Dictionaries | None, url: str, fresh: bool):
    if info.dictionary_id is None:
        return None
    if dictionaries is None:
        raise DictionaryMissing(f"{url}: bundle needs zstd dictionary {info.dictionary_id} and no dictionaries were given")
    return (dictionaries.load if fresh else dictionaries.get)(info.dictionary_id)


def _decompress(decompressor: zstandard.ZstdDecompressor, frame, expected: int, info: BundleInfo, what: str) -> bytes:
    """One frame, refused before any allocation if its header disagrees with the manifest."""
    try:
        params = zstandard.get_frame_parameters(frame)
        if params.content_size != expected:
            raise BundleError(f"{what}: zstd frame holds {params.content_size} bytes, the manifest says {expected}")
        if params.dict_id != (info.dictionary_id or 0):
            raise BundleError(f"{what}: compressed with dictionary {params.dict_id}, the manifest says "
                              f"{info.dictionary_id or 0}")
        chunk = decompressor.decompress(frame)
    except zstandard.ZstdError as e:
        raise BundleError(f"{what}: corrupt zstd frame: {e}") from None
    if len(chunk) != expected:
        raise BundleError(f"{what}: decompressed to {len(chunk)} bytes, expected {expected}")
    return chunk


class _Frames:
    """The bundle's bytes after ``start``, taken frame by frame: the first read's, then ranged
    reads of READ_BLOCK with the next one in flight while this one is decompressed. A
    small tenant's bundle is all in the first read and needs no thread."""

    def __init__(self, storage: Storage, key: str, url: str, head: bytes, start: int, size: int):
        self.storage, self.key, self.url, self.size = storage, key, url, size
        self.buf, self.pos = memoryview(head), start
        self.offset = len(head)  # object offset just past buf
        self.whole = len(head) < FIRST_READ  # the first read reached the end of the object
        self.pool: ThreadPoolExecutor | None = None
        self.ahead: Future | None = None

    def __enter__(self) -> _Frames:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def take(self, n: int) -> memoryview:
        while len(self.buf) - self.pos < n:
            block = self._next_block()
            if not block:
                raise BundleError(f"{self.url}: truncated bundle: {self.offset} bytes, its manifest needs {self.size}")
            self.buf, self.pos = memoryview(bytes(self.buf[self.pos:]) + block), 0
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def check_end(self) -> None:
        """The object must end where the last frame does: anything after it is corruption."""
        if len(self.buf) > self.pos or self._next_block():
            raise BundleError(f"{self.url}: bytes after the last frame: the object is longer than "
                              f"the {self.size} its manifest gives")

    def _next_block(self) -> bytes:
        if self.whole:
            return b""
        if self.ahead is None:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="tenantsync-bundle-read")
            self.ahead = self.pool.submit(self._read, self.offset)
        block = self.ahead.result()
        self.offset += len(block)
        # One byte past the manifest's end is asked for, so a longer object shows itself.
        if len(block) and self.offset <= self.size:
            self.ahead = self.pool.submit(self._read, self.offset)
        else:
            self.whole = True
        return block

    def _read(self, offset: int) -> bytes:
        return self.storage.read(self.key, offset, min(READ_BLOCK, self.size + 1 - offset))


def _write_all(fd: int, chunk) -> None:
    view = memoryview(chunk)
    while view:
        view = view[os.write(fd, view):]

