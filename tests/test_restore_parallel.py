"""Restores through worker processes (restore_pool): exactly the source, or one clear error.

Most tests lower restore_pool's thresholds so that small replicas (cheap on moto) are cut
into many ranges and take the same path a multi-gigabyte snapshot takes; one test builds a
file above the real threshold.
"""

from __future__ import annotations

import shutil
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tenantsync import restore_pool
from tenantsync.capture import Capture
from tenantsync.errors import LTXError, RestoreError
from tenantsync.ltx import read_page_index
from tenantsync.replica import Replica
from tenantsync.restore import PREFETCH_FILES, _Prefetch, restore
from tenantsync.storage import open_storage

from .dbutil import app_db, dump, wait_for, write_rows
from .test_bad_input import replace_object
from .peer import _need_litestream, peer_replicating  # noqa: F401 (autouse fixture)

DATA = Path(__file__).parent / "data" / "ltx"


@pytest.fixture
def small_ranges(monkeypatch):
    """Every file through the workers, cut into ranges of a few pages."""
    monkeypatch.setattr(restore_pool, "PARALLEL_ABOVE", 0)
    monkeypatch.setattr(restore_pool, "RANGE", 16 << 10)
    monkeypatch.setattr(restore_pool, "WORKERS", max(2, restore_pool.WORKERS))


def build(tmp_path: Path, url: str, page_size: int = 4096, increments: int = 3) -> tuple[Replica, list]:
    """A snapshot of ~1 MB of random rows, then ``increments`` L0 files changing some of
    them; returns the replica and the database's content after each TXID."""
    db = tmp_path / "src.db"
    conn = app_db(db, page_size)
    write_rows(conn, 2000, 400)
    replica = Replica(open_storage(url))
    cap = Capture(str(db), replica)
    states = []
    cap.sync_once()
    states.append(dump(str(db)))
    for i in range(increments):
        conn.execute("UPDATE t SET v = randomblob(300) WHERE id % 7 = ?", (i,))
        write_rows(conn, 50, 400)
        cap.sync_once()
        states.append(dump(str(db)))
    cap.close()
    conn.close()
    return replica, states


def sequential_bytes(replica: Replica, out: Path, monkeypatch, **target) -> bytes:
    with monkeypatch.context() as m:
        m.setattr(restore_pool, "PARALLEL_ABOVE", 1 << 62)
        restore(replica, str(out), **target)
    return out.read_bytes()


@pytest.mark.parametrize("page_size", [4096, 1024, 65536])
def test_a_chain_restores_through_the_workers_exactly(tmp_path, storage_url, small_ranges, monkeypatch, page_size):
    replica, states = build(tmp_path, storage_url, page_size)
    out = tmp_path / "out.db"
    result = restore(replica, str(out))
    assert result.page_size == page_size and result.txid == len(states)
    assert dump(str(out)) == states[-1]
    assert out.read_bytes() == sequential_bytes(replica, tmp_path / "seq.db", monkeypatch)
    mid = tmp_path / "mid.db"
    restore(replica, str(mid), txid=2)
    assert dump(str(mid)) == states[1]


def test_a_file_above_the_real_threshold_restores_exactly(tmp_path, file_url):
    db = tmp_path / "big.db"
    conn = app_db(db)
    for _ in range(10):
        write_rows(conn, 1000, 4000)  # random blobs: the LTX file is as big as the database
    replica = Replica(open_storage(file_url))
    cap = Capture(str(db), replica)
    cap.sync_once()
    cap.close()
    conn.close()
    (snapshot,) = replica.files(0)
    assert restore_pool.worth_it(snapshot) or restore_pool.WORKERS == 1
    out = tmp_path / "out.db"
    result = restore(replica, str(out))
    assert result.pages == snapshot_pages(db)
    assert dump(str(out)) == dump(str(db))


