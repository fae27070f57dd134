"""Compacted replicas, both ways, with the real Litestream 0.5.17, on file:// and S3 (moto).

(a) tenantsync writes and compacts a replica (L1, L2, an L9 snapshot, retention with a
    ``now`` in the future); ``litestream restore`` reads it, latest and at compacted TXID
    boundaries.
(b) ``litestream replicate`` compacts a replica with second-long levels (L1, L2, L9, L0
    retention); tenantsync restores it, compacts it further (L2 from Litestream's L1 files,
    L3 from its L2 files, a snapshot), and both tools restore the result.
(c) Point-in-time restore as a property: random workloads, syncs spread over time, random
    compaction orders; every TXID and every instant between two syncs restores the state the
    source had then; after retention every point inside the window still does, and a point
    outside it fails with a RestoreError instead of returning some other state.

The peer runs without ``AWS_CA_BUNDLE`` (it refuses to start with it set).
"""

from __future__ import annotations

import random
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tenantsync.capture import Capture
from tenantsync.compactor import compact, retain, snapshot
from tenantsync.levels import Levels
from tenantsync.errors import RestoreError, TargetUnavailable
from tenantsync.replica import Replica
from tenantsync import restore as restore_module
from tenantsync.restore import plan, restore
from tenantsync.storage import open_storage

from .dbutil import app_db, dump, write_rows
from .peer import _need_litestream, integrity, listed, litestream, peer_replicating  # noqa: F401 (autouse fixture)


