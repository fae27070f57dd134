"""Fencing: a host that takes a tenant's lease back after another host moved it on.

Two hosts (``a`` and ``b``: their own data directories, catalogues and Fleets, one replica
root on file:// or S3), a short lease TTL. Host a replicates a tenant and is cut off;
host b hydrates it from the replica and writes on. When host a comes back and takes the
lease over, its copy is behind: it must upload nothing, keep its files aside and say the
tenant is fenced, and the replica must restore to host b's database. A handover with
nothing written in between (host b hydrated the tenant but wrote nothing) is no reason to
fence: host a replicates on.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest

from tenantsync import catalogue_marks
from tenantsync import ondemand as ondemand_module
from tenantsync.catalogue import TenantState, open_catalogue
from tenantsync.config import Config
from tenantsync import fleet as fleet_module
from tenantsync.fleet import Fleet
from tenantsync.ondemand import OnDemand
from tenantsync import fence
from tenantsync.errors import CatalogueUnavailable, Fenced, LeaseHeld, StorageUnavailable
from tenantsync.outcome import Contended, Shipped, Skip, Skipped
from tenantsync.restore import restore

from .dbutil import app_db, dump, write_rows

TTL = timedelta(seconds=1)


def host(tmp_path, name: str, url: str, ttl: timedelta = TTL) -> Fleet:
    root = tmp_path / name
    (root / "data").mkdir(parents=True)
    cfg = Config(replica=url, globs=(f"{root}/data/*.db",), catalogue=f"sqlite:///{root}/catalogue.db", host=name,
                 lease_ttl=ttl, idle_after=timedelta(seconds=60))
    return Fleet(cfg, open_catalogue(cfg))


@pytest.fixture
def hosts(tmp_path, storage_url):
    fleets = host(tmp_path, "a", storage_url), host(tmp_path, "b", storage_url)
    yield fleets
    for fleet in fleets:
        fleet.close()


def replicated_on(fleet: Fleet, name: str = "t.db", rows: int = 10):
    """Tenant ``name`` written on ``fleet``'s host and shipped: (path, open connection)."""
    path = os.path.join(os.path.dirname(fleet.config.globs[0]), name)
    conn = app_db(path)
    write_rows(conn, rows)
    fleet.catalogue.discover(name, path, fleet.config.host)
    ship(fleet, name)
    return path, conn


def ship(fleet: Fleet, name: str = "t.db") -> None:
    """Sync until the pass ships: a pass that outlasted the 1-s lease (a loaded machine)
    is Contended and retried, as the fleet's jobs are."""
    for _ in range(5):
        outcome = fleet.sync(name)
        if isinstance(outcome, Shipped):
            return
        assert isinstance(outcome, Contended), outcome
    raise AssertionError(f"{name} not shipped: {outcome}")


def newest_txid(fleet: Fleet, name: str = "t.db") -> int:
    return fleet.replica(name).max_txid()


def moved_on_by(b: Fleet, rows: int) -> tuple[str, int]:
    """Host ``b`` hydrates the tenant, its application writes ``rows`` there, it ships and
    goes idle (lease given up): (its path, the replica's newest TXID)."""
    hydrated = OnDemand(b).hydrate("t.db")
    conn_b = app_db(hydrated.path)
    write_rows(conn_b, rows)
    ship(b)
    conn_b.close()
    b.release("t.db")
    return hydrated.path, newest_txid(b)


def lapse() -> None:
    time.sleep(TTL.total_seconds() * 1.5)


def test_a_host_back_after_its_tenant_moved_on_uploads_nothing_and_keeps_its_copy_aside(tmp_path, hosts):
    a, b = hosts
    path_a, conn_a = replicated_on(a)
    lapse()  # host a is cut off: its lease lapses

    path_b, moved_to = moved_on_by(b, 7)  # takes the lease over from a, writes on, goes idle
    expected = dump(path_b)

    write_rows(conn_a, 3)  # host a's application wrote meanwhile: commits only it has
    mine = dump(path_a)
    outcomes = [a.sync("t.db") for _ in range(3)]  # its old lease, then the takeover
    fenced = [o for o in outcomes if isinstance(o, Skipped) and o.reason is Skip.FENCED]
    assert fenced, outcomes
    assert all(isinstance(o, (Contended, Skipped)) for o in outcomes), outcomes
    assert "fenced" in str(fenced[0]) and "wrote its replica up to txid" in str(fenced[0])

    assert newest_txid(b) == moved_to  # nothing of host a's copy uploaded
    out = tmp_path / "restored.db"
    restore(b.replica("t.db"), str(out))
    assert dump(str(out)) == expected
    conn_a.close()
    (copy,) = a.catalogue.fenced("a")
    assert not os.path.exists(path_a) and copy.path == path_a and os.path.exists(copy.aside)
    assert dump(copy.aside) == mine  # kept, with the commits the replica never got
    assert a.sync("t.db") == Skipped("t.db", Skip.FENCED)  # and never synced here again


