"""Replication never stops silently (issue 19, findings 5 and 7), through ``tenantsync watch``
as a real process: a database taken out of WAL mode or replaced by a rollback-journal file
is shipped and switched back; a symbolic link is refused at discovery; a replica that
cannot be written is refused at start-up (its root) or shows as ``error`` (a tenant's
prefix), and a shutdown that leaves committed data unshipped says so and exits non-zero.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tenantsync.catalogue import Catalogue, TenantState
from tenantsync.config import Config
from tenantsync.replica import Replica
from tenantsync.restore import restore
from tenantsync.storage import open_storage

from .dbutil import app_db, dump, wait_for, write_rows

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.pop("PYTHONWARNINGS", None)
    return env


class Watch:
    """``tenantsync watch`` on ``data/*.db`` with a tenantsync.yml, as a subprocess; its
    stderr goes to a file (a pipe nobody reads could fill up and stall it)."""

    def __init__(self, tmp_path: Path, replica: str, **settings: str):
        self.tmp_path = tmp_path
        self.catalogue_url = f"sqlite:///{tmp_path}/catalogue.db"
        self.fleet = Config(replica=replica).fleet
        config = tmp_path / "tenantsync.yml"
        lines = [f"replica: {replica}", f"globs: ['{tmp_path}/data/*.db']", f"catalogue: {self.catalogue_url}",
                 "host: test-host", "host-workers: 1", *(f"{k}: {v}" for k, v in settings.items())]
        config.write_text("\n".join(lines) + "\n")
        self.stderr_path = tmp_path / "watch.stderr"
        with open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "tenantsync", "watch", "--config", str(config)],
                                         stdout=subprocess.DEVNULL, stderr=err, env=_env(), cwd=tmp_path)

    def stop(self) -> tuple[int, str]:
        """SIGTERM, as a deploy would: (exit status, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        return code, self.stderr_path.read_text()


@pytest.fixture
def watch(tmp_path):
    started = []

    def start(replica: str | None = None, **settings: str) -> Watch:
        w = Watch(tmp_path, replica or (tmp_path / "replica").as_uri(), **settings)
        started.append(w)
        return w

    yield start
    for w in started:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()


def replica_matches(tmp_path: Path, name: str, path: Path) -> bool:
    """Tenant ``name``'s replica restores to ``path``'s content."""
    out = tmp_path / "restored" / name
    restore(Replica(open_storage((tmp_path / "replica").as_uri()).child(name)), str(out), force=True)
    return dump(str(out)) == dump(str(path))


def in_wal_mode(path: Path) -> bool:
    """Bytes 18 and 19 of the database header: 2 and 2 in WAL mode, 1 and 1 with a rollback
    journal (https://www.sqlite.org/fileformat.html, "File format version numbers")."""
    with open(path, "rb") as f:
        return f.read(20)[18:20] == b"\x02\x02"


def idle_at(catalogue: Catalogue, name: str, txid: int) -> bool:
    record = catalogue.get(name)
    return record is not None and record.txid == txid and record.state is TenantState.idle


def rollback_journal_db(path: Path, rows: int) -> None:
    """A database in rollback-journal mode (journal_mode=DELETE) with ``rows`` rows."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    write_rows(conn, rows)
    conn.close()


def idle_tenant(tmp_path: Path, watch, **settings: str) -> tuple[Path, Watch, Catalogue]:
    """Tenant a.db (5 rows, no connection left open) under a running watch, synced once and
    released: (its path, the watch, the catalogue)."""
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "a.db"
    conn = app_db(path)
    write_rows(conn, 5)
    conn.close()
    w = watch(**{"idle-after": "1s"}, **settings)
    catalogue = Catalogue(w.catalogue_url, fleet=w.fleet)
    assert wait_for(lambda: idle_at(catalogue, "a.db", 1), 30)
    return path, w, catalogue


def test_a_rollback_journal_database_moved_over_an_idle_tenant_is_shipped_and_switched_to_wal(tmp_path, watch):
    """Finding 5a: the rename is a replacement. Its writes never touch a -wal, so without a
    sync at the rename the tenant stayed at TXID 1, idle, for good."""
    path, w, catalogue = idle_tenant(tmp_path, watch)
    rollback_journal_db(tmp_path / "new.db", 9)
    os.rename(tmp_path / "new.db", path)
    assert wait_for(lambda: catalogue.get("a.db").txid >= 2 and replica_matches(tmp_path, "a.db", path), 20, 0.2)
    assert in_wal_mode(path)

    conn = sqlite3.connect(path, isolation_level=None)  # the application, as before
    write_rows(conn, 3)
    conn.close()
    assert wait_for(lambda: replica_matches(tmp_path, "a.db", path), 20, 0.2)
    code, err = w.stop()
    assert code == 0 and "Traceback" not in err, err
    assert replica_matches(tmp_path, "a.db", path)


def test_a_rollback_journal_database_copied_over_an_idle_tenant_is_shipped_at_its_next_write(tmp_path, watch):
    """Copied in place (no name event), then written: the rollback journal's name events
    are the write, as the -wal's are in WAL mode. The rescan is a minute away."""
    path, w, catalogue = idle_tenant(tmp_path, watch)
    rollback_journal_db(tmp_path / "new.db", 9)
    shutil.copyfile(tmp_path / "new.db", path)
    conn = sqlite3.connect(path, isolation_level=None)
    write_rows(conn, 4)
    conn.close()
    assert wait_for(lambda: catalogue.get("a.db").txid >= 2 and replica_matches(tmp_path, "a.db", path), 20, 0.2)
    assert in_wal_mode(path)
    code, err = w.stop()
    assert code == 0 and "Traceback" not in err, err


def test_a_rollback_journal_database_copied_over_an_idle_tenant_is_shipped_at_the_rescan(tmp_path, watch):
    """Copied in place and not written: no event at all. The rescan sees the main file
    changed since its capture recorded it, and syncs it."""
    path, w, catalogue = idle_tenant(tmp_path, watch, **{"rescan-interval": "1s"})
    rollback_journal_db(tmp_path / "new.db", 9)
    shutil.copyfile(tmp_path / "new.db", path)
    assert wait_for(lambda: catalogue.get("a.db").txid >= 2 and replica_matches(tmp_path, "a.db", path), 20, 0.2)
    assert in_wal_mode(path)
    code, err = w.stop()
    assert code == 0 and "Traceback" not in err, err


def test_a_symbolic_link_is_refused_at_discovery_naming_its_target(tmp_path, watch):
    """Finding 5b: the WAL of a linked database sits beside its target, where no watch is:
    only the first snapshot shipped. The link is reported once and skipped."""
    (tmp_path / "data").mkdir()
    (tmp_path / "elsewhere").mkdir()
    target = tmp_path / "elsewhere" / "real.db"
    write_rows(app_db(target), 3)
    write_rows(app_db(tmp_path / "data" / "good.db"), 3)
    link = tmp_path / "data" / "link.db"
    link.symlink_to(target)
    w = watch()
    catalogue = Catalogue(w.catalogue_url, fleet=w.fleet)
    assert wait_for(lambda: (catalogue.get("good.db") or None) and catalogue.get("good.db").txid == 1, 30)
    code, err = w.stop()
    assert code == 0, err
    lines = [line for line in err.splitlines() if str(link) in line]
    assert len(lines) == 1 and str(target) in lines[0], err
    assert [t.name for t in catalogue.records()] == ["good.db"]
    assert not (tmp_path / "replica" / "link.db").exists()


def test_a_replica_root_that_is_a_file_is_refused_at_start_up(tmp_path, watch):
    """Finding 7: ``--replica file:///x`` with x a regular file was found only at the first
    sync, which failed while the tenant showed idle."""
    (tmp_path / "data").mkdir()
    write_rows(app_db(tmp_path / "data" / "a.db"), 3)
    root = tmp_path / "x"
    root.write_bytes(b"somebody's file\n")
    w = watch(root.as_uri())
    try:
        code = w.proc.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail("tenantsync watch kept running with a replica root that is a file")
    err = w.stderr_path.read_text()
    assert code != 0 and "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and str(root) in lines[0], err
    assert root.read_bytes() == b"somebody's file\n"
    assert not (tmp_path / "catalogue.db").exists(), "the catalogue was opened before the replica was checked"


def test_a_tenant_whose_replica_cannot_be_written_shows_error_and_the_shutdown_says_so(tmp_path, watch):
    """Finding 7: a tenant whose replica stops accepting writes is ``error`` with the reason
    (it showed ``active``, then ``idle``), and the shutdown that could not ship its last
    commits names it on stderr and exits non-zero (it exited 0)."""
    (tmp_path / "data").mkdir()
    paths = {name: tmp_path / "data" / name for name in ("a.db", "good.db")}
    conns = {name: app_db(path) for name, path in paths.items()}
    for conn in conns.values():
        write_rows(conn, 5)
    w = watch()
    catalogue = Catalogue(w.catalogue_url, fleet=w.fleet)
    assert wait_for(lambda: all((catalogue.get(n) or None) and catalogue.get(n).txid == 1 for n in paths), 30)

    ltx = tmp_path / "replica" / "a.db" / "ltx"
    os.rename(ltx, tmp_path / "ltx-moved-away")
    ltx.write_bytes(b"")  # a file where the LTX directory was: nothing more can be written
    write_rows(conns["a.db"], 2)
    write_rows(conns["good.db"], 2)
    assert wait_for(lambda: catalogue.get("a.db").state is TenantState.error, 20)
    assert "a.db" in catalogue.get("a.db").last_error
    assert wait_for(lambda: catalogue.get("good.db").txid == 2, 20)

    listing = subprocess.run([sys.executable, "-m", "tenantsync", "tenants", "--config", str(tmp_path / "tenantsync.yml")],
                             capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=60)
    assert [line.split()[:2] for line in listing.stdout.splitlines()[2:]] == [["a.db", "error"], ["good.db", "active"]]

    code, err = w.stop()
    assert code != 0 and "Traceback" not in err, err
    named = [line for line in err.splitlines() if line.startswith("tenantsync: error:")]
    assert len(named) == 1 and "a.db" in named[0] and "good.db" not in named[0], err
    assert catalogue.get("a.db").state is TenantState.error
    assert replica_matches(tmp_path, "good.db", paths["good.db"])
