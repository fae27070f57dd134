"""Archival of idle tenants and hydration on demand, with real files and processes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import timedelta

import pytest

from tenantsync.catalogue import TenantState, open_catalogue
from tenantsync.config import Config
from tenantsync.errors import ReplicaEmpty
from tenantsync.outcome import Archived, Skip, Skipped
from tenantsync.server import archive_answer
from tenantsync.fleet import Fleet
from tenantsync.errors import ArchiveAborted
from tenantsync.ondemand import OnDemand

from .dbutil import app_db, application_holding, dump, write_rows


@pytest.fixture
def fleet(tmp_path, storage_url):
    (tmp_path / "data").mkdir()
    cfg = Config(replica=storage_url, globs=(f"{tmp_path}/data/*.db",),
                 catalogue=f"sqlite:///{tmp_path}/cat.db", host="h1", idle_after=timedelta(seconds=1))
    f = Fleet(cfg, open_catalogue(cfg))
    yield f
    f.close()


def tenant(fleet, tmp_path, name="acme.db", rows=20):
    path = str(tmp_path / "data" / name)
    conn = app_db(path)
    write_rows(conn, rows)
    fleet.catalogue.discover(name, path, "h1")
    fleet.sync(name)
    return path, conn


def test_archive_then_hydrate_round_trip_without_reupload(tmp_path, fleet):
    path, conn = tenant(fleet, tmp_path)
    write_rows(conn, 5)
    fleet.sync(name := "acme.db")
    expected = dump(path)
    conn.close()
    od = OnDemand(fleet)
    result = od.archive(name)
    assert isinstance(result, Archived) and not any(os.path.exists(path + s) for s in ("", "-wal", "-shm"))
    assert fleet.catalogue.get(name).state == TenantState.archived
    hydrated = od.hydrate(name)
    assert hydrated.restored and dump(path) == expected
    assert fleet.catalogue.get(name).state == TenantState.active
    conn = app_db(path)
    write_rows(conn, 3)
    out = fleet.sync(name)
    assert out.txid == hydrated.txid + 1 and out.full is None  # no second upload


def test_archiving_an_archived_tenant_is_skipped_and_answered_as_done(tmp_path, fleet):
    path, conn = tenant(fleet, tmp_path)
    conn.close()
    od = OnDemand(fleet)
    assert isinstance(od.archive("acme.db"), Archived)
    again = od.archive("acme.db")
    assert again == Skipped("acme.db", Skip.ALREADY_ARCHIVED)
    status, body = archive_answer(again, fleet.catalogue.get("acme.db"))
    assert (status, body["archived"], body["state"]) == (200, True, "archived")


def test_archival_is_abandoned_while_another_process_has_the_file_open(tmp_path, fleet):
    path, conn = tenant(fleet, tmp_path)
    conn.close()
    with application_holding(path):
        outcome = OnDemand(fleet).archive("acme.db")
        assert outcome.reason is Skip.IN_USE and "is open by pid" in outcome.detail
        assert os.path.exists(path)
        assert fleet.catalogue.get("acme.db").state != TenantState.archived


def test_concurrent_hydrations_of_one_tenant_share_one_restore(tmp_path, fleet):
    path, conn = tenant(fleet, tmp_path)
    conn.close()
    od = OnDemand(fleet)
    od.archive("acme.db")
    results = []
    threads = [threading.Thread(target=lambda: results.append(od.hydrate("acme.db"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len({r.path for r in results}) == 1
    assert len({id(r) for r in results if r.restored}) == 1  # one restore, its result shared


def test_failed_hydration_leaves_no_file_and_records_why(tmp_path, fleet):
    fleet.catalogue.discover("ghost.db", str(tmp_path / "data" / "ghost.db"), "h1")
    fleet.catalogue.transition("ghost.db", TenantState.archived)
    with pytest.raises(ReplicaEmpty, match="no LTX files"):
        OnDemand(fleet).hydrate("ghost.db")
    assert not os.path.exists(tmp_path / "data" / "ghost.db")
    assert "no LTX files" in fleet.catalogue.get("ghost.db").last_error


def test_fork_restores_another_tenant_state_under_a_new_name(tmp_path, fleet):
    path, conn = tenant(fleet, tmp_path)
    first = dump(path)
    txid = fleet.catalogue.get("acme.db").txid
    write_rows(conn, 9)
    fleet.sync("acme.db")
    forked = OnDemand(fleet).hydrate("acme-copy.db", source="acme.db", txid=txid)
    assert dump(forked.path) == first
    assert fleet.sync("acme-copy.db").txid == 1  # its own replica starts with a snapshot


WRITER = r"""
import sqlite3, sys, time, urllib.parse
path, n = sys.argv[1], int(sys.argv[2])
uri = "file:" + urllib.parse.quote(path) + "?mode=rw"   # never create a new, empty database
for i in range(n):
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=5)
        conn.execute("INSERT INTO t(v) VALUES (?)", (f"w{i}",))
        conn.close()
    except sqlite3.OperationalError as e:
        print("stopped", i, e, flush=True)
        break
    print("committed", i, flush=True)
    time.sleep(0.002)