def test_a_lease_handed_over_with_nothing_written_since_is_no_reason_to_fence(tmp_path, hosts):
    a, b = hosts
    path_a, conn_a = replicated_on(a)
    lapse()
    b_lease = b._leaser("t.db")
    b_lease.release(b_lease.acquire())  # another host held the lease and wrote nothing
    write_rows(conn_a, 4)
    outcomes = [a.sync("t.db") for _ in range(2)]  # its old lease (lost), then the takeover
    shipped = [o for o in outcomes if isinstance(o, Shipped)]
    assert len(shipped) == 1 and shipped[0].full is None, outcomes
    assert a.catalogue.fenced("a") == []
    conn_a.close()


def test_tenants_lists_a_fenced_copy_and_once_unfenced_the_tenant_hydrates_there(tmp_path, hosts, monkeypatch):
    """The operator decides on the fenced files (here: they stay aside) and unfences: a
    sync there then neither takes the lease nor fences again (the tenant's file is not
    there), and a hydration there brings the replica's state."""
    monkeypatch.setattr(fleet_module, "FENCED_READ_EVERY", 0.0)  # the CLI's unfence seen at once
    a, b = hosts
    path_a, conn_a = replicated_on(a)
    lapse()
    path_b, _ = moved_on_by(b, 2)
    write_rows(conn_a, 1)
    conn_a.close()
    for _ in range(3):
        a.sync("t.db")
    config = tmp_path / "a.yml"
    config.write_text(f"replica: {a.config.replica}\ncatalogue: {a.config.catalogue}\nhost: a\n"
                      f"globs: [{a.config.globs[0]}]\n")
    cli = [sys.executable, "-m", "tenantsync"]
    listed = subprocess.run([*cli, "tenants", "--config", str(config), "--state", "fenced"], capture_output=True,
                            text=True, check=True).stdout
    assert "t.db" in listed and "fenced" in listed, listed
    unfenced = subprocess.run([*cli, "unfence", "t.db", "--config", str(config)], capture_output=True, text=True)
    assert unfenced.returncode == 0 and ".t.db.fenced-" in unfenced.stdout, unfenced.stdout + unfenced.stderr
    assert a.catalogue.fenced("a") == []
    assert a.sync("t.db") == Skipped("t.db", Skip.GONE) and a.catalogue.fenced("a") == []
    hydrated = OnDemand(a).hydrate("t.db")  # b released it: its lease is given up
    assert hydrated.restored and dump(hydrated.path) == dump(path_b)


def test_a_failover_hydration_waits_for_the_old_hosts_lease_and_then_holds_it(tmp_path, hosts):
    """Hydrating another host's tenant is refused while that host's lease is live; after it
    lapses the hydration takes the lease before it restores, so the old host, were it only
    cut off, can upload nothing more."""
    a, b = hosts
    path_a, conn_a = replicated_on(a)
    with pytest.raises(LeaseHeld, match="lease held by a"):
        OnDemand(b).hydrate("t.db")
    assert b.catalogue.get("t.db") is None and not os.listdir(os.path.dirname(b.config.globs[0]))
    lapse()
    hydrated = OnDemand(b).hydrate("t.db")
    assert hydrated.restored and dump(hydrated.path) == dump(path_a)
    assert b._leaser("t.db").read().owner == "b"
    write_rows(conn_a, 2)  # the old host, back before the new one wrote anything
    assert isinstance(a.sync("t.db"), Contended)
    assert newest_txid(a) == hydrated.txid
    conn_a.close()


