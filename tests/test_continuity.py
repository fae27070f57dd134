"""The continuity proof's named results, against real WAL files."""

from __future__ import annotations

import os
import sqlite3
import time

import pytest

from tenantsync import wal as walmod
from tenantsync.capture import Capture
from tenantsync.continuity import Broken, InMainFile, Resume, continuity, may_have_news
from tenantsync.outcome import Full
from tenantsync.position import SETTLED_NS, DBStat
from tenantsync.replica import Replica
from tenantsync.storage import open_storage

from .dbutil import app_db, write_rows


@pytest.fixture
def shipped(tmp_path):
    """A database whose WAL our capture has read up to its end: (db path, app conn, position)."""
    db = str(tmp_path / "a.db")
    conn = app_db(db)
    conn.execute("PRAGMA wal_autocheckpoint=0")
    write_rows(conn, 20)
    cap = Capture(db, Replica(open_storage(f"file://{tmp_path}/replica")), own_checkpoints=False)
    cap.sync_once()
    write_rows(conn, 3, size=5000)  # overflow pages: a transaction of several frames
    cap.sync_once()  # incremental: a position that carries the WAL checksum
    pos = cap.position
    cap.close()
    yield db, conn, pos
    conn.close()


def judge(db, pos, held=False):
    header, size = walmod.read_header(db + "-wal")
    return continuity(pos, header, size, db + "-wal", db, held)


def test_same_wal_resumes_at_the_position_with_its_checksum(shipped):
    db, conn, pos = shipped
    write_rows(conn, 1)
    assert judge(db, pos) == Resume(pos.wal_offset, pos.checksum)
    assert may_have_news(pos, db + "-wal", db)


def test_nothing_committed_since_has_no_news(shipped):
    db, _, pos = shipped
    assert not may_have_news(pos, db + "-wal", db)


def test_a_position_rebuilt_from_an_l0_header_is_proved_by_scanning_up_to_it(shipped):
    db, _, pos = shipped
    assert judge(db, pos.advanced(checksum=None)) == Resume(pos.wal_offset, pos.checksum)


def test_a_wal_restarted_by_another_process_breaks_continuity(shipped):
    db, conn, pos = shipped
    conn.execute("PRAGMA wal_checkpoint(RESTART)")
    write_rows(conn, 1)
    assert judge(db, pos) == Broken(Full.WAL_RESTARTED)


def test_a_wal_truncated_by_another_process_breaks_continuity(shipped):
    db, conn, pos = shipped
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert judge(db, pos) == Broken(Full.WAL_TRUNCATED)
    assert may_have_news(pos, db + "-wal", db)


def test_other_frames_at_the_position_break_continuity(shipped):
    db, _, pos = shipped
    assert judge(db, pos.advanced(checksum=(1, 2))) == Broken(Full.WAL_REPLACED)
    assert judge(db, pos.advanced(checksum=None, wal_offset=pos.wal_offset - pos.page_size - 24)) \
        == Broken(Full.WAL_REPLACED)  # inside a transaction: not where a scan ends


def test_a_wal_shorter_than_the_position_breaks_continuity(shipped):
    db, _, pos = shipped
    size = os.path.getsize(db + "-wal")
    assert judge(db, pos.advanced(wal_offset=size + pos.page_size + 24)) == Broken(Full.WAL_SHORTENED)


def test_a_wal_shortened_after_its_size_was_taken_breaks_continuity(shipped, tmp_path):
    db, _, pos = shipped
    header, size = walmod.read_header(db + "-wal")
    copy = str(tmp_path / "copy-wal")
    with open(db + "-wal", "rb") as src, open(copy, "wb") as dst:
        dst.write(src.read(walmod.WAL_HEADER_SIZE))  # truncated by another process since
    assert continuity(pos, header, size, copy, db, False) == Broken(Full.WAL_REPLACED)


def test_a_position_without_a_wal_place_or_of_another_page_size_is_broken(shipped):
    db, _, pos = shipped
    assert judge(db, pos.advanced(wal_offset=0)) == Broken(Full.NO_WAL_POSITION)
    assert judge(db, pos.advanced(page_size=1024)) == Broken(Full.PAGE_SIZE_CHANGED)


def test_after_our_release_the_unchanged_main_file_proves_continuity(tmp_path):
    db = str(tmp_path / "a.db")
    conn = app_db(db)
    write_rows(conn, 10)
    cap = Capture(db, Replica(open_storage(f"file://{tmp_path}/replica")))
    cap.sync_once()
    cap.release()
    pos = cap.position
    # The barrier's checkpoint and the read mark taken after it both prove the backfill:
    # the position keeps the stat the file has, not the first of two.
    assert pos.backfilled and pos.db_stat == DBStat.of(db)
    conn.close()  # the last connection: SQLite checkpoints and deletes the WAL
    assert not os.path.exists(db + "-wal")
    assert judge(db, pos) == InMainFile()
    assert not may_have_news(pos, db + "-wal", db)
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("INSERT INTO t(v) VALUES (x'00')")  # a new WAL, the main file unchanged
    header, _ = walmod.read_header(db + "-wal")
    assert judge(db, pos) == Resume(walmod.WAL_HEADER_SIZE, (header.checksum1, header.checksum2))
    other.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the main file changes behind us
    other.close()
    assert judge(db, pos) == Broken(Full.WAL_TRUNCATED)


def _stamp(path, mtime_ns):
    os.utime(path, ns=(os.stat(path).st_atime_ns, mtime_ns))


def test_a_settled_stat_is_not_one_a_write_in_the_same_clock_tick_can_give(tmp_path):
    """Kernels before 6.13 stamp writes with a coarse clock (1 to 10 ms): an application
    checkpoint in the tick of ours would leave size and mtime as we recorded them, and
    the proof would hold over a commit nobody shipped. Simulated here by stamping the
    file as such a kernel would (this machine's kernel gives fine-grained stamps)."""
    db = tmp_path / "a.db"
    db.write_bytes(b"x" * 4096)
    tick = time.time_ns()
    _stamp(db, tick)  # just written by our checkpoint
    proof = DBStat.settled(str(db))
    assert proof == DBStat.of(str(db)) and proof.mtime_ns == tick - 1
    db.write_bytes(b"y" * 4096)  # the application's checkpoint in the same tick: same size, same stamp
    _stamp(db, tick)
    assert DBStat.of(str(db)) != proof
    again = DBStat.settled(str(db), known=proof)  # proved once more after that write
    assert again.mtime_ns == tick - 2, "not the value the earlier proof holds"
    assert DBStat.settled(str(db), known=again) == again == DBStat.of(str(db)), "kept while unchanged"


def test_an_old_stat_is_kept_as_it_is(tmp_path):
    db = tmp_path / "a.db"
    db.write_bytes(b"x" * 4096)
    old = time.time_ns() - 10 * SETTLED_NS
    _stamp(db, old)
    assert DBStat.settled(str(db)).mtime_ns == old == os.stat(db).st_mtime_ns

