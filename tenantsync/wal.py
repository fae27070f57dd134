"""Reading SQLite WAL files: the header, and a vectorised scan of the frames.

A WAL file (https://www.sqlite.org/fileformat2.html#walformat) is a 32-byte header
followed by frames, each a 24-byte frame header and one page. Header fields are
big-endian; the checksums run over 32-bit words whose byte order the magic names
(0x377f0682: little-endian words, 0x377f0683: big-endian words).

SQLite trusts a frame only if its salts equal the header's, its page number is not
zero, and its stored checksum equals the running checksum over the header and every
frame so far (the first 8 bytes of each frame header, then its page). Only frames up
to the last trusted commit frame belong to the database. ``scan`` applies exactly
these rules, so its pages are the ones SQLite itself reads after recovering the WAL.

Why the scan is fast
--------------------
The checksum takes the words in pairs (a, b) and does ``s0 += a + s1; s1 += b + s0``
modulo 2**32. With v = (s0, s1) and x = (a, b) that is the linear step

    v' = M v + C x,    M = [[1, 1], [1, 2]],    C = [[1, 0], [1, 1]].

Over a frame of n pairs x_0 .. x_{n-1}:

    v_end = M**n v_start + S,    S = sum_k M**(n-1-k) C x_k.

S does not depend on v_start: each of its two components is a dot product of the
frame's words with fixed weights (zero for the salts and stored checksums, which
the checksum skips). So S for every frame of a batch is one matrix product
``(frames x words) @ (words x 2)``. numpy's uint32 arithmetic wraps modulo 2**32,
which is exactly the checksum's arithmetic, so nothing needs widening.

Frames chain: v_f = A v_{f-1} + S_f with A = M**n. det M = 1, so A is invertible
modulo 2**32 (its inverse is its adjugate). With w_f = A**-f v_f:

    w_f = w_{f-1} + A**-f S_f,  so  w_f = v_0 + cumsum_{g<=f} A**-g S_g,  v_f = A**f w_f.

The checksum after every frame of a batch is thus a cumsum and two batched 2x2
products with powers of A, which are cached per page size. No Python code runs per
word or per frame; Python only loops per batch and, to build the page map, per page.
"""

from __future__ import annotations

import enum
import functools
import os
import struct
from dataclasses import dataclass

import numpy as np

from tenantsync.errors import WALError

WAL_HEADER_SIZE = 32
FRAME_HEADER_SIZE = 24

WAL_MAGIC_LE = 0x377F0682
WAL_MAGIC_BE = 0x377F0683
WAL_VERSION = 3007000
MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 65536

_MASK = 0xFFFFFFFF
_M = np.array([[1, 1], [1, 2]], dtype=np.uint32)
_C = np.array([[1, 0], [1, 1]], dtype=np.uint32)

# Frames are checksummed this many bytes at a time: large enough that numpy's
# per-call overhead vanishes, small enough that the cached powers of A stay small.
_BATCH_BYTES = 32 << 20

# Frame header words, as 32-bit big-endian fields.
_PGNO, _COMMIT, _SALT1, _SALT2, _CKSUM1, _CKSUM2 = range(6)


@dataclass(frozen=True)
class WALHeader:
    """The 32-byte header at the start of a WAL file."""

    magic: int
    version: int
    page_size: int
    checkpoint_seq: int
    salt1: int
    salt2: int
    checksum1: int
    checksum2: int

    @property
    def big_endian(self) -> bool:
        """True if the checksums read the data as big-endian 32-bit words."""
        return self.magic == WAL_MAGIC_BE

    @property
    def frame_size(self) -> int:
        """Bytes per frame: frame header plus page."""
        return FRAME_HEADER_SIZE + self.page_size

    @classmethod
    def parse(cls, b: bytes | memoryview, name: str = "") -> WALHeader:
        """Parse and verify a WAL header; ``name`` (a path) goes into the error message.

        Raises WALError for short input, bad magic, bad checksum, an unknown version or
        an impossible page size: SQLite would ignore such a WAL, so it holds no frames.
        """
        where = f"WAL header of {name}" if name else "WAL header"
        if len(b) < WAL_HEADER_SIZE:
            raise WALError(f"{where}: short input, {len(b)} of {WAL_HEADER_SIZE} bytes")
        header = cls(*struct.unpack_from(">8I", b))
        if header.magic not in (WAL_MAGIC_LE, WAL_MAGIC_BE):
            raise WALError(f"{where}: bad magic 0x{header.magic:08x}")
        expected = wal_checksum(memoryview(b)[:24], header.big_endian, 0, 0)
        if expected != (header.checksum1, header.checksum2):
            raise WALError(
                f"{where}: bad header checksum {header.checksum1:08x}{header.checksum2:08x},"
                f" computed {expected[0]:08x}{expected[1]:08x}"
            )
        if header.version != WAL_VERSION:
            raise WALError(f"{where}: unsupported version {header.version}")
        if not _valid_page_size(header.page_size):
            raise WALError(f"{where}: bad page size {header.page_size}")
        return header


