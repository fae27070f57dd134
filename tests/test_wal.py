"""Tests for tenantsync.wal against real SQLite WAL files and a pure-Python oracle.

The real files come from Python's sqlite3 with checkpointing off, copied while the
writing connection is still open (closing it would checkpoint the WAL away). A scan
is judged by replaying its pages onto the main database file: the result must be
byte-identical to what SQLite itself serves (``Connection.serialize``).
"""

from __future__ import annotations

import os
import random
import sqlite3
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tenantsync import wal
from tenantsync.errors import WALError
from tenantsync.wal import (
    FRAME_HEADER_SIZE,
    WAL_HEADER_SIZE,
    ScanStop,
    Stop,
    WALHeader,
    WALScan,
    scan,
    wal_checksum,
)

MASK = 0xFFFFFFFF
PAGE_SIZES = [512, 4096, 65536]


# --- the oracle: SQLite's rules, one word at a time ----------------------------------


def oracle_checksum(data: bytes, big_endian: bool, s0: int, s1: int) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for a, b in zip(words[0::2], words[1::2]):
        s0 = (s0 + a + s1) & MASK
        s1 = (s1 + b + s0) & MASK
    return s0, s1


def oracle_scan(data: bytes, header: WALHeader, start_offset: int, checksum) -> dict:
    """Frame by frame, as SQLite's WAL recovery does; returns WALScan's fields."""
    size = header.frame_size
    running, pending, pages = tuple(checksum), {}, {}
    end, end_checksum, commit, frames, txns, reason = start_offset, running, None, 0, 0, None
    pos = 0
    while pos < len(data):
        offset = start_offset + pos
        if pos + size > len(data):
            reason = ScanStop(Stop.PARTIAL_FRAME, offset)
            break
        frame = data[pos : pos + size]
        pgno, db_size, salt1, salt2, c1, c2 = struct.unpack(">6I", frame[:24])
        if (salt1, salt2) != (header.salt1, header.salt2):
            reason = ScanStop(Stop.SALT_MISMATCH, offset)
            break
        if pgno == 0:
            reason = ScanStop(Stop.ZERO_PAGE_NUMBER, offset)
            break
        running = oracle_checksum(frame[:8] + frame[24:], header.big_endian, *running)
        if running != (c1, c2):
            reason = ScanStop(Stop.CHECKSUM_MISMATCH, offset)
            break
        pos += size
        pending[pgno] = frame[24:]
        if db_size:
            pages.update(pending)
            pending = {}
            frames, txns = pos // size, txns + 1
            end, end_checksum, commit = start_offset + pos, running, db_size
    return dict(
        end_offset=end,
        checksum=end_checksum,
        commit=commit,
        pages=pages,
        frame_count=frames,
        txn_count=txns,
        stopped=reason,
    )


def as_dict(result: WALScan) -> dict:
    """A scan's fields with page images as bytes, to compare with the oracle."""
    fields = dict(vars(result))
    fields["pages"] = {pgno: bytes(page) for pgno, page in result.pages.items()}
    return fields


# --- real WAL files -------------------------------------------------------------------


@dataclass
class Source:
    """A database in WAL mode: its files as copied, and what SQLite served after each commit."""

    page_size: int
    db: bytes  # the main database file as copied
    wal: bytes
    commit_ends: list[int]  # WAL size at the start, then after each commit: true boundaries
    images: list[bytes]  # what SQLite serves (serialize) at the start, then after each commit
    rows: list[tuple]


def write_transactions(conn: sqlite3.Connection, rng: random.Random, count: int, page_size: int):
    """Inserts, updates and deletes of blobs up to ~2 pages, so pages recur across commits."""
    for _ in range(count):
        conn.execute("BEGIN")
        for _ in range(rng.randint(1, 6)):
            blob = rng.randbytes(rng.randint(1, 2 * page_size))
            conn.execute("INSERT INTO t(v) VALUES (?)", (blob,))
        blob = rng.randbytes(rng.randint(1, page_size))
        conn.execute("UPDATE t SET v = ? WHERE id = ?", (blob, rng.randint(1, 10)))
        conn.execute("DELETE FROM t WHERE id = ?", (rng.randint(1, 20),))
        conn.execute("COMMIT")
        yield


def open_wal_db(path: Path, page_size: int) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA page_size={page_size}")
    assert conn.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    return conn


