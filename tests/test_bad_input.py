"""Bad input through the real command line: damaged replicas, impossible targets, wrong
paths, unreachable storage, torn WALs, malformed arguments.

Every failure must be exactly one line on stderr that names the object or path at
fault, a non-zero exit status, no traceback, and nothing left behind: no output file,
no temporary file in the output directory, nothing written to a replica.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from tenantsync import layout
from tenantsync.capture import Capture
from tenantsync.ltx import HEADER_SIZE
from tenantsync.replica import Replica
from tenantsync.storage import open_storage
from tenantsync.wal import FRAME_HEADER_SIZE

from .dbutil import app_db, dump, write_rows

ROOT = Path(__file__).resolve().parents[1]
UNREACHABLE_S3 = "s3://b/p?endpoint=http://127.0.0.1:1&forcePathStyle=true&region=us-east-1"


# -- running the CLI ---------------------------------------------------------------------


def _env() -> dict:
    env = dict(os.environ)  # carries the fake AWS credentials of the aws_env fixture
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.pop("PYTHONWARNINGS", None)
    return env


def tenantsync(*args, cwd, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m tenantsync ARGS`` in ``cwd``; ``env`` adds variables (TENANTSYNC_… overrides)."""
    return subprocess.run(
        [sys.executable, "-m", "tenantsync", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env() | (env or {}),
        cwd=cwd,
    )


def one_line_error(proc: subprocess.CompletedProcess, *names: str | tuple, code: int | None = None) -> str:
    """Assert the failure contract and return the line. A tuple in ``names`` means any of."""
    err = proc.stderr
    assert "Traceback" not in err, f"traceback on stderr:\n{err}"
    assert proc.returncode != 0, f"exit status 0 for a failure; stdout={proc.stdout!r} stderr={err!r}"
    if code is not None:
        assert proc.returncode == code, f"exit status {proc.returncode}, expected {code}: {err!r}"
    lines = err.splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n{err}"
    line = lines[0]
    for name in names:
        alternatives = name if isinstance(name, tuple) else (name,)
        assert any(a in line for a in alternatives), f"stderr does not name {alternatives}: {line!r}"
    return line


def where(replica: Replica) -> tuple:
    """How a message may name a replica: its URL as printed, or its plain path/bucket."""
    storage = replica.storage
    if storage.kind == "file":
        return (str(storage), storage.root)
    return (str(storage), f"s3://{storage.bucket}/{storage.prefix}")


# -- replicas to damage ------------------------------------------------------------------


def build_replica(workdir: Path, url: str, txids: int = 4) -> tuple[Replica, dict]:
    """A replica holding L0 files 1..txids (1 is the snapshot) and each TXID's content."""
    db = workdir / "source.db"
    conn = app_db(db)
    replica = Replica(open_storage(url))
    cap = Capture(str(db), replica)
    states = {}
    write_rows(conn, 30, size=300)
    for i in range(txids):
        if i:
            write_rows(conn, 5 + i, size=300)
        result = cap.sync_once()
        assert result.txid == i + 1
        states[result.txid] = dump(str(db))
    cap.close()
    conn.close()
    assert [f.max_txid for f in replica.files(0)] == list(range(1, txids + 1))
    return replica, states


def object_names(replica: Replica, key: str) -> tuple:
    """How a message may name one object: its path or file URL, or its s3://bucket/key URL
    (the form ``ltx dump`` takes; query parameters may follow, not precede, the key)."""
    storage = replica.storage
    if storage.kind == "file":
        path = os.path.join(storage.root, *key.split("/"))
        return (path, "file://" + urllib.parse.quote(path))
    return (f"s3://{storage.bucket}/{storage.prefix}/{key}",)


def l0_key(replica: Replica, txid: int) -> str:
    return layout.ltx_key(replica.storage.kind, 0, txid, txid)


def replace_object(replica: Replica, key: str, data: bytes) -> None:
    """Damage an object the way each backend gets damaged: a file in place, an S3 object by a new PUT."""
    storage = replica.storage
    if storage.kind == "file":
        path = os.path.join(storage.root, *key.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    else:
        storage.delete([key])
        storage.write_if_absent(key, data)


def object_ref(replica: Replica, key: str) -> str:
    """What ``ltx dump`` takes for one object: a path, or the object's URL."""
    storage = replica.storage
    if storage.kind == "file":
        return os.path.join(storage.root, *key.split("/"))
    base, _, query = str(storage).partition("?")
    return f"{base}/{key}?{query}"


@pytest.fixture
def outdir(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def restore_args(replica: Replica, out: Path, *extra) -> list:
    return ["restore", "--replica", str(replica.storage), "-o", out, *extra]


def assert_nothing_in(directory: Path) -> None:
    assert sorted(os.listdir(directory)) == [], f"left behind in {directory}: {os.listdir(directory)}"


def assert_restores(tmp_path, replica: Replica, txid: int, expected) -> None:
    """Positive control: a target that does not need the damaged object still restores."""
    out = tmp_path / f"control-{txid}.db"
    proc = tenantsync(*restore_args(replica, out, "--txid", txid), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert dump(str(out)) == expected


# -- (a) (b) (c) damaged or foreign LTX objects -----------------------------------------------


def test_a_truncated_ltx_object_is_named_and_nothing_is_written(tmp_path, storage_url, outdir):
    replica, states = build_replica(tmp_path, storage_url)
    key = l0_key(replica, 2)
    data = replica.storage.read(key)
    replace_object(replica, key, data[: len(data) // 2])
    out = outdir / "restored.db"
    proc = tenantsync(*restore_args(replica, out), cwd=tmp_path)
    one_line_error(proc, object_names(replica, key))
    assert_nothing_in(outdir)
    assert_restores(tmp_path, replica, 1, states[1])


def test_a_truncated_ltx_object_leaves_an_existing_output_alone_even_with_force(tmp_path, file_url, outdir):
    replica, _ = build_replica(tmp_path, file_url)
    key = l0_key(replica, 2)
    data = replica.storage.read(key)
    replace_object(replica, key, data[: len(data) // 2])
    out = outdir / "restored.db"
    out.write_bytes(b"the previous restore")
    proc = tenantsync(*restore_args(replica, out, "--force"), cwd=tmp_path)
    one_line_error(proc, object_names(replica, key))
    assert out.read_bytes() == b"the previous restore"
    assert sorted(os.listdir(outdir)) == ["restored.db"]


@pytest.mark.parametrize("cut", ["empty", "inside header", "header only", "half", "inside trailer"])
def test_a_truncated_ltx_object_at_any_length(tmp_path, file_url, outdir, cut):
    replica, _ = build_replica(tmp_path, file_url)
    key = l0_key(replica, 2)
    data = replica.storage.read(key)
    keep = {
        "empty": 0,
        "inside header": HEADER_SIZE // 2,
        "header only": HEADER_SIZE,
        "half": len(data) // 2,
        "inside trailer": len(data) - 5,
    }[cut]
    replace_object(replica, key, data[:keep])
    proc = tenantsync(*restore_args(replica, outdir / "restored.db"), cwd=tmp_path)
    one_line_error(proc, object_names(replica, key))
    assert_nothing_in(outdir)


def _flip_in_page_data(data: bytes, where: str = "page data") -> bytes:
    """Flip one byte: by default in the middle of the first page frame's compressed data."""
    # A page frame: u32 pgno, u16 flags, u32 size, then ``size`` bytes of LZ4 block.
    size = int.from_bytes(data[HEADER_SIZE + 6 : HEADER_SIZE + 10], "big")
    assert 0 < size < len(data)
    at = {
        "page data": HEADER_SIZE + 10 + size // 2,
        "last page data": len(data) - 16 - 200,  # before the index, trailer: in the last page
        "header timestamp": 32,
        "trailer checksum": len(data) - 1,
    }[where]
    return data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1 :]


def test_b_bit_flipped_ltx_object_is_named_and_nothing_is_written(tmp_path, storage_url, outdir):
    replica, states = build_replica(tmp_path, storage_url)
    key = l0_key(replica, 2)
    replace_object(replica, key, _flip_in_page_data(replica.storage.read(key)))
    proc = tenantsync(*restore_args(replica, outdir / "restored.db"), cwd=tmp_path)
    one_line_error(proc, object_names(replica, key))
    assert_nothing_in(outdir)
    assert_restores(tmp_path, replica, 1, states[1])


@pytest.mark.parametrize("where", ["last page data", "header timestamp", "trailer checksum"])
def test_b_bit_flip_anywhere_in_the_object_is_caught(tmp_path, file_url, outdir, where):
    replica, _ = build_replica(tmp_path, file_url)
    key = l0_key(replica, 2)
    replace_object(replica, key, _flip_in_page_data(replica.storage.read(key), where))
    proc = tenantsync(*restore_args(replica, outdir / "restored.db"), cwd=tmp_path)
    one_line_error(proc, object_names(replica, key))
    assert_nothing_in(outdir)


def test_b_bit_flipped_snapshot_is_named(tmp_path, file_url, outdir):
    replica, _ = build_replica(tmp_path, file_url)
    key = l0_key(replica, 1)
    replace_object(replica, key, _flip_in_page_data(replica.storage.read(key)))
    proc = tenantsync(*restore_args(replica, outdir / "restored.db", "--txid", 1), cwd=tmp_path)
    one_line_error(proc, object_names(replica, key))
    assert_nothing_in(outdir)


@pytest.mark.parametrize("damage", ["truncated", "bit-flipped"])
def test_ltx_dump_of_a_damaged_object_is_one_line_naming_it(tmp_path, storage_url, damage):
    replica, _ = build_replica(tmp_path, storage_url, txids=2)
    key = l0_key(replica, 2)
    data = replica.storage.read(key)
    data = data[: len(data) // 2] if damage == "truncated" else _flip_in_page_data(data)
    replace_object(replica, key, data)
    proc = tenantsync("ltx", "dump", object_ref(replica, key), cwd=tmp_path)
    one_line_error(proc, object_names(replica, key))


def test_c_foreign_object_named_like_an_ltx_file(tmp_path, storage_url, outdir):
    replica, states = build_replica(tmp_path, storage_url, txids=2)
    key = l0_key(replica, 3)
    replace_object(replica, key, os.urandom(1000))
    proc = tenantsync(*restore_args(replica, outdir / "restored.db"), cwd=tmp_path)
    one_line_error(proc, object_names(replica, key))
    assert_nothing_in(outdir)
    assert_restores(tmp_path, replica, 2, states[2])


def test_c_valid_ltx_object_under_another_txids_name(tmp_path, storage_url, outdir):
    """A well-formed LTX file whose header TXIDs (3-3) disagree with its name (2-2): applying
    it as TXID 2 would restore TXID 3's content and call it TXID 2."""
    replica, states = build_replica(tmp_path, storage_url)
    key = l0_key(replica, 2)
    replace_object(replica, key, replica.storage.read(l0_key(replica, 3)))
    out = outdir / "restored.db"
    proc = tenantsync(*restore_args(replica, out, "--txid", 2), cwd=tmp_path)
    if proc.returncode == 0:
        wrong = "TXID 3's" if dump(str(out)) == states[3] else "some other"
        pytest.fail(f"restore --txid 2 succeeded with {wrong} content from a misnamed object: {proc.stdout!r}")
    one_line_error(proc, object_names(replica, key))
    assert_nothing_in(outdir)


# -- (d) (e) (f) targets the replica cannot reach ---------------------------------------------


def test_d_gap_in_txids(tmp_path, storage_url, outdir):
    replica, states = build_replica(tmp_path, storage_url)
    replica.storage.delete([l0_key(replica, 2)])
    for extra in ([], ["--txid", 3]):
        proc = tenantsync(*restore_args(replica, outdir / "restored.db", *extra), cwd=tmp_path)
        one_line_error(proc, where(replica))
        assert_nothing_in(outdir)
    assert_restores(tmp_path, replica, 1, states[1])


def test_e_txid_beyond_the_newest(tmp_path, storage_url, outdir):
    replica, _ = build_replica(tmp_path, storage_url)
    proc = tenantsync(*restore_args(replica, outdir / "restored.db", "--txid", 99), cwd=tmp_path)
    line = one_line_error(proc, where(replica))
    assert f"{99:016x}" in line or "99" in line
    assert_nothing_in(outdir)


def test_f_timestamp_before_the_first_file(tmp_path, storage_url, outdir):
    replica, _ = build_replica(tmp_path, storage_url)
    proc = tenantsync(
        *restore_args(replica, outdir / "restored.db", "--timestamp", "2000-01-01T00:00:00Z"), cwd=tmp_path
    )
    one_line_error(proc, where(replica))
    assert_nothing_in(outdir)


# -- (g) the output already exists ------------------------------------------------------------


def test_g_existing_output_without_force_is_left_untouched(tmp_path, file_url, outdir):
    replica, _ = build_replica(tmp_path, file_url)
    out = outdir / "restored.db"
    out.write_bytes(b"precious, not to be replaced")
    before = os.stat(out)
    proc = tenantsync(*restore_args(replica, out), cwd=tmp_path)
    one_line_error(proc, str(out))
    assert out.read_bytes() == b"precious, not to be replaced"
    assert os.stat(out).st_mtime_ns == before.st_mtime_ns
    assert sorted(os.listdir(outdir)) == ["restored.db"]


# -- (h) (i) replicate / restore / ltx dump on wrong paths --------------------------------------


def replica_objects(url: str) -> list:
    return [o.key for o in open_storage(url).list("")]


NOT_SQLITE = {
    "random bytes": lambda: os.urandom(8192),
    "short text": lambda: b"just some notes\n",
    "sqlite magic then garbage": lambda: b"SQLite format 3\x00" + os.urandom(8192),
}


@pytest.mark.parametrize("content", sorted(NOT_SQLITE))
def test_h_replicate_a_file_that_is_not_sqlite(tmp_path, storage_url, content):
    dbdir = tmp_path / "db"
    dbdir.mkdir()
    path = dbdir / "notes.db"
    data = NOT_SQLITE[content]()
    path.write_bytes(data)
    proc = tenantsync("replicate", path, "--replica", storage_url, cwd=tmp_path, timeout=30)
    one_line_error(proc, str(path))
    assert path.read_bytes() == data
    assert sorted(os.listdir(dbdir)) == ["notes.db"], "files created beside the non-database"
    assert replica_objects(storage_url) == []


def test_i_replicate_a_directory(tmp_path, file_url):
    d = tmp_path / "adir.db"
    d.mkdir()
    proc = tenantsync("replicate", d, "--replica", file_url, cwd=tmp_path, timeout=30)
    one_line_error(proc, str(d))
    assert replica_objects(file_url) == []
    assert os.listdir(d) == []


def test_i_replicate_a_missing_file(tmp_path, file_url):
    path = tmp_path / "missing.db"
    proc = tenantsync("replicate", path, "--replica", file_url, cwd=tmp_path, timeout=30)
    one_line_error(proc, str(path))
    assert not path.exists()
    assert replica_objects(file_url) == []
    assert sorted(os.listdir(tmp_path)) == [], "files created for a missing database"


def test_i_restore_into_a_directory(tmp_path, file_url):
    replica, _ = build_replica(tmp_path, file_url)
    d = tmp_path / "target"
    d.mkdir()
    proc = tenantsync(*restore_args(replica, d), cwd=tmp_path)
    one_line_error(proc, str(d))
    assert os.listdir(d) == []


def test_i_restore_from_a_missing_replica_directory(tmp_path, outdir):
    missing = tmp_path / "no-such-replica"
    proc = tenantsync("restore", "--replica", missing.as_uri(), "-o", outdir / "restored.db", cwd=tmp_path)
    one_line_error(proc, (str(missing), missing.as_uri()))
    assert_nothing_in(outdir)
    assert not missing.exists()


@pytest.mark.parametrize("kind", ["directory", "missing"])
def test_i_ltx_dump_of_a_directory_or_missing_file(tmp_path, kind):
    path = tmp_path / "x.ltx"
    if kind == "directory":
        path.mkdir()
    proc = tenantsync("ltx", "dump", path, cwd=tmp_path)
    one_line_error(proc, str(path))


# -- (j) unreachable storage --------------------------------------------------------------------


def test_j_unreachable_s3_endpoint_exits_3_quickly(tmp_path, aws_env, outdir):
    started = time.monotonic()
    proc = tenantsync("restore", "--replica", UNREACHABLE_S3, "-o", outdir / "restored.db", cwd=tmp_path)
    elapsed = time.monotonic() - started
    one_line_error(proc, ("s3://b/p", "127.0.0.1:1"), code=3)
    assert elapsed < 20, f"took {elapsed:.1f}s to give up on an unreachable endpoint"
    assert_nothing_in(outdir)


# -- (k) a WAL with a torn tail -------------------------------------------------------------------


def _frames_of(wal: Path, page_size: int) -> int:
    return (wal.stat().st_size - 32) // (FRAME_HEADER_SIZE + page_size)


TEARS = {
    # (how the tail is damaged, which of the four transactions SQLite still sees)
    "mid-frame truncation": 3,
    "commit frame missing": 3,
    "last frame overwritten": 3,
    "garbage appended": 4,
}


def _tear(wal: Path, how: str, page_size: int) -> None:
    frame = FRAME_HEADER_SIZE + page_size
    size = wal.stat().st_size
    assert (size - 32) % frame == 0
    with open(wal, "r+b") as f:
        if how == "mid-frame truncation":
            f.truncate(size - frame // 2)
        elif how == "commit frame missing":
            f.truncate(size - frame)
        elif how == "last frame overwritten":
            f.seek(size - page_size // 2)
            f.write(os.urandom(page_size // 2))
        elif how == "garbage appended":
            f.seek(size)
            f.write(os.urandom(3 * frame + 123))
        else:  # pragma: no cover
            raise AssertionError(how)


def _wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if line.startswith(prefix):
                return line
            if not line and proc.poll() is not None:
                break
    raise AssertionError(f"no {prefix!r} line from replicate within {timeout}s (exit {proc.poll()})")


@pytest.mark.parametrize("how", sorted(TEARS))
def test_k_torn_wal_tail_ships_only_complete_transactions(tmp_path, file_url, how):
    page_size = 4096
    src = tmp_path / "src.db"
    conn = app_db(src, page_size=page_size)
    conn.execute("PRAGMA wal_autocheckpoint=0")
    write_rows(conn, 20)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # some content in the main file
    counts = [20]
    for n, size in ((5, 100), (7, 100), (9, 3000)):  # the last one spans many frames
        write_rows(conn, n, size=size)
        counts.append(n)
    wal = Path(str(src) + "-wal")
    assert _frames_of(wal, page_size) > 3

    # A crash image: the files as they are with the writer still open (nothing in flight).
    db = tmp_path / "db" / "torn.db"
    db.parent.mkdir()
    shutil.copyfile(src, db)
    shutil.copyfile(wal, str(db) + "-wal")
    conn.close()
    _tear(Path(str(db) + "-wal"), how, page_size)

    # What SQLite itself makes of it, on a copy so the image stays untouched.
    seen = tmp_path / "seen"
    seen.mkdir()
    shutil.copyfile(db, seen / "torn.db")
    shutil.copyfile(str(db) + "-wal", seen / "torn.db-wal")
    check = sqlite3.connect(seen / "torn.db")
    assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert check.execute("SELECT count(*) FROM t").fetchone()[0] == sum(counts[: TEARS[how]])
    check.close()
    expected = dump(str(seen / "torn.db"))

    proc = subprocess.Popen(
        [sys.executable, "-m", "tenantsync", "replicate", str(db), "--replica", file_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=tmp_path,
    )
    try:
        _wait_for_line(proc, "shipped txid=", timeout=30)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "Traceback" not in err, err
    assert proc.returncode == 0, err

    out = tmp_path / "restored.db"
    restored = tenantsync("restore", "--replica", file_url, "-o", out, cwd=tmp_path)
    assert restored.returncode == 0, restored.stderr
    assert re.fullmatch(rf"restored {re.escape(str(out))} txid=[0-9a-f]{{16}} as-of=\d{{4}}-\d\d-\d\dT[\d:.]+Z "
                        r"files=\d+ pages=\d+\n", restored.stdout), restored.stdout
    assert dump(str(out)) == expected
    assert dump(str(db)) == expected  # and the database itself still holds what SQLite saw


# -- (l) malformed arguments ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, value, mention",
    [
        ("--txid", "abc", "abc"),
        ("--txid", "0", None),
        ("--timestamp", "2026-01-01T00:00:00", "2026-01-01T00:00:00"),
        ("--timestamp", "yesterday", "yesterday"),
    ],
)
def test_l_malformed_target_is_a_one_line_usage_error(tmp_path, file_url, outdir, option, value, mention):
    replica, _ = build_replica(tmp_path, file_url, txids=1)
    proc = tenantsync(*restore_args(replica, outdir / "restored.db", option, value), cwd=tmp_path)
    line = one_line_error(proc, *([mention] if mention else []))
    assert option in line or option.lstrip("-") in line, f"the message does not name {option}: {line!r}"
    assert_nothing_in(outdir)


# -- (m) unknown URL scheme -------------------------------------------------------------------------


def test_m_unknown_url_scheme_for_restore(tmp_path, outdir):
    proc = tenantsync("restore", "--replica", "ftp://x", "-o", outdir / "restored.db", cwd=tmp_path)
    one_line_error(proc, "ftp://x")
    assert_nothing_in(outdir)


def test_m_unknown_url_scheme_for_replicate(tmp_path):
    dbdir = tmp_path / "db"
    dbdir.mkdir()
    conn = app_db(dbdir / "a.db")
    write_rows(conn, 3)
    conn.close()
    before = sorted(os.listdir(dbdir))
    proc = tenantsync("replicate", dbdir / "a.db", "--replica", "ftp://x", cwd=tmp_path, timeout=30)
    one_line_error(proc, "ftp://x")
    assert sorted(os.listdir(dbdir)) == before
    assert not (tmp_path / "ftp:").exists()


def test_m_unknown_url_scheme_for_ltx_dump(tmp_path):
    proc = tenantsync("ltx", "dump", "ftp://x/0000000000000001-0000000000000001.ltx", cwd=tmp_path)
    one_line_error(proc, "ftp://x")


# -- (n) a catalogue that is not a database ---------------------------------------------------------


def test_n_a_catalogue_file_that_is_not_a_database_is_one_line_and_left_alone(tmp_path):
    bad = tmp_path / "catalogue.db"
    bad.write_bytes(b"not a database, but somebody's file\n" * 100)
    before = bad.read_bytes()
    proc = tenantsync("tenants", cwd=tmp_path,
                      env={"TENANTSYNC_CATALOGUE": f"sqlite:///{bad}", "TENANTSYNC_REPLICA": str(tmp_path)})
    one_line_error(proc, str(bad), "not a database")
    assert bad.read_bytes() == before