class Stop(enum.Enum):
    """Why ``scan`` stopped before the end of its data; the value is the text for messages."""

    PARTIAL_FRAME = "partial frame"
    SALT_MISMATCH = "salt mismatch"
    ZERO_PAGE_NUMBER = "zero page number"
    CHECKSUM_MISMATCH = "checksum mismatch"


@dataclass(frozen=True)
class ScanStop:
    """The first frame ``scan`` did not take: its file offset and why.

    Only ``PARTIAL_FRAME`` may be followed by more of the same transaction (the data ended
    mid-frame: read further); every other stop is final for this WAL generation.
    """

    why: Stop
    offset: int

    @property
    def partial(self) -> bool:
        return self.why is Stop.PARTIAL_FRAME

    def __str__(self) -> str:
        return f"{self.why.value} at offset {self.offset}"


@dataclass
class WALScan:
    """What ``scan`` found: the committed frames from its start offset on.

    ``end_offset`` is the file offset just past the last trusted commit frame (the
    start offset if there is none) and ``checksum`` the running checksum there: pass
    both to the next ``scan`` to continue. ``pages`` maps each page number to its image
    in its last committed frame; the images are views into the scanned data.
    ``frame_count`` and ``txn_count`` count committed frames and transactions.
    ``stopped`` is None if the scan reached the end of the data at a frame boundary,
    else where and why it stopped early.
    """

    end_offset: int
    checksum: tuple[int, int]
    commit: int | None
    pages: dict[int, memoryview]
    frame_count: int
    txn_count: int
    stopped: ScanStop | None