def snapshot(conn: sqlite3.Connection, path: Path, page_size: int, count: int, seed: int) -> Source:
    """Write ``count`` transactions, recording boundaries and images, then copy the files."""
    rng = random.Random(seed)
    wal_path = Path(f"{path}-wal")
    ends, images = [wal_path.stat().st_size], [conn.serialize()]
    for _ in write_transactions(conn, rng, count, page_size):
        ends.append(wal_path.stat().st_size)
        images.append(conn.serialize())
    rows = conn.execute("SELECT id, v FROM t ORDER BY id").fetchall()
    return Source(page_size, path.read_bytes(), wal_path.read_bytes(), ends, images, rows)


@pytest.fixture(scope="module", params=PAGE_SIZES, ids=[f"page{p}" for p in PAGE_SIZES])
def source(request, tmp_path_factory) -> Source:
    path = tmp_path_factory.mktemp("wal") / "db"
    conn = open_wal_db(path, request.param)
    try:
        return snapshot(conn, path, request.param, count=12, seed=request.param)
    finally:
        conn.close()


def first_scan(wal_bytes: bytes) -> tuple[WALHeader, WALScan]:
    """Parse the header and scan every frame from offset 32."""
    header = WALHeader.parse(wal_bytes, "test-wal")
    frames = memoryview(wal_bytes)[WAL_HEADER_SIZE:]
    return header, scan(frames, header, WAL_HEADER_SIZE, (header.checksum1, header.checksum2))


def first_oracle_scan(wal_bytes: bytes) -> dict:
    header = WALHeader.parse(wal_bytes)
    frames = wal_bytes[WAL_HEADER_SIZE:]
    return oracle_scan(frames, header, WAL_HEADER_SIZE, (header.checksum1, header.checksum2))


def replay(db: bytes, result: WALScan, page_size: int) -> bytes:
    """The main file with the scan's pages written over it, cut to the commit size."""
    image = bytearray(db)
    image.extend(bytes(max(0, result.commit * page_size - len(image))))
    for pgno, page in result.pages.items():
        image[(pgno - 1) * page_size : pgno * page_size] = page
    del image[result.commit * page_size :]
    return bytes(image)


def check_replay(tmp_path: Path, src: Source, result: WALScan, image: bytes, rows=None):
    """The replayed file equals SQLite's own image, passes integrity_check, has the rows."""
    replayed = replay(src.db, result, src.page_size)
    assert replayed == image
    path = tmp_path / "replayed.db"
    path.write_bytes(replayed)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        if rows is not None:
            assert conn.execute("SELECT id, v FROM t ORDER BY id").fetchall() == rows
    finally:
        conn.close()


def test_header_parse_real_wal(source):
    header = WALHeader.parse(source.wal, "db-wal")
    fields = struct.unpack(">8I", source.wal[:32])
    assert (header.magic, header.version, header.page_size, header.checkpoint_seq) == fields[:4]
    assert (header.salt1, header.salt2, header.checksum1, header.checksum2) == fields[4:]
    assert header.version == 3007000
    assert header.page_size == source.page_size
    # SQLite writes checksums in the host's byte order.
    assert header.big_endian == (sys.byteorder == "big")


@pytest.mark.parametrize(
    "batch_bytes", [wal._BATCH_BYTES, 3 * 70_000], ids=["batch-default", "batch-small"]
)
def test_scan_matches_sqlite(source, tmp_path, batch_bytes):
    with mock.patch.object(wal, "_BATCH_BYTES", batch_bytes):
        header, result = first_scan(source.wal)
    assert result.end_offset == len(source.wal) == source.commit_ends[-1]
    assert result.commit == len(source.images[-1]) // source.page_size
    assert result.frame_count == (len(source.wal) - WAL_HEADER_SIZE) // header.frame_size
    assert result.txn_count == len(source.commit_ends)  # CREATE TABLE, then the snapshot's
    assert result.stopped is None
    last_frame = source.wal[-header.frame_size :]
    assert result.checksum == struct.unpack_from(">II", last_frame, 16)
    assert as_dict(result) == first_oracle_scan(source.wal)
    check_replay(tmp_path, source, result, source.images[-1], source.rows)


