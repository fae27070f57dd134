"""Building L0 files: the committed frames a pass reads, and the positions files establish."""

from __future__ import annotations

import shutil

import pytest

from tenantsync import l0
from tenantsync import wal as walmod
from tenantsync.ltx import HEADER_FLAG_NO_CHECKSUM, Header
from tenantsync.position import DBStat, Position

from .dbutil import app_db, write_rows


@pytest.fixture
def wal_copy(tmp_path):
    """A WAL of several transactions, one of them many frames long, copied while the
    writer is open (closing it would checkpoint the WAL away): (path, header, size)."""
    db = str(tmp_path / "a.db")
    conn = app_db(db)
    conn.execute("PRAGMA wal_autocheckpoint=0")
    write_rows(conn, 5)
    write_rows(conn, 40, size=3000)
    write_rows(conn, 2)
    path = str(tmp_path / "copy-wal")
    shutil.copyfile(db + "-wal", path)
    conn.close()
    header, size = walmod.read_header(path)
    return path, header, size


def whole(path, header, size):
    data = walmod.read_range(path, walmod.WAL_HEADER_SIZE, size)
    return walmod.scan(data, header, walmod.WAL_HEADER_SIZE, (header.checksum1, header.checksum2))


def read_all(path, header, size, index=None):
    return l0.committed_frames(path, header, size, walmod.WAL_HEADER_SIZE,
                               (header.checksum1, header.checksum2), index)


def test_a_transaction_larger_than_the_chunk_is_read_whole(wal_copy, monkeypatch):
    path, header, size = wal_copy
    monkeypatch.setattr(l0, "WAL_CHUNK", header.frame_size)  # every transaction is larger
    expect = whole(path, header, size)
    got = read_all(path, header, size)
    assert got.end == expect.end_offset == size
    assert (got.checksum, got.commit) == (expect.checksum, expect.commit)
    assert {p: bytes(v) for p, v in got.pages.items()} == {p: bytes(v) for p, v in expect.pages.items()}


def test_a_torn_last_frame_stops_at_the_commit_before_it(wal_copy):
    path, header, size = wal_copy
    with open(path, "r+b") as f:
        f.truncate(size - header.frame_size // 2)  # the last transaction's frame, half written
    before = whole(path, header, size - header.frame_size)
    got = read_all(path, header, size - header.frame_size // 2)
    assert got.end == before.end_offset == size - header.frame_size  # the last transaction is one frame
    assert (got.checksum, got.commit) == (before.checksum, before.commit)


def test_a_wal_shortened_since_its_size_was_taken_ends_the_read_at_what_is_there(wal_copy):
    path, header, size = wal_copy
    with open(path, "r+b") as f:
        f.truncate(walmod.WAL_HEADER_SIZE + header.frame_size // 2)  # truncated by another process
    got = read_all(path, header, size)  # the size read before it
    assert (got.end, got.commit, got.pages) == (walmod.WAL_HEADER_SIZE, None, {})


def test_the_wal_index_bounds_the_read_at_sqlites_last_commit(wal_copy):
    path, header, size = wal_copy
    first = whole(path, header, walmod.WAL_HEADER_SIZE + header.frame_size * 2)
    assert first.txn_count >= 1
    frames = (first.end_offset - walmod.WAL_HEADER_SIZE) // header.frame_size
    index = walmod.WALIndex(header.salt1, header.salt2, max_frame=frames, backfilled=0)
    assert read_all(path, header, size, index).end == first.end_offset
    other = walmod.WALIndex(header.salt1 ^ 1, header.salt2, max_frame=frames, backfilled=0)
    assert read_all(path, header, size, other).end == size  # another generation's index bounds nothing


def _header(**wal) -> Header:
    return Header(flags=HEADER_FLAG_NO_CHECKSUM, page_size=4096, commit=9, min_txid=7, max_txid=7,
                  timestamp=0, **wal)


def test_an_l0_header_positions_just_past_its_wal_frames():
    hdr = _header(wal_offset=32 + 4120 * 3, wal_size=4120 * 2, wal_salt1=5, wal_salt2=6)
    pos = Position.after_l0(hdr, checksum=(1, 2))
    assert pos == Position(txid=7, page_size=4096, commit=9, salt1=5, salt2=6, wal_offset=32 + 4120 * 5,
                           checksum=(1, 2))
    stat = DBStat(1, 2, 3)
    empty = _header(wal_offset=32, wal_size=0, wal_salt1=5, wal_salt2=6)
    assert Position.after_l0(empty, db_stat=stat) == Position(
        txid=7, page_size=4096, commit=9, salt1=5, salt2=6, wal_offset=32, backfilled=True, db_stat=stat)


def test_files_without_a_wal_place_position_at_their_txid_only():
    bare = Position(txid=7, page_size=4096, commit=9)
    assert Position.after_l0(_header(wal_offset=0, wal_size=0, wal_salt1=0, wal_salt2=0)) == bare
    assert Position.after_compaction(_header(wal_offset=32, wal_size=4120, wal_salt1=5, wal_salt2=6)) == bare


def test_a_restored_database_is_positioned_at_the_start_of_a_wal_with_its_stat():
    stat = DBStat(1, 2, 3)
    assert Position.after_restore(7, 4096, 9, stat) == Position(
        txid=7, page_size=4096, commit=9, wal_offset=walmod.WAL_HEADER_SIZE, backfilled=True, db_stat=stat)
