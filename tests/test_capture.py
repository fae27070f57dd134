"""Capture passes against real SQLite files and a real file:// replica."""

from __future__ import annotations

import os
import sqlite3
import threading

import pytest

from tenantsync import capture
from tenantsync.capture import Capture
from tenantsync.errors import DatabaseError, LeaseHeld, sqlite_busy
from tenantsync.outcome import Full
from tenantsync.replica import Replica
from tenantsync.restore import restore
from tenantsync.storage import open_storage

from .dbutil import app_db, dump, write_rows


@pytest.fixture
def replica(tmp_path):
    return Replica(open_storage(f"file://{tmp_path}/replica"))


def restored(replica, tmp_path, name="out.db", **target):
    out = tmp_path / name
    restore(replica, str(out), force=True, **target)
    return dump(str(out))


def test_first_pass_writes_a_snapshot_at_txid_1(tmp_path, replica):
    conn = app_db(tmp_path / "a.db")
    write_rows(conn, 50)
    cap = Capture(str(tmp_path / "a.db"), replica)
    result = cap.sync_once()
    assert result.txid == 1 and result.full is Full.FIRST
    assert [f.name for f in replica.files(0)] == ["0000000000000001-0000000000000001.ltx"]
    assert restored(replica, tmp_path) == dump(str(tmp_path / "a.db"))


def test_each_pass_ships_only_new_commits_at_the_next_txid(tmp_path, replica):
    conn = app_db(tmp_path / "a.db")
    write_rows(conn, 10)
    cap = Capture(str(tmp_path / "a.db"), replica)
    cap.sync_once()
    states = {1: dump(str(tmp_path / "a.db"))}
    for txid in range(2, 6):
        write_rows(conn, 3)
        result = cap.sync_once()
        assert result.txid == txid and result.full is None
        assert result.pages < 10
        states[txid] = dump(str(tmp_path / "a.db"))
    assert cap.sync_once().txid is None
    for txid, expected in states.items():
        assert restored(replica, tmp_path, txid=txid) == expected


def test_own_checkpoints_never_force_a_full_page_file(tmp_path, replica):
    conn = app_db(tmp_path / "a.db")
    cap = Capture(str(tmp_path / "a.db"), replica, checkpoint_pages=20, truncate_pages=60)
    cap.sync_once()
    for _ in range(40):
        write_rows(conn, 20, size=900)
        result = cap.sync_once()
        assert result.full is None
    assert os.path.getsize(str(tmp_path / "a.db") + "-wal") < 70 * 4200
    assert restored(replica, tmp_path) == dump(str(tmp_path / "a.db"))


def test_release_then_resume_continues_without_a_full_upload(tmp_path, replica):
    db = str(tmp_path / "a.db")
    conn = app_db(db)
    write_rows(conn, 30)
    saved = []
    cap = Capture(db, replica, on_position=saved.append)
    cap.sync_once()
    cap.release()
    write_rows(conn, 5)
    again = Capture(db, replica, position=saved[-1])
    result = again.sync_once()
    assert result.txid == 2 and result.full is None
    assert restored(replica, tmp_path) == dump(db)


def test_release_of_a_tenant_with_an_empty_wal_takes_no_barrier(tmp_path, replica, monkeypatch):
    db = str(tmp_path / "a.db")
    conn = app_db(db)
    write_rows(conn, 30)
    conn.close()  # checkpoints and deletes the WAL: everything is in the main file
    saved = []
    cap = Capture(db, replica, on_position=saved.append)
    assert cap.sync_once().full is Full.FIRST
    monkeypatch.setattr(cap, "_take_barrier", lambda wait: pytest.fail("took the checkpoint barrier"))
    assert cap.release().txid is None
    conn = app_db(db)
    write_rows(conn, 5)
    again = Capture(db, replica, position=saved[-1])
    assert again.has_news()
    result = again.sync_once()
    assert result.txid == 2 and result.full is None
    assert restored(replica, tmp_path) == dump(db)


def test_restart_after_kill_resumes_from_the_replica_position(tmp_path, replica):
    db = str(tmp_path / "a.db")
    conn = app_db(db)
    write_rows(conn, 30)
    Capture(db, replica).sync_once()  # never closed: as if the process died
    write_rows(conn, 5)
    result = Capture(db, replica).sync_once()
    assert result.txid == 2 and result.full is None
    assert restored(replica, tmp_path) == dump(db)


def test_wal_reset_by_the_application_writes_a_full_page_file(tmp_path, replica):
    db = str(tmp_path / "a.db")
    conn = app_db(db)
    write_rows(conn, 30)
    cap = Capture(db, replica)
    cap.sync_once()
    cap.close()  # nobody holds a read mark now
    write_rows(conn, 5)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # those 5 rows never reach our WAL reader
    write_rows(conn, 5)
    result = Capture(db, replica).sync_once()
    assert result.txid == 2 and result.full is Full.WAL_RESTARTED
    assert restored(replica, tmp_path) == dump(db)


