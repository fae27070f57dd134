"""LTX v3 on-disk constants, header, names and page index (superfly/ltx v0.5.2).

Everything here must stay byte-compatible with the Go package: Litestream 0.5.x reads what
tenantsync writes, and tenantsync restores from what Litestream wrote.
"""

from __future__ import annotations

import functools
import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tenantsync.errors import LTXError

# numpy is imported inside the functions that use it: the restore workers
# (restore_worker.py) never touch a page index, and start up without it.
if TYPE_CHECKING:
    import numpy as np

MAGIC = b"LTX1"
#: The magic of an object tenantsync sealed (storage/sealed.py): named, so a reader without
#: the keyring is told what it holds instead of "bad magic".
SEALED_MAGIC = b"TSE1"
HEADER_SIZE = 100
PAGE_HEADER_SIZE = 6
TRAILER_SIZE = 16
HEADER_FLAG_NO_CHECKSUM = 0x2
PAGE_FLAG_SIZE = 0x1
CHECKSUM_FLAG = 1 << 63

MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 65536
_PENDING_BYTE = 0x40000000

_HEADER = struct.Struct(">4sIIIQQqQqqIIQ20x")
_INDEX_SIZE = struct.Struct(">Q")
_FILENAME = re.compile(r"([0-9a-f]{16})-([0-9a-f]{16})\.ltx")
# A varint of 9 bytes carries 63 bits: enough for any pgno, offset or size, and it keeps
# the vectorised decoding inside uint64 without overflow checks.
_MAX_VARINT_LEN = 9


@functools.cache
def _varint_limits() -> np.ndarray:
    import numpy as np

    return np.array([1 << (7 * k) for k in range(1, _MAX_VARINT_LEN + 1)], dtype=np.uint64)


def label(name: str) -> str:
    """Every LTX error names the file; callers that have no name still get a readable prefix."""
    return f"LTX file {name}" if name else "LTX file"


def lock_pgno(page_size: int) -> int:
    """SQLite never stores the page holding the 1 GiB pending byte, so LTX files must not either."""
    return _PENDING_BYTE // page_size + 1


def format_txid(n: int) -> str:
    return f"{n:016x}"


def format_filename(min_txid: int, max_txid: int) -> str:
    """Fixed-width lowercase hex makes lexical order equal TXID order in object listings."""
    return f"{min_txid:016x}-{max_txid:016x}.ltx"


def parse_filename(name: str) -> tuple[int, int] | None:
    """None rather than an error: listings hold foreign objects that callers simply skip."""
    m = _FILENAME.fullmatch(name)
    if m is None:
        return None
    return int(m.group(1), 16), int(m.group(2), 16)


@dataclass(frozen=True)
class Header:
    flags: int
    page_size: int
    commit: int
    min_txid: int
    max_txid: int
    timestamp: int
    pre_apply_checksum: int = 0
    wal_offset: int = 0
    wal_size: int = 0
    wal_salt1: int = 0
    wal_salt2: int = 0
    node_id: int = 0

    @property
    def is_snapshot(self) -> bool:
        """A file starting at TXID 1 replaces the whole database, so it must hold every page."""
        return self.min_txid == 1

    @property
    def no_checksum(self) -> bool:
        """Litestream sets this flag: it does not track the rolling database checksum."""
        return bool(self.flags & HEADER_FLAG_NO_CHECKSUM)

    def encode(self) -> bytes:
        try:
            return _HEADER.pack(
                MAGIC, self.flags, self.page_size, self.commit, self.min_txid, self.max_txid,
                self.timestamp, self.pre_apply_checksum, self.wal_offset, self.wal_size,
                self.wal_salt1, self.wal_salt2, self.node_id,
            )
        except struct.error as e:
            raise LTXError(f"encode LTX header: field out of range: {e}") from None

    @classmethod
    def decode(cls, b: bytes, name: str = "") -> Header:
        """Validates as well as parses: a header that Go's decoder would refuse is never returned."""
        if len(b) < HEADER_SIZE:
            raise LTXError(f"{label(name)}: header truncated: {len(b)} of {HEADER_SIZE} bytes")
        magic, *fields = _HEADER.unpack_from(b)
        if magic == SEALED_MAGIC:
            raise LTXError(f"{label(name)}: encrypted by tenantsync, not a plain LTX file: "
                           "open its replica with the fleet's keyring ('encrypt' and 'keyring' in tenantsync.yml)")
        if magic != MAGIC:
            raise LTXError(f"{label(name)}: bad magic {magic!r}, not an LTX file")
        header = cls(*fields)
        try:
            header.validate()
        except LTXError as e:
            raise LTXError(f"{label(name)}: invalid header: {e}") from None
        return header

    def validate(self) -> None:
        """Same rules and messages as Go's Header.Validate, so errors read the same on both sides."""
        message = self._violation()
        if message is not None:
            raise LTXError(message)

    def _violation(self) -> str | None:
        if self.flags & ~HEADER_FLAG_NO_CHECKSUM:
            return f"invalid flags: 0x{self.flags:08x}"
        if not _is_valid_page_size(self.page_size):
            return f"invalid page size: {self.page_size}"
        if self.min_txid == 0:
            return "minimum transaction id required"
        if self.max_txid == 0:
            return "maximum transaction id required"
        if self.min_txid > self.max_txid:
            return f"transaction ids out of order: ({self.min_txid},{self.max_txid})"
        if self.wal_offset < 0:
            return f"wal offset cannot be negative: {self.wal_offset}"
        if self.wal_size < 0:
            return f"wal size cannot be negative: {self.wal_size}"
        if (self.wal_salt1 or self.wal_salt2) and self.wal_offset == 0:
            return "wal offset required if salt exists"
        if self.wal_offset == 0 and self.wal_size != 0:
            return "wal offset required if wal size exists"
        return self._pre_apply_violation()

    def _pre_apply_violation(self) -> str | None:
        if self.is_snapshot:
            if self.pre_apply_checksum != 0:
                return "pre-apply checksum must be zero on snapshots"
        elif self.no_checksum:
            if self.pre_apply_checksum != 0:
                return "pre-apply checksum not allowed"
        elif self.pre_apply_checksum == 0:
            return "pre-apply checksum required on non-snapshot files"
        elif not self.pre_apply_checksum & CHECKSUM_FLAG:
            return "invalid pre-apply checksum format"
        return None