def test_incremental_scan_equals_one_scan(source):
    header, whole = first_scan(source.wal)
    cuts = [40, len(source.wal) // 3, len(source.wal) // 2]
    cuts += [source.commit_ends[5] - 1, source.commit_ends[5]]  # mid-frame, at a commit
    for cut in cuts:
        first = scan(source.wal[32:cut], header, 32, (header.checksum1, header.checksum2))
        rest = memoryview(source.wal)[first.end_offset :]
        second = scan(rest, header, first.end_offset, first.checksum)
        assert first.end_offset in [WAL_HEADER_SIZE, *source.commit_ends]
        assert second.end_offset == whole.end_offset
        assert (second.checksum, second.commit) == (whole.checksum, whole.commit)
        assert first.frame_count + second.frame_count == whole.frame_count
        assert first.txn_count + second.txn_count == whole.txn_count
        assert as_dict(first)["pages"] | as_dict(second)["pages"] == as_dict(whole)["pages"]


def test_torn_tail_mid_frame(source, tmp_path):
    size = source.page_size + FRAME_HEADER_SIZE
    torn = source.wal[: source.commit_ends[-1] - size // 2]
    _, result = first_scan(torn)
    assert result.end_offset == source.commit_ends[-2]
    assert result.stopped == ScanStop(Stop.PARTIAL_FRAME, source.commit_ends[-1] - size)
    assert result.stopped.partial and str(result.stopped) == f"partial frame at offset {source.commit_ends[-1] - size}"
    check_replay(tmp_path, source, result, source.images[-2])


def test_torn_tail_before_commit_frame(source, tmp_path):
    size = source.page_size + FRAME_HEADER_SIZE
    ends = source.commit_ends
    last = max(i for i in range(1, len(ends)) if ends[i] - ends[i - 1] > size)  # 2+ frames
    torn = source.wal[: ends[last] - size]  # that transaction without its commit frame
    _, result = first_scan(torn)
    assert result.end_offset == source.commit_ends[last - 1]
    assert result.stopped is None
    check_replay(tmp_path, source, result, source.images[last - 1])


@pytest.mark.parametrize(
    "where, byte, reason",
    [
        ("page", FRAME_HEADER_SIZE + 300, Stop.CHECKSUM_MISMATCH),
        ("commit-size", 5, Stop.CHECKSUM_MISMATCH),
        ("salt1", 8, Stop.SALT_MISMATCH),  # salts are not checksummed
        ("salt2", 15, Stop.SALT_MISMATCH),
        ("checksum1", 16, Stop.CHECKSUM_MISMATCH),
        ("checksum2", 23, Stop.CHECKSUM_MISMATCH),
    ],
)
def test_bit_flip_stops_before_its_transaction(source, tmp_path, where, byte, reason):
    size = source.page_size + FRAME_HEADER_SIZE
    txn = len(source.commit_ends) // 2
    frame = source.commit_ends[txn] - size  # the commit frame of transaction `txn`
    flipped = bytearray(source.wal)
    flipped[frame + byte] ^= 0x10
    _, result = first_scan(bytes(flipped))
    assert result.end_offset == source.commit_ends[txn - 1]
    assert result.stopped == ScanStop(reason, frame) and not result.stopped.partial
    check_replay(tmp_path, source, result, source.images[txn - 1])


def test_older_generation_frames_not_taken(tmp_path):
    """After a full checkpoint SQLite restarts the WAL: new salts, frames from offset 32,
    and the old generation's frames still in the file after them."""
    page_size = 4096
    path = tmp_path / "db"
    conn = open_wal_db(path, page_size)
    try:
        old = snapshot(conn, path, page_size, count=8, seed=1)
        old_frames = (len(old.wal) - WAL_HEADER_SIZE) // (FRAME_HEADER_SIZE + page_size)
        # Fully backfilled: the next write transaction restarts the WAL.
        checkpoint = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert checkpoint == (0, old_frames, old_frames)
        new = snapshot(conn, path, page_size, count=1, seed=2)
        new_frames = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
    finally:
        conn.close()
    header, result = first_scan(new.wal)
    assert (header.salt1, header.salt2) != struct.unpack(">II", old.wal[16:24])
    assert len(new.wal) == len(old.wal)  # the old frames are still there
    assert result.end_offset == 32 + new_frames * header.frame_size < len(new.wal)
    assert result.stopped == ScanStop(Stop.SALT_MISMATCH, result.end_offset)
    assert result.txn_count == 1
    check_replay(tmp_path, new, result, new.images[-1], new.rows)


def to_big_endian(wal_bytes: bytes) -> bytes:
    """The same WAL with magic 0x377f0683 and every checksum redone over big-endian words."""
    header = WALHeader.parse(wal_bytes)
    out = bytearray(wal_bytes)
    struct.pack_into(">I", out, 0, wal.WAL_MAGIC_BE)
    running = wal_checksum(bytes(out[:24]), True, 0, 0)
    struct.pack_into(">II", out, 24, *running)
    for offset in range(32, len(out) - header.frame_size + 1, header.frame_size):
        page = memoryview(out)[offset + FRAME_HEADER_SIZE : offset + header.frame_size]
        running = wal_checksum(bytes(out[offset : offset + 8]), True, *running)
        running = wal_checksum(page, True, *running)
        struct.pack_into(">II", out, offset + 16, *running)
    return bytes(out)


def test_big_endian_wal(source):
    big = to_big_endian(source.wal)
    header, result = first_scan(big)
    assert header.big_endian and header.magic == 0x377F0683
    _, little = first_scan(source.wal)
    assert result.checksum != little.checksum
    assert as_dict(result) | {"checksum": None} == as_dict(little) | {"checksum": None}
    assert as_dict(result) == first_oracle_scan(big)


# --- header errors ------------------------------------------------------------------


def make_header(magic=wal.WAL_MAGIC_LE, version=3007000, page_size=4096, big_endian=False) -> bytes:
    head = struct.pack(">6I", magic, version, page_size, 7, 0x01020304, 0xA0B0C0D0)
    return head + struct.pack(">II", *oracle_checksum(head, big_endian, 0, 0))


@pytest.mark.parametrize(
    "raw, message",
    [
        (make_header()[:31], "short input, 31 of 32 bytes"),
        (b"", "short input, 0 of 32 bytes"),
        (make_header(magic=0x377F0684), "bad magic 0x377f0684"),
        (make_header()[:-1] + bytes([make_header()[-1] ^ 1]), "bad header checksum"),
        (make_header(page_size=1000), "bad page size 1000"),
        (make_header(page_size=256), "bad page size 256"),
        (make_header(page_size=131072), "bad page size 131072"),
        (make_header(version=3007001), "unsupported version 3007001"),
    ],
)
def test_bad_header_raises(raw, message):
    with pytest.raises(WALError, match=f"^WAL header of /data/t1.db-wal: {message}") as caught:
        WALHeader.parse(raw, "/data/t1.db-wal")
    assert "\n" not in str(caught.value)


def test_header_parse_without_name_and_both_byte_orders():
    assert not WALHeader.parse(make_header()).big_endian
    assert WALHeader.parse(make_header(magic=wal.WAL_MAGIC_BE, big_endian=True)).big_endian
    with pytest.raises(WALError, match="^WAL header: bad magic"):
        WALHeader.parse(bytes(32))


def test_scan_rejects_unaligned_offset():
    header = WALHeader.parse(make_header())
    with pytest.raises(ValueError, match="not a frame boundary"):
        scan(b"", header, 33, (0, 0))
    with pytest.raises(ValueError, match="not a frame boundary"):
        scan(b"", header, 0, (0, 0))


def test_scan_of_no_data():
    header = WALHeader.parse(make_header())
    result = scan(b"", header, 32, (5, 6))
    assert as_dict(result) == oracle_scan(b"", header, 32, (5, 6))
    assert (result.end_offset, result.checksum, result.commit) == (32, (5, 6), None)
    assert result.pages == {}


# --- property tests against the oracle --------------------------------------------------


@given(
    data=st.binary(max_size=600).map(lambda b: b[: len(b) - len(b) % 8]),
    big_endian=st.booleans(),
    s0=st.integers(0, MASK),
    s1=st.integers(0, MASK),
)
def test_wal_checksum_matches_oracle(data, big_endian, s0, s1):
    assert wal_checksum(data, big_endian, s0, s1) == oracle_checksum(data, big_endian, s0, s1)


def test_wal_checksum_rejects_partial_pair():
    with pytest.raises(ValueError, match="multiple of 8"):
        wal_checksum(bytes(12), False, 0, 0)


SALTS = (0x11111111, 0xFFFFFFFE)

frame_specs = st.lists(
    st.tuples(
        st.integers(0, 12),  # page number; 0 is never trusted
        st.booleans(),  # commit frame?
        st.integers(0, 2**32 - 1),  # seed of the page content
        st.sampled_from(["ok"] * 8 + ["bitflip", "salt"]),
    ),
    max_size=24,
)


def build_frames(page_size, big_endian, specs, running):
    """Frames whose checksums chain from ``running``, then damaged as each spec says.

    Returns the bytes and the intended running checksum at each frame boundary."""
    out, checkpoints = bytearray(), [running]
    for pgno, is_commit, seed, damage in specs:
        page = bytearray(random.Random(seed).randbytes(page_size))
        if seed % 5 == 0:
            page[: page_size // 2] = b"\xff" * (page_size // 2)  # words that wrap the sums
        head = struct.pack(">II", pgno, (pgno + 3) if is_commit else 0)
        running = oracle_checksum(head + page, big_endian, *running)
        salts = list(SALTS)
        if damage == "salt":
            salts[seed % 2] ^= 1  # another generation's salt1 or salt2
        frame = bytearray(head + struct.pack(">4I", *salts, *running) + page)
        if damage == "bitflip":
            frame[seed % len(frame)] ^= 1 << (seed % 8)
        out += frame
        checkpoints.append(running)
    return bytes(out), checkpoints


@settings(max_examples=150, deadline=None)
@given(
    page_size=st.sampled_from([512, 1024]),
    big_endian=st.booleans(),
    specs=frame_specs,
    start_checksum=st.tuples(st.integers(0, MASK), st.integers(0, MASK)),
    start_frame=st.integers(0, 24),
    tail=st.integers(0, 1100),
    batch_frames=st.sampled_from([1, 2, 3, 1000]),
)
def test_scan_matches_oracle(
    page_size, big_endian, specs, start_checksum, start_frame, tail, batch_frames
):
    """Any frame sequence, torn anywhere, scanned from any frame boundary, in batches of
    any size: the vectorised scan agrees with the word-by-word oracle."""
    magic = wal.WAL_MAGIC_BE if big_endian else wal.WAL_MAGIC_LE
    header = WALHeader(magic, 3007000, page_size, 0, *SALTS, *start_checksum)
    frames, checkpoints = build_frames(page_size, big_endian, specs, start_checksum)
    frames = frames[: max(0, len(frames) - tail)]  # maybe a torn tail
    size = header.frame_size
    start_frame = min(start_frame, len(specs))
    data, running = frames[start_frame * size :], checkpoints[start_frame]
    start = WAL_HEADER_SIZE + start_frame * size
    with mock.patch.object(wal, "_BATCH_BYTES", batch_frames * size):
        result = scan(data, header, start, running)
    assert as_dict(result) == oracle_scan(data, header, start, running)


# --- SQLite's wal-index header (-shm) ---------------------------------------------------


def test_wal_index_names_the_generation_its_last_frame_and_what_is_copied(tmp_path):
    db = str(tmp_path / "a.db")
    conn = open_wal_db(db, 4096)
    fd = os.open(db + "-shm", os.O_RDONLY)
    try:
        conn.execute("INSERT INTO t(v) VALUES (randomblob(9000))")
        header, size = wal.read_header(db + "-wal")
        index = wal.read_index(fd)
        assert index.of_generation(header.salt1, header.salt2)
        assert index.end_offset(header.page_size) == size and index.max_frame > 1
        assert index.backfilled == 0 and not index.fully_backfilled
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        assert wal.read_index(fd).fully_backfilled
    finally:
        conn.close()  # before our descriptor: closing it drops this process's locks on the file
        os.close(fd)


def _index_of(tmp_path, head: bytes):
    path = tmp_path / "shm"
    path.write_bytes(head)
    fd = os.open(path, os.O_RDONLY)
    try:
        return wal.read_index(fd)
    finally:
        os.close(fd)


def test_wal_index_mid_update_uninitialised_or_short_reads_as_none(tmp_path):
    copy = struct.pack("=IIIBBHI", 3007000, 0, 1, 1, 0, 4096, 5).ljust(32, b"\0") + struct.pack(">II", 7, 8)
    copy = copy.ljust(48, b"\0")
    backfill = struct.pack("=I", 3) + b"\0" * 36
    assert _index_of(tmp_path, copy + copy + backfill) == wal.WALIndex(7, 8, max_frame=5, backfilled=3)
    torn = copy[:40] + b"\1" * 8
    assert _index_of(tmp_path, copy + torn + backfill) is None  # SQLite between its two copies
    assert _index_of(tmp_path, bytes(136)) is None  # not initialised
    assert _index_of(tmp_path, (copy + copy + backfill)[:99]) is None