def litestream_restore(url: str, out: Path, *, txid: int | None = None, timestamp: datetime | None = None) -> Path:
    args = ["restore", "-o", str(out)]
    if txid is not None:
        args += ["-txid", f"{txid:016x}"]
    if timestamp is not None:
        args += ["-timestamp", timestamp.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")]
    litestream(*args, url)
    return out


# Keys from cmd/litestream/main.go (Config.Levels, Config.Snapshot, Config.L0Retention,
# Config.L0RetentionCheckInterval): L1 every second, L2 every 2 s, a snapshot every 3 s,
# L0 files dropped one second after L1 covers them.
PEER_FAST_LEVELS = {
    "levels": [{"interval": "1s"}, {"interval": "2s"}],
    "snapshot": {"interval": "3s"},
    "l0-retention": "1s",
    "l0-retention-check-interval": "1s",
}

# -- checks ----------------------------------------------------------------------------------


def assert_same(restored: Path, expected, what: str = "") -> None:
    assert integrity(restored) == "ok", what
    assert dump(str(restored)) == expected, f"{what}: restored content differs from the source's"


def rows_of_t(path) -> list:
    return next(rows for table, rows in dump(str(path)) if table == "t")


def ours(replica: Replica, out: Path, **target) -> Path:
    restore(replica, str(out), force=True, **target)
    return out


def compacted_boundaries(replica: Replica) -> set[int]:
    """Max TXIDs of the files at levels 1..9: the points a restore can reach without L0."""
    return {f.max_txid for lv, fs in replica.all_files().items() if lv > 0 for f in fs}


def uses_compacted_files(replica: Replica, **target) -> bool:
    """The restore plan starts from a compacted file (L1..L9), not from L0."""
    return plan(replica, **target)[0].level > 0


# -- (a) tenantsync compacts, litestream restores ------------------------------------------------


def _tenantsync_history(db: Path, replica: Replica):
    """Passes of app writes with our compactions interleaved: L1 every third pass, L2 every
    second L1, a snapshot in the middle and one near the end, a few passes after it."""
    conn = app_db(db)
    cap = Capture(str(db), replica, checkpoint_pages=16)
    states: dict[int, list] = {}

    def ship(result):
        if result.txid is not None:
            states[result.txid] = dump(str(db))

    try:
        write_rows(conn, 40, 300)
        ship(cap.sync_once())
        for i in range(1, 25):
            write_rows(conn, 4 + i % 5, 300)
            if i % 4 == 0:
                write_rows(conn, 2, 6000)  # overflow pages
                conn.execute("UPDATE t SET v = randomblob(120) WHERE id % 5 = 0")
            if i == 13:
                conn.execute("DELETE FROM t WHERE id % 4 = 1")
                conn.execute("VACUUM")  # the database shrinks: commit goes down
            ship(cap.sync_once())
            if i % 3 == 0:
                assert compact(replica, 1, force=True) is not None
            if i % 6 == 0:
                compact(replica, 2, force=True)
            if i in (12, 21):
                assert snapshot(replica, force=True) is not None
            time.sleep(0.004)
        ship(cap.release())
    finally:
        cap.close()
        conn.close()
    assert sorted(states) == list(range(1, max(states) + 1))
    return states


def test_litestream_restores_a_replica_tenantsync_compacted(tmp_path, storage_url):
    db = tmp_path / "app.db"
    replica = Replica(open_storage(storage_url))
    states = _tenantsync_history(db, replica)
    last = max(states)
    levels = listed(replica)
    assert levels.get(1) and levels.get(2) and len(levels.get(9, ())) == 2, levels

    def both_restore(what: str, txid: int | None = None) -> None:
        expected = states[txid or last]
        theirs = litestream_restore(storage_url, tmp_path / f"theirs-{what}-{txid}.db", txid=txid)
        assert_same(theirs, expected, f"litestream restore {what} txid={txid} of {listed(replica)}")
        mine = ours(replica, tmp_path / f"ours-{what}-{txid}.db", txid=txid)
        assert_same(mine, expected, f"tenantsync restore {what} txid={txid}")
        assert mine.read_bytes() == theirs.read_bytes(), f"{what} txid={txid}: the two tools' restores differ"

    both_restore("compacted")
    for txid in sorted(compacted_boundaries(replica)):
        both_restore("compacted", txid)

    # Retention ten minutes from now: every L0 file covered by L1 goes (the newest stays).
    deleted = retain(replica, Levels(), now=datetime.now(timezone.utc) + timedelta(minutes=10))
    assert any(i.level == 0 for i in deleted)
    assert uses_compacted_files(replica), f"latest restore still reads L0 only: {listed(replica)}"
    both_restore("retained")
    for txid in sorted(compacted_boundaries(replica)):
        if txid >= replica.files(9)[0].max_txid:  # what retention must keep (see test (c))
            both_restore("retained", txid)

    # A day later the first snapshot has expired: only the newest snapshot's chain remains.
    newest_snapshot = replica.files(9)[-1].max_txid
    retain(replica, Levels(), now=datetime.now(timezone.utc) + timedelta(hours=25))
    assert [f.max_txid for f in replica.files(9)] == [newest_snapshot]
    both_restore("expired")
    for txid in sorted(compacted_boundaries(replica)):
        if txid >= replica.files(9)[0].max_txid:
            both_restore("expired", txid)


# -- (b) litestream compacts, tenantsync restores and compacts further --------------------------------


def test_tenantsync_restores_and_continues_a_replica_litestream_compacted(tmp_path, storage_url):
    db = tmp_path / "app.db"
    conn = app_db(db)
    write_rows(conn, 50, 300)
    replica = Replica(open_storage(storage_url))
    states: dict[int, list] = {}

    def compacted_and_pruned() -> bool:
        files = replica.all_files()
        return bool(
            [f for f in files[9] if f.max_txid > 1] and len(files[1]) >= 2 and files[2]
            and files[0] and files[0][0].min_txid > 1
            and files[1][-1].max_txid > files[2][-1].max_txid  # L1 files L2 has not taken yet
        )

    with peer_replicating(tmp_path, db, storage_url, **PEER_FAST_LEVELS) as peer:
        deadline = time.monotonic() + 40
        while True:
            # One commit, then wait for its L0 so every TXID's state is known.
            peer.check_alive()
            before = replica.max_txid()
            write_rows(conn, 10, 300)
            while replica.max_txid() == before and time.monotonic() < deadline:
                time.sleep(0.02)
            # Table t only: litestream's own tables change at its checkpoints, in TXIDs of its own.
            states[replica.max_txid()] = rows_of_t(db)
            if compacted_and_pruned() or time.monotonic() > deadline:
                break
        assert compacted_and_pruned(), f"litestream did not compact and prune within 40 s: {listed(replica)}"
        peer.stop()
    expected = dump(str(db))
    theirs_max = replica.max_txid()
    states[theirs_max] = rows_of_t(db)
    # Each state above sits under the TXID the replica had reached after its commit, but
    # Litestream also ships TXIDs of its own (its tables, at its checkpoints), and one of them
    # can land just before our commit's: the state then sits one TXID too early. So at the
    # points checked below, Litestream's restore of its own replica, before tenantsync touches
    # it, is the oracle.
    for txid in sorted(set(states) & compacted_boundaries(replica)):
        states[txid] = rows_of_t(litestream_restore(storage_url, tmp_path / f"peer-{txid}.db", txid=txid))

    # tenantsync restores Litestream's compacted replica: latest and at its L1/L2/L9 boundaries.
    assert uses_compacted_files(replica), listed(replica)
    assert_same(ours(replica, tmp_path / "latest.db"), expected, "tenantsync restore of litestream's replica")
    checked = 0
    for txid in sorted(compacted_boundaries(replica)):
        if txid in states:
            out = ours(replica, tmp_path / f"at-{txid}.db", txid=txid)
            assert integrity(out) == "ok" and rows_of_t(out) == states[txid], f"txid {txid}"
            checked += 1
    assert checked >= 2, f"no compacted boundary of litestream's had a known state: {listed(replica)} {sorted(states)}"

    # tenantsync compacts Litestream's files: L2 from its L1 files, L3 from its L2 files.
    # (Litestream's L2 tick may have taken its pending L1 files between the check and the stop.)
    l1_pending = [f for f in replica.files(1) if f.min_txid > replica.files(2)[-1].max_txid]
    l2 = compact(replica, 2, force=True)
    if l1_pending:
        assert l2 is not None and l2.max_txid == l1_pending[-1].max_txid, (l2, listed(replica))
    l3 = compact(replica, 3, force=True)
    assert l3 is not None and l3.min_txid == replica.files(2)[0].min_txid, (l3, listed(replica))
    for txid in sorted({f.max_txid for f in replica.files(2) + replica.files(3)} & set(states)):
        out = ours(replica, tmp_path / f"l23-ours-{txid}.db", txid=txid)
        assert integrity(out) == "ok" and rows_of_t(out) == states[txid], f"ours {txid}"
        theirs = litestream_restore(storage_url, tmp_path / f"l23-theirs-{txid}.db", txid=txid)
        assert integrity(theirs) == "ok" and rows_of_t(theirs) == states[txid], (
            f"litestream restore -txid {txid:x} after tenantsync's L2/L3")

    # tenantsync continues the replica: capture, L1, L2, L3, snapshot, retention.
    cap = Capture(str(db), replica, checkpoint_pages=16)
    try:
        for i in range(8):
            write_rows(conn, 5 + i, 300)
            result = cap.sync_once()
            assert result.txid is not None
            states[result.txid] = rows_of_t(db)
            if i % 3 == 2:
                compact(replica, 1, force=True)
            time.sleep(0.004)
        result = cap.release()
        if result.txid is not None:
            states[result.txid] = rows_of_t(db)
    finally:
        cap.close()
    conn.close()
    expected = dump(str(db))
    for level in (1, 2, 3):
        assert compact(replica, level, force=True) is not None, f"level {level}: {listed(replica)}"
    snap = snapshot(replica, force=True)
    assert snap is not None and snap.max_txid == replica.max_txid()
    retain(replica, Levels(), now=datetime.now(timezone.utc) + timedelta(minutes=10))
    assert uses_compacted_files(replica), listed(replica)

    mine = ours(replica, tmp_path / "final-ours.db")
    assert_same(mine, expected, "tenantsync restore after both tools compacted")
    theirs = litestream_restore(storage_url, tmp_path / "final-theirs.db")
    assert_same(theirs, expected, f"litestream restore after both tools compacted: {listed(replica)}")
    assert mine.read_bytes() == theirs.read_bytes()
    for txid in sorted({f.max_txid for f in replica.files(3)} & set(states)):
        out = litestream_restore(storage_url, tmp_path / f"final-theirs-{txid}.db", txid=txid)
        assert integrity(out) == "ok" and rows_of_t(out) == states[txid], (
            f"litestream -txid at tenantsync's L3 boundary {txid:x}")


# -- (c) point-in-time restore through random compactions -----------------------------------------------


class History:
    """A random workload replicated by Capture, with the state and LTX time of every TXID."""

    def __init__(self, db: Path, replica: Replica, rng: random.Random):
        self.db, self.replica, self.rng = db, replica, rng
        self.states: dict[int, list] = {}
        self.times: dict[int, datetime] = {}
        self.ops: list[str] = []  # the compaction sequence, for failure messages

    def run(self, passes: int, compact_every: float = 0.35, schedule: dict[int, tuple[int, ...]] | None = None,
            pause: tuple[float, float] = (0.003, 0.009)) -> None:
        """``schedule`` maps a pass to the levels compacted after it (instead of random ones);
        ``pause`` is the range of the random sleep after each pass."""
        schedule = schedule or {}
        rng, db = self.rng, self.db
        conn = app_db(db)
        cap = Capture(str(db), self.replica, checkpoint_pages=rng.choice([8, 32, 1000]))
        try:
            write_rows(conn, rng.randint(10, 60), 200)
            self._ship(cap.sync_once())
            for i in range(1, passes):
                for _ in range(rng.randint(1, 3)):  # transactions in this pass
                    self._mutate(conn)
                r = rng.random()
                if r < 0.1:
                    self._ship(cap.checkpoint(truncate=rng.random() < 0.5))
                elif r < 0.15:
                    self._ship(cap.release())
                    cap = Capture(str(db), self.replica, checkpoint_pages=rng.choice([8, 32, 1000]))
                else:
                    self._ship(cap.sync_once())
                if i in schedule:
                    for level in schedule[i]:
                        self.compact(level)
                elif rng.random() < compact_every:
                    self.compact(rng.choice([1, 1, 1, 2, 2, 3, 9]))
                time.sleep(rng.uniform(*pause))  # distinct LTX timestamps (ms)
            self._ship(cap.release())
        finally:
            cap.close()
            conn.close()
        assert sorted(self.states) == list(range(1, max(self.states) + 1))
        for info in self.replica.files(0):
            if info.min_txid not in self.times:
                self.times[info.min_txid] = datetime.fromtimestamp(
                    self.replica.read_header(info).timestamp / 1000, timezone.utc)

    def _mutate(self, conn) -> None:
        rng = self.rng
        conn.execute("BEGIN")
        kind = rng.random()
        if kind < 0.5:
            conn.executemany("INSERT INTO t(v) VALUES (randomblob(?))",
                             [(rng.choice([50, 300, 900, 5000]),) for _ in range(rng.randint(1, 20))])
        elif kind < 0.8:
            conn.execute("UPDATE t SET v = randomblob(?) WHERE id % ? = ?",
                         (rng.randint(10, 600), rng.randint(2, 9), rng.randint(0, 1)))
        else:
            conn.execute("DELETE FROM t WHERE id % ? = 0", (rng.randint(3, 11),))
        conn.execute("COMMIT")
        if rng.random() < 0.05:
            conn.execute("VACUUM")

    def _ship(self, result) -> None:
        if result.txid is not None:
            assert result.txid not in self.states
            self.states[result.txid] = dump(str(self.db))

    def compact(self, level: int):
        info = snapshot(self.replica, force=True) if level == 9 else compact(self.replica, level, force=True)
        self.ops.append(f"L{level}:{info.min_txid}-{info.max_txid}" if info else f"L{level}:-")
        return info

    @property
    def last(self) -> int:
        return max(self.states)

    def state_at(self, t: datetime) -> int:
        """The TXID current at ``t``: the newest whose LTX timestamp is strictly before it."""
        return max((x for x, ts in self.times.items() if ts < t), default=0)

    def instants(self, k: int, after: datetime | None = None) -> list[datetime]:
        """``k`` random instants half-way between two consecutive syncs (never on one)."""
        ordered = sorted(self.times.items())
        gaps = [(a[1], b[1]) for a, b in zip(ordered, ordered[1:]) if b[1] > a[1] and (after is None or a[1] >= after)]
        picks = self.rng.sample(gaps, min(k, len(gaps)))
        return [a + (b - a) / 2 for a, b in picks]

    def describe(self) -> str:
        return f"compactions: {' '.join(self.ops)}\nfiles: {listed(self.replica)}"


def _history(tmp_path, url, seed: int, passes: int, **kw) -> History:
    h = History(tmp_path / "app.db", Replica(open_storage(url)), random.Random(seed))
    h.run(passes, **kw)
    return h


PITR_CASES = [("file", s) for s in (11, 12, 13, 14)] + [("s3", s) for s in (21,)]


@pytest.mark.parametrize("backend, seed", PITR_CASES, ids=[f"{b}-{s}" for b, s in PITR_CASES])
def test_point_in_time_restore_through_random_compactions(tmp_path, request, backend, seed):
    url = request.getfixturevalue(f"{backend}_url")
    h = _history(tmp_path, url, seed, passes=26)
    for level in h.rng.sample([1, 2, 3, 9, 1, 2], 6):  # and once more in a random order
        h.compact(level)
    replica, out = h.replica, tmp_path / "out.db"

    for txid in sorted(h.rng.sample(sorted(h.states), min(14, h.last))) + [h.last]:
        result = restore(replica, str(out), txid=txid, force=True)
        assert result.txid == txid
        assert dump(str(out)) == h.states[txid], f"seed {seed}: txid {txid}\n{h.describe()}"
    for t in h.instants(12):
        want = h.state_at(t)
        result = restore(replica, str(out), timestamp=t, force=True)
        assert (result.txid, dump(str(out)) == h.states[want]) == (want, True), (
            f"seed {seed}: restore at {t.isoformat()} gave txid {result.txid}, the source was at {want}\n"
            f"{h.describe()}")
    before_first = h.times[1] - timedelta(milliseconds=5)
    with pytest.raises(TargetUnavailable, match="no restorable state before"):
        restore(replica, str(tmp_path / "never.db"), timestamp=before_first)
    assert not (tmp_path / "never.db").exists()

    # The peer reads the same compacted history at a few TXIDs and, on file://, instants.
    for txid in h.rng.sample(sorted(h.states), 2):
        assert_same(litestream_restore(url, tmp_path / f"ls-{txid}.db", txid=txid), h.states[txid],
                    f"litestream -txid {txid:x}\n{h.describe()}")
    if backend == "file":
        t = h.instants(1)[0]
        assert_same(litestream_restore(url, tmp_path / "ls-t.db", timestamp=t), h.states[h.state_at(t)],
                    f"litestream -timestamp {t.isoformat()}\n{h.describe()}")


def _window_check(h: History, tmp_path: Path, cutoff: datetime, seed: int) -> None:
    """After retention: exact inside the window, RestoreError (never another state) outside."""
    replica, out = h.replica, tmp_path / "out.db"
    inside = [x for x in h.states if x >= h.state_at(cutoff)]  # current at some instant >= cutoff
    for txid in sorted(inside):
        try:
            result = restore(replica, str(out), txid=txid, force=True)
        except RestoreError as e:
            pytest.fail(f"seed {seed}: txid {txid} was current inside the retention window (from "
                        f"{cutoff.isoformat()}) but cannot be restored: {e}\n{h.describe()}")
        assert dump(str(out)) == h.states[txid] and result.txid == txid
    for t in h.instants(15, after=cutoff):
        want = h.state_at(t)
        result = restore(replica, str(out), timestamp=t, force=True)
        assert result.txid == want, (
            f"seed {seed}: restore at {t.isoformat()} (inside the window) gave the state of txid "
            f"{result.txid}, the source was at txid {want} then\n{h.describe()}")
        assert dump(str(out)) == h.states[want]


@pytest.mark.parametrize("seed", [31, 32, 33])
def test_point_in_time_restore_after_retention(tmp_path, file_url, seed):
    """A window that starts mid-history: the snapshot before it is kept, older history goes.

    ``l0_retention`` equals ``retention``, so the whole window keeps L0 granularity."""
    h = _history(tmp_path, file_url, seed, passes=30, compact_every=0.3, schedule={8: (9,), 18: (9,)})
    for level in (1, 2, 9):
        h.compact(level)
    # The window starts three syncs after the scheduled second snapshot; the newest snapshot
    # older than that is where a restore to the window's first instant starts.
    second = [s for s in h.replica.files(9) if s.max_txid <= h.last - 6][-1]
    cutoff = h.times[second.max_txid + 3] + timedelta(microseconds=500)
    kept = [s for s in h.replica.files(9) if h.times[s.max_txid] < cutoff][-1]
    now = datetime.now(timezone.utc) + timedelta(minutes=10)
    window = now - cutoff
    retain(h.replica, Levels(retention=window, l0_retention=window), now=now)
    assert h.replica.files(9)[0].max_txid == kept.max_txid, f"seed {seed}: {h.describe()}"

    _window_check(h, tmp_path, cutoff, seed)

    # Outside the window: older than the snapshot retention kept. Each target either restores
    # exactly (a file boundary that happens to survive) or fails with a RestoreError that
    # names it; never a database from another moment.
    replica, out = h.replica, tmp_path / "old.db"
    for txid in range(1, kept.max_txid):
        try:
            result = restore(replica, str(out), txid=txid, force=True)
        except TargetUnavailable as e:
            assert f"{txid:016x}" in str(e) and str(replica) in str(e), str(e)
            continue
        assert result.txid == txid and dump(str(out)) == h.states[txid]
    outside = [t for t in h.instants(40) if t < h.times[kept.max_txid]]
    for t in outside:
        try:
            result = restore(replica, str(out), timestamp=t, force=True)
        except TargetUnavailable as e:
            assert "before" in str(e) and t.isoformat()[:19] in str(e), str(e)
            continue
        assert result.txid == h.state_at(t), (
            f"seed {seed}: restore at {t.isoformat()} (before the retention window) returned the "
            f"state of txid {result.txid} instead of failing; the source was at txid "
            f"{h.state_at(t)} then\n{h.describe()}")
    with pytest.raises(TargetUnavailable):
        restore(replica, str(tmp_path / "gone.db"), txid=1)
    assert not (tmp_path / "gone.db").exists()


SECOND_CASES = [("file", 51), ("file", 52), ("s3", 53)]


@pytest.mark.parametrize("backend, seed", SECOND_CASES, ids=[f"{b}-{s}" for b, s in SECOND_CASES])
def test_restore_to_any_second_after_the_l0_files_expired(tmp_path, request, monkeypatch, backend, seed):
    """Default levels with every L0 file past its retention: the per-second restore points
    (level 8) keep every second of the window restorable exactly, and any instant restores
    a state the source had between the start of its second and the instant itself.

    On S3 the listing's upload times of compacted and level-8 files are taken as "long
    after the target" (no slack), as they are when retention runs minutes later."""
    monkeypatch.setattr(restore_module, "UPLOAD_SLACK", timedelta(0))
    url = request.getfixturevalue(f"{backend}_url")
    h = _history(tmp_path, url, seed, passes=45, compact_every=0.25, pause=(0.02, 0.13))
    h.compact(1)
    replica, out = h.replica, tmp_path / "out.db"
    retain(replica, Levels(l0_retention=timedelta(0)), now=datetime.now(timezone.utc) + timedelta(seconds=1))
    files = replica.all_files()
    assert len(files[0]) == 1 and files[8], f"seed {seed}: L0 not replaced by level 8\n{h.describe()}"
    # Each level-8 file holds one second and ends no compacted file inside it.
    ends = {f.max_txid for level in (1, 2, 3, 9) for f in files[level]}
    for f in files[8]:
        seconds = {int(h.times[x].timestamp()) for x in range(f.min_txid, f.max_txid + 1)}
        assert len(seconds) == 1, f"seed {seed}: {f.name} spans seconds {sorted(seconds)}"
        assert not ends & set(range(f.min_txid, f.max_txid)), f"{f.name} crosses a compacted file's end"

    first, last = h.times[1], h.times[h.last]
    seconds = [datetime.fromtimestamp(s, timezone.utc)
               for s in range(int(first.timestamp()) + 1, int(last.timestamp()) + 2)]
    assert len(seconds) >= 2, "the history should span seconds"
    for t in seconds:
        want = h.state_at(t)
        result = restore(replica, str(out), timestamp=t, force=True)
        assert result.txid == want and dump(str(out)) == h.states[want], (
            f"seed {seed}: restore at {t.isoformat()} gave txid {result.txid}, the source was at {want}\n"
            f"{h.describe()}")
        assert result.timestamp == h.times[want] < t  # the time of the state it restored
    for t in h.instants(15):
        start = t.replace(microsecond=0)
        try:
            result = restore(replica, str(out), timestamp=t, force=True)
        except TargetUnavailable as e:  # only if the database did not exist when this second began
            assert h.state_at(start) == 0 and "no restorable state before" in str(e), str(e)
            continue
        assert h.state_at(start) <= result.txid <= h.state_at(t), (
            f"seed {seed}: restore at {t.isoformat()} gave txid {result.txid}, outside "
            f"{h.state_at(start)}..{h.state_at(t)} (the source between {start.isoformat()} and then)\n{h.describe()}")
        assert dump(str(out)) == h.states[result.txid]
    t = seconds[len(seconds) // 2]  # the peer reads level 8 too (on S3 by its timestamp metadata)
    assert_same(litestream_restore(url, tmp_path / "ls-s.db", timestamp=t), h.states[h.state_at(t)],
                f"litestream -timestamp {t.isoformat()}\n{h.describe()}")
    # A second run has nothing left to keep or delete.
    assert retain(replica, Levels(l0_retention=timedelta(0)), now=datetime.now(timezone.utc)) == []
    assert replica.all_files() == files


def test_retention_keeps_compacted_history_when_no_snapshot_has_expired(tmp_path, file_url):
    """Default levels, ``now`` ten minutes on: the whole history is inside the 24 h window.

    L0 files covered by L1 go (that is the L0 retention), so a point inside the window is
    restorable at the granularity of the compacted files: every L1 boundary must survive,
    as Litestream keeps them (it deletes below a snapshot only once an older one expired)."""
    # L1 every 4 passes, L2 every 8, then a snapshot at the end.
    schedule = {i: (1, 2) if i % 8 == 0 else (1,) for i in range(4, 24, 4)}
    h = _history(tmp_path, file_url, 41, passes=24, compact_every=0.0, schedule=schedule)
    replica = h.replica
    h.compact(1)
    boundaries_before = sorted(compacted_boundaries(replica))
    h.compact(9)
    retain(replica, Levels(), now=datetime.now(timezone.utc) + timedelta(minutes=10))
    missing = []
    for txid in boundaries_before:
        try:
            restore(replica, str(tmp_path / "b.db"), txid=txid, force=True)
        except RestoreError as e:
            missing.append((txid, str(e)))
            continue
        assert dump(str(tmp_path / "b.db")) == h.states[txid]
    assert not missing, (
        "retention with no expired snapshot deleted history inside the 24 h window "
        f"(these L1 boundaries no longer restore): {missing}\n{h.describe()}")


def test_compaction_continues_after_retention(tmp_path, file_url):
    """Retention must not leave a level unable to compact: L2 picks up after L1 files it
    never merged were deleted below a snapshot."""
    replica = Replica(open_storage(file_url))
    db = tmp_path / "a.db"
    conn = app_db(db)
    cap = Capture(str(db), replica)
    try:
        def passes(n):
            for _ in range(n):
                write_rows(conn, 3)
                cap.sync_once()
                time.sleep(0.003)

        passes(4)
        compact(replica, 1, force=True)
        compact(replica, 2, force=True)        # L2 up to 4
        passes(4)
        compact(replica, 1, force=True)        # L1 5-8: L2 never merges it
        passes(4)
        compact(replica, 1, force=True)        # L1 9-12
        snapshot(replica, force=True)          # L9 1-12
        retain(replica, Levels(), now=datetime.now(timezone.utc) + timedelta(minutes=10))
        passes(4)
        compact(replica, 1, force=True)
        l2 = compact(replica, 2, force=True)
        l3 = compact(replica, 3, force=True)
    finally:
        cap.close()
        conn.close()
    newest = replica.max_txid()
    assert l2 is not None and replica.files(2)[-1].max_txid == newest, (
        f"level 2 is stuck at {replica.files(2)[-1].max_txid:x} (newest {newest:x}): {listed(replica)}")
    assert l3 is not None and replica.files(3)[-1].max_txid == newest, listed(replica)


def test_snapshot_over_a_chain_with_overlapping_levels(tmp_path, storage_url):
    """The restore chain after a snapshot may continue with a higher-level file that starts
    before the snapshot's end (it reaches furthest); a new snapshot merges that chain."""
    replica = Replica(open_storage(storage_url))
    db = tmp_path / "a.db"
    conn = app_db(db)
    cap = Capture(str(db), replica)
    try:
        def passes(n):
            for _ in range(n):
                write_rows(conn, 3)
                cap.sync_once()
                time.sleep(0.003)

        passes(12)
        compact(replica, 1, force=True)
        compact(replica, 2, force=True)      # L2 1-12
        passes(4)
        compact(replica, 1, force=True)      # L1 13-16
        passes(2)
        snapshot(replica, force=True)        # L9 1-18
        passes(2)
        compact(replica, 1, force=True)      # L1 17-20
        compact(replica, 2, force=True)      # L2 13-20: overlaps the snapshot
        passes(1)
        chain = [(i.level, i.min_txid, i.max_txid) for i in plan(replica)]
        assert chain == [(9, 1, 18), (2, 13, 20), (0, 21, 21)], chain
        snap = snapshot(replica, force=True)
    finally:
        cap.close()
        conn.close()
    expected = dump(str(db))
    assert snap is not None and (snap.min_txid, snap.max_txid) == (1, 21)
    assert_same(ours(replica, tmp_path / "out.db"), expected)
    assert_same(litestream_restore(storage_url, tmp_path / "ls.db"), expected)