def snapshot_pages(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("PRAGMA page_count").fetchone()[0]
    finally:
        conn.close()


def _damage(data: bytes, where: str) -> bytes:
    """Damage a big LTX file in one place: in a frame in the middle of the page block, in
    its page index or its trailer, or cut it short."""
    if where == "truncated":
        return data[: len(data) - 40]
    if where == "trailer checksum":
        at = len(data) - 1
    else:
        frames = sorted(read_page_index(data).values())
        offset = frames[len(frames) // 2][0]  # a frame in the middle: not in the first range
        at = {"lz4 data in the middle": offset + 14, "frame page number": offset + 3,
              "frame size": offset + 9, "index entry": len(data) - 40}[where]
    return data[:at] + bytes([data[at] ^ 0x41]) + data[at + 1:]


@pytest.mark.parametrize("where", ["lz4 data in the middle", "frame page number", "frame size",
                                   "index entry", "trailer checksum", "truncated"])
def test_a_damaged_big_file_is_one_clear_error_and_nothing_is_written(tmp_path, storage_url, small_ranges, where):
    replica, _ = build(tmp_path, storage_url, increments=0)
    (snapshot,) = replica.files(0)
    replace_object(replica, snapshot.key, _damage(replica.storage.read(snapshot.key), where))
    outdir = tmp_path / "out"
    outdir.mkdir()
    with pytest.raises(LTXError) as caught:
        restore(replica, str(outdir / "restored.db"))
    assert str(caught.value).startswith(f"LTX file {replica.url(snapshot)}: ")
    assert "\n" not in str(caught.value)
    assert list(outdir.iterdir()) == []


@pytest.mark.parametrize("version", ["litestream-0.5.17", "litestream-0.5.15"])
def test_litestream_files_of_both_frame_layouts_restore_through_the_workers(tmp_path, small_ranges, monkeypatch, version):
    shutil.copytree(DATA / version / "0", tmp_path / "replica" / "ltx" / "0")
    replica = Replica(open_storage(f"file://{tmp_path}/replica"))
    out = tmp_path / "out.db"
    restore(replica, str(out))
    assert out.read_bytes() == sequential_bytes(replica, tmp_path / "seq.db", monkeypatch)
    assert [len(rows) for table, rows in dump(str(out)) if table == "t"] == [25]


def test_a_litestream_written_replica_restores_through_the_workers(tmp_path, storage_url, small_ranges):
    db = tmp_path / "app.db"
    conn = app_db(db)
    write_rows(conn, 500, 1000)
    replica = Replica(open_storage(storage_url))
    with peer_replicating(tmp_path, db, storage_url) as peer:
        assert wait_for(lambda: replica.max_txid() >= 1, 30), peer.output()
        for _ in range(3):  # each after the last has reached the replica: one L0 file each
            write_rows(conn, 100, 500)
            txid = replica.max_txid()
            assert wait_for(lambda: replica.max_txid() > txid, 30), peer.output()
        peer.stop()
    conn.close()
    out = tmp_path / "out.db"
    restore(replica, str(out))
    assert dump(str(out)) == dump(str(db))


def test_a_worker_that_dies_is_one_clear_error_and_the_next_restore_starts_fresh_ones(tmp_path, file_url, small_ranges):
    replica, states = build(tmp_path, file_url, increments=0)
    pool = restore_pool.warm_up()
    pool.workers[0].proc.kill()
    pool.workers[0].proc.wait()
    outdir = tmp_path / "out"
    outdir.mkdir()
    with pytest.raises(RestoreError, match="restore worker process"):
        restore(replica, str(outdir / "restored.db"))
    assert list(outdir.iterdir()) == []
    restore(replica, str(outdir / "restored.db"))
    assert dump(str(outdir / "restored.db")) == states[-1]


@pytest.mark.parametrize("budget_files", [6, 1000])
def test_small_files_are_fetched_many_at_once_within_the_byte_budget(tmp_path, file_url, monkeypatch, budget_files):
    db = tmp_path / "src.db"
    conn = app_db(db)
    replica = Replica(open_storage(file_url))
    cap = Capture(str(db), replica)
    for _ in range(40):
        write_rows(conn, 20, 400)
        cap.sync_once()
    cap.close()
    conn.close()
    files = replica.files(0)
    budget = budget_files * max(i.size for i in files)
    monkeypatch.setattr("tenantsync.restore.PREFETCH_BYTES", budget)
    most = 0
    with ThreadPoolExecutor(PREFETCH_FILES) as pool:
        ahead = _Prefetch(replica, files, pool)
        for info in files:
            assert ahead.next() == replica.read(info)
            most = max(most, len(ahead.queued) + 1)
            assert ahead.in_flight <= budget
    assert most >= min(budget_files, PREFETCH_FILES) and most <= PREFETCH_FILES