def test_a_replica_check_the_store_did_not_answer_is_made_again_before_any_upload(tmp_path, hosts, monkeypatch):
    """The check after a takeover failed (the store did not answer): the next pass, holding
    the lease already, must check again rather than upload."""
    a, b = hosts
    path_a, conn_a = replicated_on(a)
    lapse()
    _, moved_to = moved_on_by(b, 3)
    real, calls = fence.moved_on, []

    def store_away_once(*args):
        calls.append(args)
        if len(calls) == 1:
            raise StorageUnavailable("list /: no answer (the test's outage)")
        return real(*args)

    monkeypatch.setattr(fence, "moved_on", store_away_once)
    write_rows(conn_a, 1)
    outcomes = [a.sync("t.db") for _ in range(4)]
    assert any(isinstance(o, Skipped) and o.reason is Skip.FENCED for o in outcomes), outcomes
    assert len(calls) >= 2 and newest_txid(b) == moved_to  # checked again; nothing uploaded
    conn_a.close()


# -- hosts sharing one catalogue (fleet mode) -------------------------------------------


@pytest.fixture
def sharing(tmp_path, storage_url):
    """Hosts ``a`` and ``b`` with their own data directories and one catalogue."""
    shared = f"sqlite:///{tmp_path}/shared.db"
    fleets = []
    for name in ("a", "b"):
        (tmp_path / name / "data").mkdir(parents=True)
        cfg = Config(replica=storage_url, globs=(f"{tmp_path}/{name}/data/*.db",), catalogue=shared, host=name,
                     lease_ttl=TTL, idle_after=timedelta(seconds=60))
        fleets.append(Fleet(cfg, open_catalogue(cfg)))
    yield fleets
    for fleet in fleets:
        fleet.close()


def test_with_one_catalogue_a_host_back_after_a_failover_finds_the_tenant_is_the_other_hosts(sharing):
    a, b = sharing
    path_a, conn_a = replicated_on(a)
    a.close()  # host a dies with the tenant
    lapse()
    path_b, moved_to = moved_on_by(b, 5)
    row = b.catalogue.get("t.db")
    assert (row.host, row.path) == ("b", path_b)  # the hydration moved it to host b, at b's path

    a = Fleet(a.config, open_catalogue(a.config))  # host a back: its watcher finds its old copy
    write_rows(conn_a, 2)
    conn_a.close()
    mine = dump(path_a)
    a.catalogue.discover("t.db", path_a, "a")
    a.catalogue.record_writes(["t.db"], row.last_sync_at + timedelta(seconds=1), "a")
    assert b.catalogue.get("t.db") == row  # neither moved to host a nor made to look behind

    outcome = a.sync("t.db")
    assert isinstance(outcome, Skipped) and outcome.reason is Skip.FENCED
    assert "host b holds it in the catalogue" in outcome.detail
    (copy,) = a.catalogue.fenced("a")
    assert copy.aside == path_a and dump(path_a) == mine  # kept where it is (a row's word), never uploaded
    assert a.sync("t.db").reason is Skip.FENCED
    assert newest_txid(b) == moved_to and b.catalogue.get("t.db") == row
    a.close()


def test_a_hydration_of_a_name_fenced_on_this_host_is_refused_until_it_is_unfenced(sharing, monkeypatch):
    a, b = sharing
    path_a, conn_a = replicated_on(a)
    conn_a.close()
    a.release("t.db", keep_lease=False)
    moved_on_by(b, 3)
    assert a.sync("t.db").reason is Skip.FENCED  # a's copy: the tenant is host b's now
    b.release("t.db", keep_lease=False)

    with pytest.raises(Fenced, match=r"a fenced copy of it is on host a .*`tenantsync unfence t.db`"):
        OnDemand(a).hydrate("t.db")
    assert a.catalogue.get("t.db").host == "b"
    assert a.catalogue.unfence("a", "t.db")
    monkeypatch.setattr(fleet_module, "FENCED_READ_EVERY", 0.0)  # the fleet reads the unfence at once
    hydrated = OnDemand(a).hydrate("t.db")  # taken back to host a, from the replica
    assert hydrated.restored and dump(hydrated.path) == dump(b.catalogue.get("t.db").path)
    assert (a.catalogue.get("t.db").host, a.catalogue.get("t.db").path) == ("a", path_a)
    conn = app_db(path_a)
    write_rows(conn, 1)
    conn.close()
    ship(a)