def wal_checksum(data: bytes | memoryview, big_endian: bool, s0: int, s1: int) -> tuple[int, int]:
    """The WAL checksum of ``data`` (a multiple of 8 bytes), continuing from (s0, s1)."""
    if len(data) % 8:
        raise ValueError(f"WAL checksum input must be a multiple of 8 bytes, got {len(data)}")
    words = np.frombuffer(data, dtype=_word_dtype(big_endian))
    weights, power = _pair_weights(len(words) // 2)
    sums = words @ weights
    (p00, p01), (p10, p11) = power.tolist()
    return (
        (p00 * s0 + p01 * s1 + int(sums[0])) & _MASK,
        (p10 * s0 + p11 * s1 + int(sums[1])) & _MASK,
    )


def scan(
    data: bytes | memoryview,
    header: WALHeader,
    start_offset: int,
    checksum: tuple[int, int],
) -> WALScan:
    """Find the committed frames in ``data``, the WAL's bytes from file offset ``start_offset``.

    ``start_offset`` must be a frame boundary and ``checksum`` the running checksum
    there: the header's (checksum1, checksum2) at offset 32, else a previous scan's
    ``checksum``. The walk stops at the first frame SQLite would not trust (partial,
    another generation's salts, zero page number, wrong checksum), and frames after
    the last trusted commit frame are left out, as SQLite leaves them out.
    """
    frame_size = header.frame_size
    if start_offset < WAL_HEADER_SIZE or (start_offset - WAL_HEADER_SIZE) % frame_size:
        raise ValueError(
            f"WAL scan offset {start_offset} is not a frame boundary"
            f" for page size {header.page_size}"
        )
    view = memoryview(data).cast("B")
    words, fields = _frame_arrays(view, header)
    batch = max(1, _BATCH_BYTES // frame_size)
    consts = _frame_constants(header.page_size, batch)

    before = np.array(checksum, dtype=np.uint32)
    last_commit, commit_checksum = -1, tuple(checksum)
    stopped = _partial_stop(view, start_offset, frame_size)
    for lo in range(0, len(words), batch):
        after = _chain(words[lo : lo + batch] @ consts.weights, before, consts)
        trusted = _trusted_count(fields[lo : lo + batch], after, header)
        commits = np.flatnonzero(fields[lo : lo + trusted, _COMMIT])
        if commits.size:
            last_commit = lo + int(commits[-1])
            commit_checksum = tuple(after[commits[-1]].tolist())
        if trusted < len(after):
            offset = start_offset + (lo + trusted) * frame_size
            stopped = _untrusted_stop(fields[lo + trusted], header, offset)
            break
        before = after[-1]

    committed = fields[: last_commit + 1]
    return WALScan(
        end_offset=start_offset + len(committed) * frame_size,
        checksum=commit_checksum,
        commit=int(committed[-1, _COMMIT]) if len(committed) else None,
        pages=_latest_pages(view, committed[:, _PGNO], header),
        frame_count=len(committed),
        txn_count=int(np.count_nonzero(committed[:, _COMMIT])),
        stopped=stopped,
    )


@dataclass(frozen=True)
class _FrameConstants:
    """Per page size: frame word weights giving S, and the powers A**f and A**-f."""

    weights: np.ndarray
    forward: np.ndarray
    backward: np.ndarray


def _valid_page_size(page_size: int) -> bool:
    """SQLite's rule: a power of two from 512 to 65536."""
    return MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE and page_size & (page_size - 1) == 0


def _word_dtype(big_endian: bool) -> str:
    return ">u4" if big_endian else "<u4"


def _frame_arrays(view: memoryview, header: WALHeader) -> tuple[np.ndarray, np.ndarray]:
    """Zero-copy (frames x words) views of the whole frames in ``view``.

    The first in checksum byte order, for the sums; the second big-endian, whose
    first six columns are the frame header fields.
    """
    frame_words = header.frame_size // 4
    count = len(view) // header.frame_size * frame_words
    words = np.frombuffer(view, _word_dtype(header.big_endian), count).reshape(-1, frame_words)
    fields = np.frombuffer(view, ">u4", count).reshape(-1, frame_words)[:, :6]
    return words, fields


def _pair_weights(pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights W (2*pairs x 2) and M**pairs: checksum(words, v) = M**pairs v + words @ W.

    Row 2k+i of W holds the coefficients of word i of pair k in S, i.e. column i of
    M**(pairs-1-k) C. Not cached: inputs of any length would pile up in a cache; the
    one length that recurs, a frame's, is cached in ``_frame_constants``.
    """
    powers = _matrix_powers(_M, pairs + 1)
    coefficients = powers[:pairs][::-1] @ _C
    return coefficients.transpose(0, 2, 1).reshape(2 * pairs, 2), powers[pairs]


@functools.lru_cache(maxsize=16)
def _frame_constants(page_size: int, batch: int) -> _FrameConstants:
    """Constants to checksum batches of up to ``batch`` frames of ``page_size``."""
    pair_weights, step = _pair_weights((8 + page_size) // 8)
    weights = np.zeros(((FRAME_HEADER_SIZE + page_size) // 4, 2), dtype=np.uint32)
    weights[:2] = pair_weights[:2]  # page number, commit size
    weights[6:] = pair_weights[2:]  # the page; salts and stored checksum are skipped
    return _FrameConstants(
        weights=weights,
        forward=_matrix_powers(step, batch + 1),
        backward=_matrix_powers(_inverse(step), batch + 1),
    )


def _matrix_powers(base: np.ndarray, count: int) -> np.ndarray:
    """base**0 .. base**(count-1) modulo 2**32, by doubling: log2(count) batched products."""
    powers = np.empty((count, 2, 2), dtype=np.uint32)
    powers[0] = np.eye(2, dtype=np.uint32)
    done, step = 1, base  # step == base**done
    while done < count:
        take = min(done, count - done)
        powers[done : done + take] = powers[:take] @ step
        done += take
        step = step @ step
    return powers


def _inverse(matrix: np.ndarray) -> np.ndarray:
    """Inverse modulo 2**32 of a 2x2 matrix of determinant 1: its adjugate."""
    (a, b), (c, d) = matrix.tolist()
    return np.array([[d, -b & _MASK], [-c & _MASK, a]], dtype=np.uint32)


def _apply(matrices: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """matrices[f] @ vectors[f] for every f, modulo 2**32."""
    return matrices[:, :, 0] * vectors[:, :1] + matrices[:, :, 1] * vectors[:, 1:]


def _chain(sums: np.ndarray, before: np.ndarray, consts: _FrameConstants) -> np.ndarray:
    """Running checksum after each frame, from the frames' S and the checksum before them."""
    count = len(sums)
    shifted = np.cumsum(_apply(consts.backward[1 : count + 1], sums), axis=0, dtype=np.uint32)
    return _apply(consts.forward[1 : count + 1], shifted + before)


def _trusted_count(fields: np.ndarray, after: np.ndarray, header: WALHeader) -> int:
    """How many leading frames SQLite trusts, given their header fields and computed checksums."""
    trusted = (
        (fields[:, _SALT1] == header.salt1)
        & (fields[:, _SALT2] == header.salt2)
        & (fields[:, _PGNO] != 0)
        & (fields[:, _CKSUM1] == after[:, 0])
        & (fields[:, _CKSUM2] == after[:, 1])
    )
    untrusted = np.flatnonzero(~trusted)
    return int(untrusted[0]) if untrusted.size else len(trusted)


def _untrusted_stop(fields: np.ndarray, header: WALHeader, offset: int) -> ScanStop:
    """Why the frame at ``offset`` (known untrusted) fails."""
    if (int(fields[_SALT1]), int(fields[_SALT2])) != (header.salt1, header.salt2):
        return ScanStop(Stop.SALT_MISMATCH, offset)
    if fields[_PGNO] == 0:
        return ScanStop(Stop.ZERO_PAGE_NUMBER, offset)
    return ScanStop(Stop.CHECKSUM_MISMATCH, offset)


def _partial_stop(view: memoryview, start_offset: int, frame_size: int) -> ScanStop | None:
    """The stop to report if every whole frame is trusted: a trailing partial frame, if any."""
    whole = len(view) - len(view) % frame_size
    return ScanStop(Stop.PARTIAL_FRAME, start_offset + whole) if whole < len(view) else None


def _latest_pages(view: memoryview, pgnos: np.ndarray, header: WALHeader) -> dict[int, memoryview]:
    """Map each page number to its page in the last frame that has it (frames in order)."""
    unique, first_from_end = np.unique(pgnos[::-1], return_index=True)
    starts = (len(pgnos) - 1 - first_from_end) * header.frame_size + FRAME_HEADER_SIZE
    size = header.page_size
    return {
        pgno: view[start : start + size] for pgno, start in zip(unique.tolist(), starts.tolist())
    }


# --- the WAL file and SQLite's wal-index, read in place ---------------------------------


def read_header(wal_path: str) -> tuple[WALHeader | None, int]:
    """The WAL file's header and size; (None, 0) if there is no WAL or it is shorter than
    a header (SQLite then holds no frame in it). Raises WALError for a corrupt header."""
    try:
        with open(wal_path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(WAL_HEADER_SIZE)
    except FileNotFoundError:
        return None, 0
    if size < WAL_HEADER_SIZE:
        return None, 0
    return WALHeader.parse(head, name=wal_path), size


def read_range(wal_path: str, start: int, end: int) -> bytes:
    """The WAL file's bytes from ``start`` up to ``end`` (fewer if the file is shorter)."""
    with open(wal_path, "rb") as f:
        return os.pread(f.fileno(), end - start, start)


# The wal-index header at the start of the -shm file: two copies of 48 bytes, then the
# checkpoint info whose first word is nBackfill (https://www.sqlite.org/walformat.html,
# "The WAL-Index Header"). Native byte order: the file is memory shared between processes.
_INDEX_HEADER = struct.Struct("=IIIBBHI")
_INDEX_COPY_SIZE = 48
_INDEX_READ_SIZE = 100
_INDEX_VERSION = 3007000


@dataclass(frozen=True)
class WALIndex:
    """What SQLite's wal-index says of the current WAL generation: its salts, its last
    committed frame (``max_frame``, 1-based count) and how many frames a checkpoint has
    copied into the main file (``backfilled``)."""

    salt1: int
    salt2: int
    max_frame: int
    backfilled: int

    def of_generation(self, salt1: int, salt2: int) -> bool:
        """Whether this index describes the WAL generation with these salts."""
        return self.salt1 == salt1 and self.salt2 == salt2

    @property
    def fully_backfilled(self) -> bool:
        """Every committed frame of the WAL is in the main file."""
        return self.backfilled == self.max_frame

    def end_offset(self, page_size: int) -> int:
        """The WAL file offset just past the last committed frame."""
        return WAL_HEADER_SIZE + self.max_frame * (FRAME_HEADER_SIZE + page_size)


def read_index(shm_fd: int) -> WALIndex | None:
    """The wal-index header read from an open ``-shm`` descriptor, or None if it cannot
    be read consistently (mid-update: SQLite writes the two copies one after the other;
    or not initialised).

    Read without SQLite's locks, so a caller trusts it only where no writer can move it
    past what matters (a bound on how much WAL to read, whose frames are verified by
    their checksums anyway; or while a read mark or the write lock is held).
    """
    head = os.pread(shm_fd, _INDEX_READ_SIZE, 0)
    if len(head) < _INDEX_READ_SIZE or head[:_INDEX_COPY_SIZE] != head[_INDEX_COPY_SIZE : 2 * _INDEX_COPY_SIZE]:
        return None
    version, _, _, is_init, _, _, max_frame = _INDEX_HEADER.unpack_from(head)
    if version != _INDEX_VERSION or not is_init:
        return None
    salt1, salt2 = struct.unpack_from(">II", head, 32)
    (backfilled,) = struct.unpack_from("=I", head, 2 * _INDEX_COPY_SIZE)
    return WALIndex(salt1, salt2, max_frame, backfilled)
