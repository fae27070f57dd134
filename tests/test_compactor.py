"""Compaction, snapshots and retention over real replicas (file:// and S3)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from tenantsync.capture import Capture
from tenantsync.compactor import compact, is_due, retain, snapshot
from tenantsync.levels import Levels
from tenantsync.errors import TargetUnavailable
from tenantsync.ltx import HEADER_FLAG_NO_CHECKSUM, Decoder
from tenantsync.replica import LTXInfo, Replica
from tenantsync.restore import plan, restore
from tenantsync.storage import open_storage

from .dbutil import app_db, dump, write_rows


def history(tmp_path, url, passes=12):
    """A replicated database with one L0 file per pass; returns (replica, states by txid)."""
    replica = Replica(open_storage(url))
    db = str(tmp_path / "a.db")
    conn = app_db(db)
    write_rows(conn, 20)
    cap = Capture(db, replica)
    states = {}
    for _ in range(passes):
        write_rows(conn, 3, size=500)
        conn.execute("UPDATE t SET v = randomblob(300) WHERE id % 7 = 0")
        txid = cap.sync_once().txid
        states[txid] = dump(db)
    return replica, states


def restored(replica, tmp_path, **target):
    out = tmp_path / "out.db"
    restore(replica, str(out), force=True, **target)
    return dump(str(out))


def test_level_1_merges_l0_into_one_file_like_litestream(tmp_path, storage_url):
    replica, states = history(tmp_path, storage_url)
    info = compact(replica, 1, force=True)
    assert (info.min_txid, info.max_txid) == (1, max(states))
    hdr = Decoder(replica.read(info)).header
    last_l0 = Decoder(replica.read(replica.files(0)[-1])).header
    assert hdr.flags == HEADER_FLAG_NO_CHECKSUM and hdr.wal_offset == 0 and hdr.wal_salt1 == 0
    assert hdr.timestamp == last_l0.timestamp and hdr.commit == last_l0.commit
    assert restored(replica, tmp_path) == states[max(states)]


def test_compaction_twice_writes_nothing_new(tmp_path, file_url):
    replica, _ = history(tmp_path, file_url)
    compact(replica, 1, force=True)
    assert compact(replica, 1, force=True) is None
    assert len(replica.files(1)) == 1


def test_compaction_continues_from_the_previous_output(tmp_path, file_url):
    replica, states = history(tmp_path, file_url, passes=4)
    compact(replica, 1, force=True)
    db = str(tmp_path / "a.db")
    conn = app_db(db)
    cap = Capture(db, replica)
    for _ in range(3):
        write_rows(conn, 2)
        states[cap.sync_once().txid] = dump(db)
    second = compact(replica, 1, force=True)
    assert second.min_txid == 5 and second.max_txid == max(states)
    for txid in (4, max(states)):
        assert restored(replica, tmp_path, txid=txid) == states[txid]


def test_interval_is_aligned_to_the_wall_clock():
    t = datetime(2026, 11, 25, 12, 0, 10, tzinfo=timezone.utc)
    newest = LTXInfo(1, 1, 5, 100, t, "ltx/1/x")
    every_30s = timedelta(seconds=30)
    assert not is_due(newest, every_30s, t + timedelta(seconds=15))  # same 30 s window
    assert is_due(newest, every_30s, t + timedelta(seconds=20))  # 12:00:30 has passed
    assert is_due(None, every_30s, t)


def test_snapshot_and_higher_levels_make_restore_read_fewer_files(tmp_path, storage_url):
    replica, states = history(tmp_path, storage_url, passes=10)
    compact(replica, 1, force=True)
    compact(replica, 2, force=True)
    snap = snapshot(replica, force=True)
    assert (snap.min_txid, snap.max_txid) == (1, max(states))
    assert [(i.level, i.max_txid) for i in plan(replica)] == [(9, max(states))]
    assert restored(replica, tmp_path) == states[max(states)]


def test_retention_keeps_every_point_inside_the_window(tmp_path, file_url):
    replica, states = history(tmp_path, file_url, passes=8)
    compact(replica, 1, force=True)
    snapshot(replica, force=True)
    later = datetime.now(timezone.utc) + timedelta(minutes=10)
    deleted = retain(replica, Levels(), now=later)
    assert deleted and all(i.level == 0 for i in deleted)
    assert len(replica.files(0)) == 1  # the newest L0 stays: capture's position lives there
    assert restored(replica, tmp_path) == states[max(states)]


def test_restore_outside_the_window_fails_clearly(tmp_path, file_url):
    replica, states = history(tmp_path, file_url, passes=6)
    compact(replica, 1, force=True)
    snapshot(replica, force=True)
    retain(replica, Levels(), now=datetime.now(timezone.utc) + timedelta(minutes=10))
    with pytest.raises(TargetUnavailable, match="txid 0000000000000002 is not available|no snapshot"):
        restore(replica, str(tmp_path / "old.db"), txid=2)
    assert not (tmp_path / "old.db").exists()


def test_large_files_are_streamed_in_blocks_by_restore_and_compaction(tmp_path, storage_url, monkeypatch):
    from tenantsync import replica as replica_mod

    replica, states = history(tmp_path, storage_url)
    # Every file counts as large, and blocks are smaller than a page: each block boundary
    # falls inside a frame, which the decoder must stitch across ranged reads.
    monkeypatch.setattr(replica_mod, "STREAM_ABOVE", 0)
    monkeypatch.setattr(replica_mod, "BLOCK", 1000)
    reads = []
    real_read = replica.storage.read

    def counted(key, start=0, length=None):
        reads.append((key, start, length))
        return real_read(key, start, length)

    monkeypatch.setattr(replica.storage, "read", counted)
    assert restored(replica, tmp_path) == states[max(states)]
    assert all(length is not None and length <= 1000 for _, _, length in reads)
    assert compact(replica, 1, force=True) is not None
    assert snapshot(replica, force=True) is not None
    reads.clear()
    assert restored(replica, tmp_path) == states[max(states)]
    assert reads and all(length is not None and length <= 1000 for _, _, length in reads)


@pytest.mark.parametrize("pitr", [True, False])
def test_the_one_shot_commands_follow_the_config(tmp_path, file_url, pitr):
    """`tenantsync compact` and `retain` take levels and retention from tenantsync.yml, as
    the fleet's schedule does: l0-retention 0s expires every L0 file at once, and
    ``pitr-seconds`` decides whether their states are kept at level 8."""
    from .test_interop import tenantsync_cli

    replica, states = history(tmp_path, file_url, passes=6)
    config = tmp_path / "tenantsync.yml"
    config.write_text(f"l0-retention: 0s\npitr-seconds: {str(pitr).lower()}\n")
    tenantsync_cli("compact", "--replica", file_url, "--level", "1", "--config", str(config))
    out = tenantsync_cli("retain", "--replica", file_url, "--config", str(config)).stdout
    assert out == "deleted 5 files\n"  # every L0 file but the newest
    assert bool(replica.files(8)) is pitr
    assert restored(replica, tmp_path) == states[max(states)]