"""


def test_a_write_during_archival_is_never_lost(tmp_path, fleet):
    path, conn = tenant(fleet, tmp_path)
    conn.close()
    od = OnDemand(fleet)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, path, "400"], stdout=subprocess.PIPE, text=True)
    first = writer.stdout.readline()  # archive only once the writer is really writing
    assert first.startswith("committed")
    outcomes = []
    while writer.poll() is None and not outcomes[-1:] == ["archived"]:
        try:
            archived = isinstance(od.archive("acme.db"), Archived)  # else Skipped: in use
        except ArchiveAborted:  # the replica did not match the file: written meanwhile
            archived = False
        outcomes.append("archived" if archived else "aborted")
        if not archived:
            fleet.sync("acme.db")
    out, _ = writer.communicate()
    committed = {f"w{line.split()[1]}" for line in (first + out).splitlines() if line.startswith("committed")}
    assert len(committed) > 1 and outcomes
    if os.path.exists(path):  # the archival never won: everything is still local
        fleet.sync("acme.db")
        od.archive("acme.db")
    od.hydrate("acme.db")
    rows = {v for _, v in dump(path)[0][1] if isinstance(v, str)}
    assert committed <= rows, f"lost {sorted(committed - rows)[:5]} after {outcomes.count('aborted')} aborted archivals"


def test_archival_is_abandoned_while_the_application_in_this_process_has_it_open(tmp_path, fleet):
    path, conn = tenant(fleet, tmp_path)  # embedded mode: the application shares our process
    outcome = OnDemand(fleet).archive("acme.db")
    assert isinstance(outcome, Skipped) and outcome.reason is Skip.IN_USE and "is open by pid" in outcome.detail
    write_rows(conn, 2)  # the application's connection still works on the real file
    assert os.path.exists(path) and fleet.catalogue.get("acme.db").state != TenantState.archived


def test_a_hydration_that_read_the_tenant_archived_while_another_process_hydrated_it_leaves_it_alone(tmp_path,
                                                                                                   fleet):
    """Two processes hydrate one archived tenant: the second read the row (archived) just
    before the first finished. It must not take the first one's live file for an unknown
    one (move it aside and restore over it: the application's writes since would be lost)."""
    path, conn = tenant(fleet, tmp_path)
    conn.close()
    first = OnDemand(fleet)
    assert isinstance(first.archive("acme.db"), Archived)
    other = Fleet(fleet.config, open_catalogue(fleet.config))
    second = OnDemand(other)
    real_get = other.catalogue.get
    raced, calls = [], []

    def get_then_lose_the_race(name):
        record = real_get(name)
        calls.append(name)
        if len(calls) == 2:  # hydrate's own read (after resolve's): the first process hydrates, and
            # the application writes, in between
            raced.append(first.hydrate(name))
            write_rows(app_db(path), 7)
            raced.append(dump(path))
        return record

    other.catalogue.get = get_then_lose_the_race
    try:
        result = second.hydrate("acme.db")
        assert raced and not result.restored and result.moved_aside is None
        assert dump(path) == raced[1] and not [p for p in os.listdir(tmp_path / "data") if ".unknown-" in p]
    finally:
        other.close()


def test_a_library_callers_timestamp_out_of_range_is_refused_in_one_line(tmp_path, fleet):
    """The CLI and HTTP API parse times with tenantsync.targets; a library caller's datetime
    meets the same bounds (a restore looks a little past its target: year 9999 would overflow)."""
    from datetime import datetime, timezone

    from tenantsync.errors import InvalidArgument

    path, conn = tenant(fleet, tmp_path)
    conn.close()
    with pytest.raises(InvalidArgument, match="timestamp: .* is out of range"):
        OnDemand(fleet).hydrate("acme.db", timestamp=datetime(9999, 12, 31, 23, tzinfo=timezone.utc))
    assert fleet.catalogue.get("acme.db").state == TenantState.active  # nothing changed