def test_replaced_file_is_detected_and_written_in_full(tmp_path, replica):
    db = str(tmp_path / "a.db")
    conn = app_db(db)
    write_rows(conn, 30)
    cap = Capture(db, replica)
    cap.sync_once()
    conn.close()
    other = app_db(tmp_path / "b.db")
    write_rows(other, 7)
    other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    other.close()
    os.remove(db + "-wal")  # what a careful operator swapping files does
    os.replace(str(tmp_path / "b.db"), db)
    result = cap.sync_once()
    assert result.txid == 2 and result.full is Full.FILE_REPLACED
    assert restored(replica, tmp_path) == dump(db)


def test_replication_after_a_restore_continues_the_txid_sequence(tmp_path, replica):
    db = str(tmp_path / "a.db")
    conn = app_db(db)
    write_rows(conn, 30)
    cap = Capture(db, replica)
    cap.sync_once()
    write_rows(conn, 3)
    cap.sync_once()
    cap.close()
    conn.close()
    os.remove(db)
    os.remove(db + "-wal") if os.path.exists(db + "-wal") else None
    restore(replica, db)
    conn = app_db(db)
    write_rows(conn, 4)
    result = Capture(db, replica).sync_once()
    assert result.txid == 3
    assert [f.max_txid for f in replica.files(0)] == [1, 2, 3]
    assert restored(replica, tmp_path) == dump(db)


def test_schema_is_left_untouched(tmp_path, replica):
    db = str(tmp_path / "a.db")
    conn = app_db(db)
    write_rows(conn, 3)
    Capture(db, replica).sync_once()
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert names == {"t"}


def test_a_file_that_is_not_sqlite_is_refused_with_its_path(tmp_path, replica):
    path = tmp_path / "notes.db"
    path.write_bytes(b"hello, this is not a database" * 10)
    with pytest.raises(DatabaseError, match="notes.db: not a SQLite database"):
        Capture(str(path), replica).sync_once()
    assert replica.files(0) == []


def test_an_empty_file_is_not_an_error_and_ships_nothing(tmp_path, replica):
    path = tmp_path / "new.db"
    path.write_bytes(b"")
    assert Capture(str(path), replica).sync_once().txid is None


def test_shrinking_database_is_restored_at_its_new_size(tmp_path, replica):
    db = str(tmp_path / "a.db")
    conn = app_db(db)
    write_rows(conn, 200, size=2000)
    cap = Capture(db, replica)
    cap.sync_once()
    conn.execute("DELETE FROM t")
    conn.execute("VACUUM")
    cap.sync_once()
    out = tmp_path / "out.db"
    restore(replica, str(out))
    assert os.path.getsize(out) == sqlite3.connect(db).execute("PRAGMA page_count").fetchone()[0] * 4096
    assert dump(str(out)) == dump(db)


def _copied_frames(cap: Capture) -> int:
    """Frames SQLite has copied into the main file (the wal-index's nBackfill), read
    through the capture's own ``-shm`` descriptor: closing any other descriptor of the
    file would drop this process's POSIX locks on it, SQLite's and ours."""
    return cap._wal_index().backfilled


def test_the_read_mark_moves_with_the_position_so_the_application_checkpoints_behind_us(tmp_path, replica):
    # A checkpoint between our barriers (our copy-ahead, or an application in this
    # process) copies what we have shipped: a mark left where it was taken would let it
    # copy nothing, and our next barrier would have every frame since to copy while the
    # application waits.
    db = str(tmp_path / "a.db")
    conn = app_db(db)
    conn.execute("PRAGMA wal_autocheckpoint=0")
    cap = Capture(db, replica, checkpoint_pages=40, checkpoint_gap=0)
    write_rows(conn, 1)
    cap.sync_once()
    for _ in range(12):
        write_rows(conn, 1)
    shipped = cap.sync_once()
    assert shipped.txid == 2 and not shipped.follow_up
    conn.execute("PRAGMA wal_autocheckpoint=2")
    write_rows(conn, 1)  # its autocheckpoint copies up to our new mark
    assert _copied_frames(cap) == cap._wal_frames() > 10


def test_after_a_checkpoint_the_first_pass_of_the_restarted_wal_leaves_read_lock_0(tmp_path, replica):
    # Our checkpoint ends on read-lock 0 so that the application can restart the WAL, but
    # read-lock 0 stops every copy: past its autocheckpoint threshold each of its commits
    # would sort the whole WAL index for nothing. The next pass must take a real mark.
    db = str(tmp_path / "a.db")
    conn = app_db(db)
    conn.execute("PRAGMA wal_autocheckpoint=2")
    cap = Capture(db, replica, checkpoint_pages=40, checkpoint_gap=0)
    cap.sync_once()
    conn.execute("PRAGMA wal_autocheckpoint=0")
    for _ in range(50):
        write_rows(conn, 1)
    assert cap.sync_once().follow_up
    conn.execute("PRAGMA wal_autocheckpoint=2")
    write_rows(conn, 1)  # restarts the WAL
    write_rows(conn, 1)
    assert _copied_frames(cap) == 0
    cap.sync_once()
    write_rows(conn, 1)
    assert _copied_frames(cap) == cap._wal_frames() >= 2
    assert cap.sync_once().full is None
    assert restored(replica, tmp_path) == dump(db)