def test_a_host_back_while_the_new_owner_keeps_the_lease_live_is_fenced_at_once(tmp_path, hosts):
    """The tenant's new host writes on and holds its lease: the old host, back, does not wait
    for a lease that never lapses; seeing it taken over to a newer generation, it checks the
    replica and fences its copy now."""
    a, b = hosts
    path_a, conn_a = replicated_on(a)
    lapse()
    hydrated = OnDemand(b).hydrate("t.db")
    conn_b = app_db(hydrated.path)
    write_rows(conn_b, 2)
    ship(b)  # host b holds the lease, live
    moved_to = newest_txid(b)

    write_rows(conn_a, 1)
    conn_a.close()
    outcome = a.sync("t.db")
    assert isinstance(outcome, Skipped) and outcome.reason is Skip.FENCED, outcome
    assert newest_txid(b) == moved_to and not os.path.exists(path_a)
    write_rows(conn_b, 1)
    conn_b.close()
    ship(b)  # host b goes on, its lease untouched


def test_commits_a_held_lease_keeps_from_shipping_leave_the_tenant_lagging_for_the_catch_up(tmp_path, hosts):
    """Another host holds the lease and wrote nothing: not fenced, Contended; the commits it
    keeps from shipping make the tenant lagging, so the catch-up plan asks again after the
    retries, even with no file event to come."""
    a, b = hosts
    path_a, conn_a = replicated_on(a)
    lapse()
    b._leaser("t.db").acquire()  # host b takes the lease and writes nothing
    write_rows(conn_a, 1)
    conn_a.close()
    assert isinstance(a.sync("t.db"), Contended)
    later = datetime.now(timezone.utc) + timedelta(seconds=10)
    assert [t.name for t in a.catalogue.lagging(later, timedelta(seconds=5), host="a")] == ["t.db"]
    assert a.catalogue.fenced("a") == []


def hydrate_on_b(tmp_path, storage_url, *args) -> subprocess.CompletedProcess:
    """``tenantsync hydrate t.db`` on a host b of its own (config file, catalogue, data)."""
    import json

    config = tmp_path / "b.json"
    config.write_text(json.dumps({"replica": storage_url, "catalogue": f"sqlite:///{tmp_path}/b.db", "host": "b",
                                  "globs": [f"{tmp_path}/b-data/*.db"]}))
    return subprocess.run([sys.executable, "-m", "tenantsync", "hydrate", "t.db", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=120)


def test_the_cli_exits_3_on_a_lease_held_elsewhere_so_a_failover_script_retries_on_the_status(tmp_path, storage_url):
    """A host's lease still live: ``tenantsync hydrate`` on the other host is one error line
    naming the holder and exit status 3 (worth running again as it is), not 1; with
    ``--wait`` shorter than the lease, the same after that wait."""
    a = host(tmp_path, "a", storage_url, ttl=timedelta(seconds=60))
    try:
        replicated_on(a)
        for args in ((), ("--wait", "0.5")):
            done = hydrate_on_b(tmp_path, storage_url, *args)
            assert done.returncode == 3, done.stderr
            assert done.stderr.count("\n") == 1 and "lease held by a" in done.stderr
    finally:
        a.close()


def test_hydrate_with_wait_takes_the_tenant_over_once_the_dead_hosts_lease_lapses(tmp_path, storage_url):
    """A failover script's ``hydrate NAME --wait 60``: it returns after the lease lapses,
    not before, with the tenant as the old host shipped it."""
    a = host(tmp_path, "a", storage_url, ttl=timedelta(seconds=6))
    try:
        path_a, conn_a = replicated_on(a)
        conn_a.close()
        expires = a._leaser("t.db").read().expires_at
        done = hydrate_on_b(tmp_path, storage_url, "--wait", "60")
        assert done.returncode == 0, done.stderr
        assert datetime.now(timezone.utc) >= expires
        assert dump(done.stdout.strip()) == dump(path_a)
    finally:
        a.close()


def test_with_one_catalogue_a_sync_of_a_deleted_and_unfenced_copy_fences_nothing_again(sharing, monkeypatch):
    """The operator deleted a's fenced copy and unfenced it; a's watcher, which still knew
    the file, asked for a sync of the name whose row is host b's. That sync must find the
    file gone, not fence it again: a later failover to host a would be refused (found by
    bench/chaos.py --mode celery seed 2410, where the campaign deletes settled copies)."""
    monkeypatch.setattr(fleet_module, "FENCED_READ_EVERY", 0.0)
    a, b = sharing
    path_a, conn_a = replicated_on(a)
    conn_a.close()
    a.release("t.db", keep_lease=False)
    moved_on_by(b, 3)
    assert a.sync("t.db").reason is Skip.FENCED
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path_a + suffix):
            os.remove(path_a + suffix)
    assert a.catalogue.unfence("a", "t.db")
    assert a.sync("t.db") == Skipped("t.db", Skip.GONE) and a.catalogue.fenced("a") == []
    b.release("t.db", keep_lease=False)
    hydrated = OnDemand(a).hydrate("t.db")
    assert hydrated.restored and dump(hydrated.path) == dump(b.catalogue.get("t.db").path)


