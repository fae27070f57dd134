"""A database's replica: the LTX files of every level under one storage prefix.

Everything here is expressed over the five-operation Storage interface and the key
layout in ``layout.py``, so the same code serves ``file://`` and ``s3://`` and reads
replicas Litestream 0.5 wrote.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import BinaryIO

from . import layout
from .errors import LTXError
from .ltx import HEADER_SIZE, Decoder, Header
from .storage.base import Storage

log = logging.getLogger(__name__)

LEVELS = tuple(range(layout.SNAPSHOT_LEVEL + 1))

# Files larger than this are decoded from ranged reads of BLOCK bytes, never held whole:
# a 10 GB snapshot must not need 10 GB of memory to restore or compact.
STREAM_ABOVE = 32 << 20
BLOCK = 8 << 20


@dataclass(frozen=True)
class LTXInfo:
    """One LTX object as listed: enough to plan a restore without reading it."""

    level: int
    min_txid: int
    max_txid: int
    size: int
    created_at: datetime
    key: str

    @property
    def name(self) -> str:
        return f"{self.min_txid:016x}-{self.max_txid:016x}.ltx"


class Replica:
    """LTX files of one database, by level."""

    def __init__(self, storage: Storage):
        self.storage = storage

    def __str__(self) -> str:
        return str(self.storage)

    def files(self, level: int) -> list[LTXInfo]:
        """Files of one level in TXID order."""
        return self._listed(layout.ltx_level_prefix(self.storage.kind, level) + "/", (level,))[level]

    def all_files(self) -> dict[int, list[LTXInfo]]:
        """Every level's files from ONE listing of the replica (not one LIST per level:
        on S3 each LIST is a round trip, and a hydration would spend its time waiting on ten)."""
        return self._listed("", LEVELS)

    def _listed(self, prefix: str, levels) -> dict[int, list[LTXInfo]]:
        out: dict[int, list[LTXInfo]] = {level: [] for level in levels}
        for obj in self.storage.list(prefix):
            parsed = layout.parse_ltx_key(self.storage.kind, obj.key)
            if parsed is not None and parsed[0] in out:
                level, lo, hi = parsed
                out[level].append(LTXInfo(level, lo, hi, obj.size, obj.modified, obj.key))
        for files in out.values():
            files.sort(key=lambda i: (i.min_txid, i.max_txid))
        return out

    def read(self, info: LTXInfo) -> bytes:
        return self.storage.read(info.key)

    def source(self, info: LTXInfo) -> bytes | "_BlockReader":
        """What to decode ``info`` from: its bytes, or for a file above STREAM_ABOVE a
        stream of ranged reads that fetches the next block while one is being decoded."""
        if info.size <= STREAM_ABOVE:
            return self.read(info)
        return _BlockReader(self.storage, info.key, info.size)

    def url(self, info: LTXInfo) -> str:
        return self.storage.object_url(info.key)

    def decoder(self, info: LTXInfo, data) -> Decoder:
        """A decoder for ``data`` (bytes or a stream), refusing a file whose header disagrees with its name:
        a valid file stored under another TXID's key would otherwise restore wrong data."""
        dec = Decoder(data, name=self.url(info))
        self.check_name(info, dec.header)
        return dec

    def check_name(self, info: LTXInfo, header: Header) -> None:
        """A valid file stored under another TXID's key would otherwise restore wrong data."""
        _check_name(self.url(info), info, header)

    def read_header(self, info: LTXInfo) -> Header:
        if info.size < HEADER_SIZE:
            raise LTXError(f"{self.url(info)}: {info.size} bytes is shorter than an LTX header")
        header = Header.decode(self.storage.read(info.key, 0, HEADER_SIZE), name=self.url(info))
        _check_name(self.url(info), info, header)
        return header

    def write(self, level: int, header: Header, data: bytes | BinaryIO, size: int) -> LTXInfo:
        """Create the file for ``header``'s TXID range; never overwrites.

        Write-if-absent is what makes a TXID impossible to write twice: a second writer
        (a stale process, a rival host) gets PreconditionFailed and must re-read the replica.
        """
        key = layout.ltx_key(self.storage.kind, level, header.min_txid, header.max_txid)
        created = datetime.fromtimestamp(header.timestamp / 1000, tz=timezone.utc)
        self.storage.write_if_absent(key, data, timestamp=created)
        log.debug("wrote %s/%s (%d bytes)", self.storage, key, size)
        return LTXInfo(level, header.min_txid, header.max_txid, size, created, key)

    def delete(self, infos: list[LTXInfo]) -> None:
        self.storage.delete([i.key for i in infos])

    def last_l0(self) -> LTXInfo | None:
        files = self.files(0)
        return files[-1] if files else None

    def max_txid(self) -> int:
        """Highest TXID stored at any level (0 for an empty replica)."""
        return max((files[-1].max_txid for files in self.all_files().values() if files), default=0)



def _check_name(url: str, info: LTXInfo, header: Header) -> None:
    if (header.min_txid, header.max_txid) != (info.min_txid, info.max_txid):
        raise LTXError(
            f"{url}: header holds TXIDs {header.min_txid:016x}-{header.max_txid:016x}, "
            f"not the {info.min_txid:016x}-{info.max_txid:016x} its name says"
        )


_read_ahead: ThreadPoolExecutor | None = None
_read_ahead_guard = threading.Lock()


def _reader_pool() -> ThreadPoolExecutor:
    global _read_ahead
    with _read_ahead_guard:
        if _read_ahead is None:
            _read_ahead = ThreadPoolExecutor(4, thread_name_prefix="tenantsync-read-ahead")
        return _read_ahead


class _BlockReader:
    """``read(n)`` over one object as BLOCK-sized ranged reads, one block ahead: memory
    stays at two blocks, and on S3 the next GET overlaps the decoding of this block."""

    def __init__(self, storage: Storage, key: str, size: int):
        self.storage, self.key, self.size = storage, key, size
        self.buf, self.pos = b"", 0
        self.next_offset = 0
        self.ahead: Future = self._fetch()

    def _fetch(self) -> Future:
        offset, self.next_offset = self.next_offset, min(self.size, self.next_offset + BLOCK)
        if offset >= self.size:
            done: Future = Future()
            done.set_result(b"")
            return done
        return _reader_pool().submit(self.storage.read, self.key, offset, self.next_offset - offset)

    def read(self, n: int = -1) -> bytes:
        if self.pos == len(self.buf):
            self.buf, self.pos = self.ahead.result(), 0
            if not self.buf:
                return b""
            self.ahead = self._fetch()
        end = len(self.buf) if n < 0 else self.pos + n
        out = self.buf[self.pos:end]
        self.pos += len(out)
        return out