def _checkpoint_from_another_process(db: str) -> tuple[int, int, int]:
    """``PRAGMA wal_checkpoint(PASSIVE)`` as an application process would run it."""
    import subprocess
    import sys

    code = "import sqlite3, sys; print(*sqlite3.connect(sys.argv[1]).execute('PRAGMA wal_checkpoint(PASSIVE)').fetchone())"
    proc = subprocess.run([sys.executable, "-c", code, db], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return tuple(map(int, proc.stdout.split()))


def test_between_passes_other_processes_cannot_checkpoint(tmp_path, replica):
    # Past its autocheckpoint threshold an application tries a checkpoint after every
    # commit; while we hold SQLite's checkpoint lock that attempt is one failed lock
    # (SQLITE_BUSY at once) instead of a wal-index scan. Our own checkpoint still copies
    # the WAL, the lock is held again after it, and closing lets go of it.
    db = str(tmp_path / "a.db")
    conn = app_db(db)
    conn.execute("PRAGMA wal_autocheckpoint=0")
    write_rows(conn, 30)
    cap = Capture(db, replica, checkpoint_pages=10_000, checkpoint_gap=0)
    cap.sync_once()
    assert _checkpoint_from_another_process(db) == (1, -1, -1)
    write_rows(conn, 5)
    cap.checkpoint()
    assert cap.position.backfilled and _copied_frames(cap) > 0  # every frame is in the main file
    write_rows(conn, 5)
    cap.sync_once()
    assert _checkpoint_from_another_process(db) == (1, -1, -1)
    conn.close()  # before the capture's descriptors: closing one drops this process's locks
    cap.close()
    assert _checkpoint_from_another_process(db)[0] == 0
    conn = app_db(db)
    cap = Capture(db, replica, own_checkpoints=False)
    write_rows(conn, 5)
    cap.sync_once()
    assert _checkpoint_from_another_process(db)[0] == 0
    conn.close()
    cap.close()
    assert restored(replica, tmp_path) == dump(db)


def test_a_checkpoint_never_copies_frames_its_fence_refuses_to_ship(tmp_path, replica, monkeypatch):
    """A process that lost the lease (its fence now refuses uploads) releases the tenant
    while a commit slips in just before its checkpoint barrier. That tail must stay in the
    WAL, unshipped by us and uncopied: copied into the main file, it lets the application
    restart the WAL, and the lease holder's next pass can no longer prove continuity and
    uploads the whole database again (a full-page file) instead of the new pages."""
    db = str(tmp_path / "a.db")
    conn = app_db(db)
    write_rows(conn, 200)
    old = Capture(db, replica)
    old.sync_once()
    write_rows(conn, 2)
    assert old.sync_once().txid == 2

    def lost() -> None:
        raise LeaseHeld("a.db: lease generation 1 no longer held")

    old.fence = lost
    take_barrier = old._take_barrier

    def commit_first(wait):  # the application commits between the last pass and the barrier
        write_rows(conn, 1)
        return take_barrier(wait)

    monkeypatch.setattr(old, "_take_barrier", commit_first)
    with pytest.raises(LeaseHeld):
        old.release()
    old.close()
    write_rows(conn, 1)  # would restart the WAL, had the checkpoint copied the tail

    holder = Capture(db, replica)  # the new lease holder, resuming from the replica
    result = holder.sync_once()
    assert (result.txid, result.full) == (3, None)
    assert result.pages < 20
    assert restored(replica, tmp_path) == dump(db)


def _hold_write_lock(db: str, taken: threading.Event, until: threading.Event) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    taken.set()
    until.wait(10)
    conn.execute("ROLLBACK")
    conn.close()


def test_the_checkpoint_barrier_waits_out_the_applications_write_lock_then_gives_up(tmp_path, replica, monkeypatch):
    # Our barrier's BEGIN IMMEDIATE fails with SQLITE_BUSY (told by its result code, not
    # its message): it is retried until ``wait`` has passed, then the checkpoint is left to
    # a later pass; what is committed is shipped either way, and nothing raises.
    db = str(tmp_path / "a.db")
    conn = app_db(db)
    conn.execute("PRAGMA wal_autocheckpoint=0")
    write_rows(conn, 10)
    cap = Capture(db, replica)
    cap.sync_once()
    write_rows(conn, 1)
    conn.execute("BEGIN IMMEDIATE")
    assert cap.checkpoint(wait=0.05).txid == 2
    assert _copied_frames(cap) == 0
    conn.execute("ROLLBACK")
    write_rows(conn, 1)
    taken, refused = threading.Event(), threading.Event()

    def busy(e):  # the real check; the holder lets go once it has refused our barrier
        if sqlite_busy(e):
            refused.set()
            return True
        return False

    monkeypatch.setattr(capture, "sqlite_busy", busy)
    holder = threading.Thread(target=_hold_write_lock, args=(db, taken, refused))
    holder.start()
    taken.wait()
    assert cap.checkpoint(wait=5).txid == 3
    holder.join()
    assert refused.is_set()
    assert _copied_frames(cap) == cap._wal_index().max_frame > 0
    assert cap.position.backfilled