def test_a_failed_failover_hydration_undoes_its_mark_through_a_catalogue_outage(sharing, monkeypatch):
    """A failover plan's hydration refused (the old host's lease live) while PostgreSQL
    restarted: its mark was left set, naming a live worker, so no recovery took it for dead;
    the tenant stayed hydrating, its host's syncs skipping it and no plan asking for it
    (found by bench/chaos.py --mode celery seed 2410). The undoing is tried again until the
    catalogue answers; and a mark of the process's own still left is undone by its next
    hydration, which holds the tenant's lock."""
    a, b = sharing
    path_a, conn_a = replicated_on(a)
    before = b.catalogue.get("t.db")
    calls = []
    real = b.catalogue._unmark

    def restarting(*args):
        calls.append(args)
        if len(calls) <= 2:
            raise CatalogueUnavailable("catalogue postgresql://127.0.0.1/chaos: connection refused")
        return real(*args)

    monkeypatch.setattr(catalogue_marks, "UNMARK_RETRY", 0.01)
    monkeypatch.setattr(b.catalogue, "_unmark", restarting)
    ondemand = OnDemand(b)
    with pytest.raises(LeaseHeld):
        ondemand.hydrate("t.db")
    row = b.catalogue.get("t.db")
    assert len(calls) == 3 and (row.state, row.mark_owner, row.host) == (before.state, None, "a")

    monkeypatch.setattr(ondemand_module, "WAIT_FOR_OTHER", 2.0)
    assert b.catalogue.mark("t.db", TenantState.hydrating, expected={before.state}, owner=ondemand.owner)
    conn_a.close()
    a.release("t.db", keep_lease=False)
    hydrated = ondemand.hydrate("t.db")
    assert hydrated.restored and dump(hydrated.path) == dump(path_a)
    assert (b.catalogue.get("t.db").host, b.catalogue.get("t.db").state) == ("b", TenantState.active)


def test_a_failover_plans_hydration_that_runs_after_the_host_came_back_takes_nothing(sharing):
    """The failover plan's job can run after the host it was sent for came back (a queue
    behind others): it must not take a tenant that host's application is using again. It
    checks at once that the host is still not seen and the tenant still its and active."""
    a, b = sharing
    path_a, conn_a = replicated_on(a)
    conn_a.close()
    a.close()  # host a dies with the tenant active
    lapse()
    b = Fleet(dataclasses.replace(b.config, failover_after=timedelta(seconds=10)), b.catalogue)
    now = datetime.now(timezone.utc)
    b.catalogue.heartbeat("a", now)  # a is back
    earlier_death = (now - timedelta(seconds=20)).isoformat()  # when the plan judged a dead
    assert OnDemand(b).hydrate("t.db", failover_from="a", dead_since=earlier_death) == Skipped("t.db", Skip.HOST_BACK)
    assert OnDemand(b).hydrate("t.db", failover_from="c", dead_since=earlier_death) == Skipped("t.db", Skip.HOST_BACK)
    assert OnDemand(b).hydrate("t.db", failover_from="a") == Skipped("t.db", Skip.HOST_BACK)  # an older version's job
    assert b.catalogue.get("t.db").host == "a" and not os.listdir(os.path.dirname(b.config.globs[0]))
    b.catalogue.heartbeat("a", now - timedelta(seconds=11))  # a not seen for longer than failover-after
    # A job of a's earlier death (redelivered after its worker died): a was seen since.
    assert OnDemand(b).hydrate("t.db", failover_from="a", dead_since=earlier_death) == Skipped("t.db", Skip.HOST_BACK)
    assert b.catalogue.get("t.db").host == "a" and not os.listdir(os.path.dirname(b.config.globs[0]))
    dead_since = (now - timedelta(seconds=11)).isoformat()
    hydrated = OnDemand(b).hydrate("t.db", failover_from="a", dead_since=dead_since)
    assert hydrated.restored and dump(hydrated.path) == dump(path_a) and b.catalogue.get("t.db").host == "b"
    b.close()
