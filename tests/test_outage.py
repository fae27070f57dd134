"""A storage outage: the application keeps writing, its WAL keeps every unshipped frame and
grows (visible in the catalogue), the idle release does not let go of it, and the first pass
after the outage ships it all, incrementally, with every transaction as a restore point.
``wal-ceiling`` is reported once; ``at-wal-ceiling: checkpoint`` trades the outage's restore
points for disk, and the replica gets the whole database instead."""

from __future__ import annotations

import logging
import os
import sqlite3

import pytest

from scheduler.job_outcome import FailureLog
from tenantsync.catalogue import TenantState
from tenantsync.errors import DatabaseError, StorageUnavailable
from tenantsync.fleet import Fleet
from tenantsync.outcome import Failed, Full, NothingNew, Shipped, failed
from tenantsync.replica import Replica
from tenantsync.restore import restore
from tenantsync.storage import open_storage

from .dbutil import app_db, dump, write_rows
from .test_fleet_embedded import fleet_config


class Outage:
    """The tenant's replica directory made unwritable for the capture (a file where its
    LTX directory was), and put back: every upload fails while it lasts."""

    def __init__(self, replica_root, name: str):
        self.ltx = replica_root / name / "ltx"
        self.aside = replica_root / f"{name}.ltx-aside"

    def __enter__(self):
        os.rename(self.ltx, self.aside)
        self.ltx.write_bytes(b"")
        return self

    def __exit__(self, *exc):
        self.ltx.unlink()
        os.rename(self.aside, self.ltx)


def make_fleet(tmp_path, file_url, **kw) -> Fleet:
    (tmp_path / "data").mkdir(exist_ok=True)
    return Fleet(fleet_config(tmp_path, file_url, **kw))


def app_tenant(fleet: Fleet, tmp_path, name: str) -> tuple[str, sqlite3.Connection]:
    path = str(tmp_path / "data" / name)
    conn = app_db(path)
    conn.execute("PRAGMA wal_autocheckpoint=100")  # the application checkpoints as SQLite's default does, sooner
    write_rows(conn, 5)
    fleet.catalogue.discover(name, path, fleet.config.host)
    return path, conn


def restored(tmp_path, file_url, name: str, out: str, **target) -> list:
    restore(Replica(open_storage(file_url).child(name)), str(tmp_path / out), force=True, **target)
    return dump(str(tmp_path / out))


def wal_bytes(path: str) -> int:
    return os.path.getsize(path + "-wal")


def test_a_long_outage_grows_the_wal_and_loses_no_frame(tmp_path, file_url):
    fleet = make_fleet(tmp_path, file_url)
    path, conn = app_tenant(fleet, tmp_path, "a.db")
    first = fleet.sync("a.db")
    assert isinstance(first, Shipped)
    before_outage = dump(path)
    sizes = []
    with Outage(tmp_path / "replica", "a.db"):
        for _ in range(30):
            write_rows(conn, 20, size=400)  # 30 × 20 transactions, far past the autocheckpoint
            outcome = fleet.sync("a.db")
            assert isinstance(outcome, Failed)
            record = fleet.catalogue.get("a.db")
            assert record.state is TenantState.error and record.wal_bytes == wal_bytes(path)
            sizes.append(record.wal_bytes)
            # Idle by now for the release thread: kept open, since closing would let the
            # application's next checkpoint restart the WAL over unshipped frames.
            assert fleet.release_idle(0) == []
        # The application's own checkpoint copies nothing past our mark and restarts nothing.
        busy, log_frames, copied = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 1 and copied < log_frames
    assert sizes == sorted(sizes) and sizes[-1] > 30 * 20 * 400
    during = dump(path)

    after = fleet.sync("a.db")
    assert isinstance(after, Shipped) and after.full is None, "the outage's frames shipped as one incremental file"
    record = fleet.catalogue.get("a.db")
    assert record.state is TenantState.active and record.last_error is None and record.txid == after.txid
    assert restored(tmp_path, file_url, "a.db", "latest.db") == during
    assert restored(tmp_path, file_url, "a.db", "before.db", txid=first.txid) == before_outage
    fleet.close()


@pytest.mark.parametrize("mode", ["grow", "checkpoint"])
def test_the_wal_ceiling_is_reported_once_and_does_what_it_says(tmp_path, file_url, caplog, mode):
    fleet = make_fleet(tmp_path, file_url, wal_ceiling=256 << 10, at_wal_ceiling=mode)
    path, conn = app_tenant(fleet, tmp_path, "a.db")
    assert isinstance(fleet.sync("a.db"), Shipped)
    sizes = []
    with caplog.at_level(logging.WARNING, logger="tenantsync.fleet"), Outage(tmp_path / "replica", "a.db"):
        for _ in range(30):
            write_rows(conn, 10, size=1000)  # a frame or two a transaction: ~ 25 KiB of WAL a round
            assert isinstance(fleet.sync("a.db"), Failed)
            sizes.append(wal_bytes(path))
    reports = [r.getMessage() for r in caplog.records if "wal-ceiling" in r.getMessage()]
    if mode == "grow":
        assert len(reports) == 1 and "kept, growing" in reports[0]
        assert sizes == sorted(sizes) and sizes[-1] > 2 * (256 << 10)
    else:
        # Checkpointed each time the ceiling is passed: the WAL stays near it.
        assert len(reports) >= 2 and all("checkpointed without shipping" in r for r in reports)
        assert max(sizes) < 2 * (256 << 10) and 0 in sizes
    during = dump(path)
    outcome = fleet.sync("a.db")
    assert isinstance(outcome, Shipped)
    assert outcome.full is (None if mode == "grow" else Full.WAL_CEILING)
    assert restored(tmp_path, file_url, "a.db", "latest.db") == during
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    fleet.close()


def test_a_failure_is_logged_when_it_starts_changes_or_ends_not_at_every_retry(caplog):
    failures = FailureLog()
    down = StorageUnavailable("s3://bucket: write a.db/ltx/0/…: cannot reach http://127.0.0.1:9")
    with caplog.at_level(logging.INFO, logger="scheduler.job_outcome"):
        for _ in range(50):  # an outage: fifty retries of two tenants' syncs
            failures.note("sync", failed("a.db", down))
            failures.note("sync", failed("b.db", down))
        failures.note("sync", failed("a.db", DatabaseError("a.db: database disk image is malformed")))
        failures.note("sync", Shipped("b.db", 7, 3, 12288))
        failures.note("sync", NothingNew("c.db"))  # never failed: nothing to say
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines
    assert lines[0].startswith("sync a.db failed: s3://bucket") and "retried with backoff" in lines[0]
    assert lines[1].startswith("sync b.db failed")
    assert lines[2] == "sync a.db failed: a.db: database disk image is malformed"
    assert lines[3].startswith("sync b.db works again, after 50 failed attempt(s)")