@dataclass(frozen=True)
class Trailer:
    post_apply_checksum: int
    file_checksum: int


def _is_valid_page_size(n: int) -> bool:
    return MIN_PAGE_SIZE <= n <= MAX_PAGE_SIZE and n & (n - 1) == 0


def encode_page_index(entries: list[int]) -> bytes:
    """Page index as Go writes it: (pgno, offset, size) varints, a 0 terminator, then the
    u64 length of both. `entries` is flat (pgno, offset, size, pgno, ...): a quarter
    million tuples for a 1 GB snapshot would cost more to build than the varints."""
    import numpy as np

    values = np.zeros(len(entries) + 1, dtype=np.uint64)
    values[:-1] = entries
    body = _encode_uvarints(values)
    return body + _INDEX_SIZE.pack(len(body))


def decode_page_index(body, name: str = "") -> np.ndarray:
    """Parse index entries plus terminator (without the u64 length) into rows of
    (pgno, offset, size); the terminator must be the last varint and no earlier pgno is 0."""
    try:
        values = _decode_uvarints(body)
    except ValueError as e:
        raise LTXError(f"{label(name)}: malformed page index: {e}") from None
    if len(values) % 3 != 1 or values[-1] != 0:
        raise LTXError(f"{label(name)}: malformed page index: bad terminator")
    rows = values[:-1].reshape(-1, 3)
    if rows.size and not rows[:, 0].all():
        raise LTXError(f"{label(name)}: malformed page index: page number 0 in an entry")
    return rows


def _encode_uvarints(values: np.ndarray) -> bytes:
    """One row of 7-bit groups per value, continuation bits set, then the unused tail
    groups dropped: row-major boolean indexing leaves the bytes in file order."""
    import numpy as np

    lengths = np.searchsorted(_varint_limits(), values, side="right") + 1
    cols = np.arange(int(lengths.max()))
    groups = (values[:, None] >> (7 * cols).astype(np.uint64)).astype(np.uint8) & 0x7F
    groups |= (cols < lengths[:, None] - 1).astype(np.uint8) << 7
    return groups[cols < lengths[:, None]].tobytes()


def _decode_uvarints(data) -> np.ndarray:
    import numpy as np

    raw = np.frombuffer(data, dtype=np.uint8)
    if len(raw) == 0 or raw[-1] & 0x80:
        raise ValueError("unterminated varint")
    ends = np.flatnonzero(raw < 0x80)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > _MAX_VARINT_LEN:
        raise ValueError("varint too long")
    shifts = ((np.arange(len(raw)) - np.repeat(starts, lengths)) * 7).astype(np.uint64)
    return np.add.reduceat((raw & 0x7F).astype(np.uint64) << shifts, starts)
