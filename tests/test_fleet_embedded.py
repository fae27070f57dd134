"""The embedded fleet: one process watching a glob, jobs in-process, SQLite catalogue."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from datetime import timedelta

import pytest

from scheduler import embedded
from tenantsync.catalogue import open_catalogue
from tenantsync.config import Config
from tenantsync.ondemand import open_by_others
from tenantsync.outcome import Shipped, Written
from tenantsync.replica import Replica
from tenantsync.restore import restore
from tenantsync.storage import open_storage
from tenantsync.tenants import shard

from .dbutil import app_db, dump, wait_for, write_rows


def fleet_config(tmp_path, url, **kw) -> Config:
    return Config(
        replica=url,
        globs=(f"{tmp_path}/data/*.db",),
        catalogue=f"sqlite:///{tmp_path}/catalogue.db",
        host="test-host",
        idle_after=timedelta(seconds=kw.pop("idle_after", 2)),
        **kw,
    )



def tenant_dbs(tmp_path, names, rows=5):
    """Application databases under ``data/`` with ``rows`` rows each, connections kept
    open as an application's would be: ({name: path}, {name: connection})."""
    paths, conns = {}, {}
    for name in names:
        paths[name] = str(tmp_path / "data" / name)
        conns[name] = app_db(paths[name])
        write_rows(conns[name], rows)
    return paths, conns


def assert_replicas_match(tmp_path, url, paths, wait: float = 0.0):
    """Every tenant's replica restores to its source's content; with ``wait``, allowing that
    long for the last writes, whose events the watcher may not have handled yet when the
    catalogue said caught up (a write never shipped never matches)."""
    storage = open_storage(url)
    deadline = time.monotonic() + wait
    for name, path in paths.items():
        out = tmp_path / "restored" / name
        while True:
            restore(Replica(storage.child(name)), str(out), force=True)
            if time.monotonic() >= deadline or dump(str(out)) == dump(path):
                break
            time.sleep(0.2)
        assert dump(str(out)) == dump(path), name


@contextlib.contextmanager
def fleet_thread(cfg: Config, processes: int = 1):
    """The embedded fleet in a thread for the block: yields (results, problems), the
    ``(job, outcome)`` of every job and the lines reported; stops it after, and fails if
    it does not end."""
    stop = threading.Event()
    results, problems = [], []
    thread = threading.Thread(
        target=embedded.run, args=(cfg, stop),
        kwargs=dict(report=problems.append, on_result=lambda job, r: results.append((job, r)),
                    processes=processes),
        daemon=True,
    )
    thread.start()
    try:
        yield results, problems
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive(), "the embedded fleet did not stop within 30 s"


@pytest.fixture
def running(tmp_path, file_url):
    """Start the embedded fleet in a thread; yields (config, results list); stops it after."""
    (tmp_path / "data").mkdir()
    with contextlib.ExitStack() as started:
        def start(processes=1, **kw):
            cfg = fleet_config(tmp_path, file_url, **kw)
            results, problems = started.enter_context(fleet_thread(cfg, processes))
            return cfg, results, problems

        yield start


def test_every_tenant_written_at_random_is_replicated(tmp_path, file_url, running):
    paths, conns = tenant_dbs(tmp_path, [f"t{i:03d}.db" for i in range(30)])
    cfg, results, problems = running()
    rng = random.Random(7)
    for _ in range(200):
        write_rows(conns[rng.choice(list(conns))], rng.randint(1, 5))
        time.sleep(0.005)
    catalogue = open_catalogue(cfg)

    def caught_up():
        return all((t.txid or 0) > 0 and t.last_sync_at and (t.last_write_at is None or t.last_sync_at >= t.last_write_at)
                   for t in catalogue.records())

    assert wait_for(caught_up, 30)
    assert_replicas_match(tmp_path, file_url, paths, wait=10)
    assert problems == []


def test_a_restart_syncs_only_the_tenants_written_while_the_fleet_was_stopped(tmp_path, file_url):
    """A deploy restarts the fleet over tenants it stopped cleanly. Those written while it
    was down (in the WAL, or in the main file out of WAL mode) and one that appeared
    meanwhile are synced at once, since their commits sent no event; the others cost no
    pass, which with thousands of tenants would queue ahead of their new writes. Every
    replica restores to its source."""
    (tmp_path / "data").mkdir()
    paths, conns = tenant_dbs(tmp_path, [f"t{i:02d}.db" for i in range(12)])
    cfg = fleet_config(tmp_path, file_url, idle_after=60)
    catalogue = open_catalogue(cfg)

    def run_until(done):
        with fleet_thread(cfg) as (results, _problems):
            assert wait_for(done, 30)
            time.sleep(1.0)  # room for any other sync the start would ask for
        return sorted(r.tenant for job, r in results if job == "sync")

    assert len(run_until(lambda: [t.txid for t in catalogue.records()] == [1] * 12)) >= 12
    write_rows(conns["t03.db"], 2)
    conns["t07.db"].execute("PRAGMA journal_mode=DELETE")
    write_rows(conns["t07.db"], 2)
    paths["t12.db"] = str(tmp_path / "data" / "t12.db")
    conns["t12.db"] = app_db(paths["t12.db"])
    write_rows(conns["t12.db"], 1)

    def written_shipped():
        return all((record := catalogue.get(name)) is not None and record.txid == txid
                   for name, txid in (("t03.db", 2), ("t07.db", 2), ("t12.db", 1)))

    assert set(run_until(written_shipped)) == {"t03.db", "t07.db", "t12.db"}
    assert_replicas_match(tmp_path, file_url, paths)
    for conn in conns.values():
        conn.close()
    catalogue.close()


def test_tenants_are_shared_by_processes_and_a_killed_one_is_replaced(tmp_path, file_url, running):
    """With ``processes=2`` (``tenantsync watch`` on a 2-CPU host) half of the tenants are
    synced by a child process; SIGKILL of that child loses nothing: its jobs in flight fail,
    a new child takes the next ones, and catch-up ships what was written meanwhile."""
    names = [f"t{i:03d}.db" for i in range(20)]
    paths, conns = tenant_dbs(tmp_path, names)
    for conn in conns.values():
        conn.close()  # no application connection in this process while the watcher reads headers
    cfg, results, problems = running(processes=2)
    catalogue = open_catalogue(cfg)

    def caught_up():
        return all((t.txid or 0) > 0 and t.last_sync_at and (t.last_write_at is None or t.last_sync_at >= t.last_write_at)
                   for t in catalogue.records()) and len(catalogue.records()) == len(names)

    assert wait_for(caught_up, 30)
    conns = {name: app_db(path) for name, path in paths.items()}
    in_child = [n for n in names if shard(n, 2) == 1]
    assert 0 < len(in_child) < len(names)
    rng = random.Random(11)
    for round_ in range(3):
        for _ in range(60):
            write_rows(conns[rng.choice(names)], rng.randint(1, 3))
            time.sleep(0.005)
        if round_ == 1:  # kill the child while tenants are open in it
            holders = set()
            assert wait_for(lambda: holders.update(open_by_others([paths[n] for n in in_child])) or
                            holders - {os.getpid()}, 10)
            (child,) = holders - {os.getpid()}
            os.kill(child, signal.SIGKILL)
    assert wait_for(caught_up, 60)
    assert_replicas_match(tmp_path, file_url, paths, wait=10)
    assert problems == []


def test_non_sqlite_files_and_bad_names_are_reported_once_and_skipped(tmp_path, file_url, running):
    good = str(tmp_path / "data" / "good.db")
    write_rows(app_db(good), 3)
    (tmp_path / "data" / "notes.db").write_text("not a database" * 20)
    (tmp_path / "data" / "bad name.db").write_bytes(open(good, "rb").read())
    cfg, results, problems = running()
    catalogue = open_catalogue(cfg)
    assert wait_for(lambda: any(t.name == "good.db" and t.txid for t in catalogue.records()))
    (tmp_path / "data" / "notes.db").write_text("still not a database" * 20)
    time.sleep(1.5)
    assert sorted(problems) == sorted([
        f"skipping {tmp_path}/data/bad name.db: tenant name 'bad name.db' is not allowed "
        "(segments of letters, digits, '.', '_', '-', not starting with a punctuation mark, at most 255 characters)",
        f"skipping {tmp_path}/data/notes.db: not a SQLite database",
    ])
    assert [t.name for t in catalogue.records()] == ["good.db"]


def test_new_databases_are_picked_up_as_they_appear(tmp_path, file_url, running):
    cfg, results, problems = running()
    time.sleep(0.3)
    path = str(tmp_path / "data" / "late.db")
    conn = app_db(path)
    write_rows(conn, 4)
    catalogue = open_catalogue(cfg)
    assert wait_for(lambda: any(t.name == "late.db" and t.txid for t in catalogue.records()), 10)
    write_rows(conn, 4)
    assert wait_for(lambda: catalogue.get("late.db").txid >= 2, 10)
    assert_replicas_match(tmp_path, file_url, {"late.db": path})


def test_idle_tenants_are_released_and_resume_without_a_full_upload(tmp_path, file_url, running):
    path = str(tmp_path / "data" / "a.db")
    conn = app_db(path)
    write_rows(conn, 10)
    cfg, results, problems = running(idle_after=0.5)
    catalogue = open_catalogue(cfg)
    assert wait_for(lambda: (catalogue.get("a.db") or None) and catalogue.get("a.db").txid == 1)
    assert wait_for(lambda: (catalogue.get("a.db").position or {}).get("backfilled"), 15)
    write_rows(conn, 3)
    assert wait_for(lambda: catalogue.get("a.db").txid == 2, 10)
    syncs = [r for job, r in results if isinstance(r, Shipped) and r.txid == 2]
    assert syncs and syncs[0].full is None
    assert_replicas_match(tmp_path, file_url, {"a.db": path})


def test_a_commit_after_every_connection_closed_is_replicated(tmp_path, file_url, running):
    """The last connection's close deletes the -wal; the next commit recreates it (an
    *added* event, no *modified*), and a connection that commits and closes at once may
    even delete it again before the watcher looks. Both are writes; an empty -wal (a
    connection only opening, like a sync job's own) is not."""
    path = str(tmp_path / "data" / "a.db")
    conn = app_db(path)
    write_rows(conn, 10)
    conn.close()
    cfg, results, problems = running(idle_after=0.3)
    catalogue = open_catalogue(cfg)
    assert wait_for(lambda: (catalogue.get("a.db") or None) and catalogue.get("a.db").txid == 1)
    assert wait_for(lambda: (catalogue.get("a.db").position or {}).get("backfilled"), 15)
    for expected in (2, 3):
        time.sleep(1.0)  # released: no connection of ours either
        conn = app_db(path)
        write_rows(conn, 5)
        conn.close()
        assert wait_for(lambda: catalogue.get("a.db").txid == expected, 10), expected
    assert_replicas_match(tmp_path, file_url, {"a.db": path})


def test_open_tenants_are_capped_by_releasing_the_least_recent(tmp_path, file_url):
    """Past ``max_open`` (derived from RLIMIT_NOFILE) the least recently synced tenant is
    released before another opens; released tenants resume without a full upload."""
    from tenantsync.fleet import Fleet

    (tmp_path / "data").mkdir()
    cfg = fleet_config(tmp_path, file_url)
    fleet = Fleet(cfg, open_catalogue(cfg))
    fleet.max_open = 3
    paths, conns = tenant_dbs(tmp_path, [f"t{i}.db" for i in range(8)])
    for name, path in paths.items():
        fleet.catalogue.discover(name, path, cfg.host)
    for rnd in range(3):
        for name in paths:
            write_rows(conns[name], 2)
            result = fleet.sync(name)
            assert result.txid == rnd + 1, (name, result)
            assert rnd == 0 or result.full is None, (name, result)  # resumed, not re-uploaded
            assert len(fleet._active) <= 3
    assert sorted(fleet._active) == ["t5.db", "t6.db", "t7.db"]
    fleet.close()
    assert_replicas_match(tmp_path, file_url, paths)


def test_past_the_trim_mark_the_release_thread_releases_the_least_recent(tmp_path, file_url):
    """Between ``trim_to`` and ``max_open`` syncs release nothing themselves; the release
    thread brings the open tenants back to ``trim_to``, least recently synced first."""
    from tenantsync.fleet import Fleet

    (tmp_path / "data").mkdir()
    cfg = fleet_config(tmp_path, file_url, idle_after=3600)
    fleet = Fleet(cfg, open_catalogue(cfg))
    fleet.max_open, fleet.trim_to = 6, 3
    names = [f"t{i}.db" for i in range(6)]
    paths, _conns = tenant_dbs(tmp_path, names)
    for name in names:
        fleet.catalogue.discover(name, paths[name], cfg.host)
        fleet.sync(name)
    assert sorted(fleet._active) == names  # no inline release below max_open
    stop = threading.Event()
    releaser = threading.Thread(target=fleet.release_idle_every, args=(3600, stop), daemon=True)
    releaser.start()
    try:
        assert wait_for(lambda: len(fleet._active) == 3, 10)
        assert sorted(fleet._active) == names[3:]
    finally:
        stop.set()
        releaser.join(10)
    states = {t.name: t.state.value for t in fleet.catalogue.records()}
    assert states == {**{n: "idle" for n in names[:3]}, **{n: "active" for n in names[3:]}}
    fleet.close()


def one_tenant_fleet(tmp_path, file_url, lease_ttl: float):
    """A Fleet in this process with tenant a.db (5 rows, its connection kept open) and a
    Leaser of another owner to read the lease with: (config, fleet, path, conn, leaser)."""
    from tenantsync.fleet import Fleet
    from tenantsync.lease import Leaser

    (tmp_path / "data").mkdir()
    cfg = fleet_config(tmp_path, file_url, lease_ttl=timedelta(seconds=lease_ttl))
    fleet = Fleet(cfg, open_catalogue(cfg))
    path = str(tmp_path / "data" / "a.db")
    conn = app_db(path)
    write_rows(conn, 5)
    fleet.catalogue.discover("a.db", path, cfg.host)
    return cfg, fleet, path, conn, Leaser(fleet.storage.child("a.db"), owner="someone-else", ttl=cfg.lease_ttl)


def test_an_idle_release_keeps_the_lease_until_it_expires(tmp_path, file_url):
    """A tenant woken within the TTL after an idle release writes no lease at all; a
    shutdown gives every lease up, kept ones included, so another host takes over at once."""
    from datetime import datetime, timezone

    cfg, fleet, path, conn, leaser = one_tenant_fleet(tmp_path, file_url, lease_ttl=60)

    assert fleet.sync("a.db").txid == 1
    taken = leaser.read()
    assert fleet.release_idle(0) == ["a.db"] and "a.db" not in fleet._active
    assert leaser.read() == taken  # not released, not rewritten
    write_rows(conn, 2)
    assert fleet.sync("a.db").txid == 2  # woken: the kept lease, fenced as before
    assert leaser.read() == taken
    assert fleet.catalogue.get("a.db").lease_holder == cfg.host

    fleet.release_idle(0)
    fleet.shutdown()  # the kept lease is given up too
    released = leaser.read()
    assert released.etag != taken.etag and released.expires_at < datetime.now(timezone.utc)
    assert leaser.acquire().generation == taken.generation + 1  # another host, at once
    assert_replicas_match(tmp_path, file_url, {"a.db": path})


def test_a_stop_releases_its_tenants_side_by_side_and_frees_every_lease(tmp_path, s3_proxy, proxied_s3_url):
    """A stop ships each open tenant's tail, checkpoints it and gives up its lease on many
    threads at once, and gives up the leases kept by earlier idle releases the same way
    (one after another, each a few round trips, thousands of them outlast a service
    manager's stop timeout). The proxy sees the requests overlap; every tail is in its
    replica and every lease is free for the next host."""
    from datetime import datetime, timezone

    from tenantsync.fleet import Fleet
    from tenantsync.lease import Leaser

    (tmp_path / "data").mkdir()
    cfg = fleet_config(tmp_path, proxied_s3_url, sync_threads=8, lease_ttl=timedelta(seconds=300))
    fleet = Fleet(cfg, open_catalogue(cfg))
    names = [f"t{i:02d}.db" for i in range(24)]
    paths, conns = tenant_dbs(tmp_path, names)
    for name, path in paths.items():
        fleet.catalogue.discover(name, path, cfg.host)
        assert fleet.sync(name).txid == 1
    idle, open_ = names[:8], names[8:]
    for name in idle:  # released earlier, their leases kept until they expire
        assert fleet.release(name, keep_lease=True)
    for name in open_:  # a tail only the stop's final pass ships
        write_rows(conns[name], 3)
    s3_proxy.set_rtt(0.05)
    s3_proxy.reset_stats()
    fleet.shutdown()
    s3_proxy.set_rtt(0)
    assert s3_proxy.stats()["max_in_flight"] > 1
    assert not fleet._active and not fleet._leases
    now = datetime.now(timezone.utc)
    for name in names:
        assert Leaser(fleet.storage.child(name), owner="next-host", ttl=cfg.lease_ttl).read().expires_at < now, name
        assert fleet.catalogue.get(name).lease_holder is None, name
    assert_replicas_match(tmp_path, proxied_s3_url, paths)


def test_an_idle_release_with_nothing_to_ship_writes_no_lease(tmp_path, file_url):
    """Releasing a tenant whose lease lapsed since its last sync: with nothing new in the
    WAL it only checkpoints locally (no lease write); with a tail it takes the lease and
    ships it first. Either way the next wake-up resumes without a full upload."""
    cfg, fleet, path, conn, leaser = one_tenant_fleet(tmp_path, file_url, lease_ttl=1)

    assert fleet.sync("a.db").txid == 1
    taken = leaser.read()
    time.sleep(1.2)  # the lease lapses
    assert fleet.release_idle(0) == ["a.db"]
    assert leaser.read() == taken  # no lease write for a release that ships nothing
    record = fleet.catalogue.get("a.db")
    assert record.state.value == "idle" and record.position["backfilled"]

    write_rows(conn, 2)
    woken = fleet.sync("a.db")
    assert (woken.txid, woken.full) == (2, None)  # resumed from the released position
    taken = leaser.read()
    write_rows(conn, 3)  # a tail the release must ship
    time.sleep(1.2)
    assert fleet.release_idle(0) == ["a.db"]
    assert leaser.read().etag != taken.etag  # lease taken again to ship it
    assert fleet.catalogue.get("a.db").txid == 3
    fleet.close()
    assert_replicas_match(tmp_path, file_url, {"a.db": path})


def test_a_commit_racing_an_idle_release_after_the_lease_lapsed_costs_no_full_upload(tmp_path, file_url,
                                                                                      monkeypatch):
    """The idle release of a tenant whose lease lapsed ships nothing and takes no lease; a
    commit landing just before its checkpoint barrier is then a tail it may not ship. The
    checkpoint must leave it in the WAL: copied into the main file, it let the application
    restart the WAL, and the next sync uploaded the whole database (seen as a full-page file
    by the process that wrote the file before it, in the two-host chaos test)."""
    cfg, fleet, path, conn, leaser = one_tenant_fleet(tmp_path, file_url, lease_ttl=1)
    write_rows(conn, 200)
    assert fleet.sync("a.db").txid == 1
    time.sleep(1.2)  # the lease lapses
    capture = fleet._active["a.db"].capture
    take_barrier = capture._take_barrier

    def commit_first(wait):
        write_rows(conn, 1)
        return take_barrier(wait)

    monkeypatch.setattr(capture, "_take_barrier", commit_first)
    assert fleet.release_idle(0) == ["a.db"]
    write_rows(conn, 1)  # would restart the WAL, had the release copied the tail
    woken = fleet.sync("a.db")
    assert (woken.txid, woken.full) == (2, None)
    assert woken.pages < 20
    fleet.close()
    assert_replicas_match(tmp_path, file_url, {"a.db": path})


def test_a_released_tenant_is_freed_without_the_garbage_collector(tmp_path, file_url):
    """Once released, a tenant's capture and its state are freed by reference counting: a
    leftover cycle per tenant would be left for full collections, which traverse every
    released tenant and stop every thread of the worker while they do."""
    import gc
    import weakref

    cfg, fleet, path, conn, leaser = one_tenant_fleet(tmp_path, file_url, lease_ttl=30)
    gc.collect()
    gc.disable()
    try:
        write_rows(conn, 2)
        assert isinstance(fleet.sync("a.db"), Shipped)
        capture = weakref.ref(fleet._active["a.db"].capture)
        assert fleet.release_idle(0) == ["a.db"]
        assert capture() is None
    finally:
        gc.enable()
        fleet.close()


def test_an_idle_release_of_a_tenant_without_a_wal_writes_no_lease(tmp_path, file_url):
    """A tenant copied in without a WAL (or restored) is shipped whole by its first pass;
    its idle release then has nothing to ship and must not take a lease either (at start-up
    that was one conditional, fsynced lease write per tenant, all in the first minute)."""
    cfg, fleet, path, conn, leaser = one_tenant_fleet(tmp_path, file_url, lease_ttl=1)
    conn.close()  # the last connection: SQLite copies the WAL into the file and removes it
    assert not os.path.exists(path + "-wal")
    assert fleet.sync("a.db").txid == 1
    taken = leaser.read()
    time.sleep(1.2)  # the lease lapses
    assert fleet.release_idle(0) == ["a.db"]
    assert leaser.read() == taken
    conn = app_db(path)
    write_rows(conn, 2)
    woken = fleet.sync("a.db")
    assert (woken.txid, woken.full) == (2, None)
    fleet.close()
    assert_replicas_match(tmp_path, file_url, {"a.db": path})


def test_compaction_runs_in_the_storage_job_process(tmp_path, file_url, running, monkeypatch):
    from tenantsync.levels import Levels
    from tenantsync.fleet import Fleet

    def in_this_process(*args, **kwargs):
        raise AssertionError("compaction ran in the watcher's process")

    monkeypatch.setattr(Fleet, "compact", in_this_process)  # the spawned child imports its own

    path = str(tmp_path / "data" / "a.db")
    conn = app_db(path)
    write_rows(conn, 5)
    levels = Levels(intervals={1: timedelta(seconds=1), 2: timedelta(minutes=5), 3: timedelta(hours=1)})
    cfg, results, problems = running(levels=levels)
    for _ in range(3):
        write_rows(conn, 3)
        time.sleep(0.3)
    replica = Replica(open_storage(file_url).child("a.db"))
    assert wait_for(lambda: any(isinstance(r, Written) and r.job == "compact" for job, r in results), 20)
    assert replica.files(1), "no level-1 file was written"
    assert_replicas_match(tmp_path, file_url, {"a.db": path})
    assert problems == []


def test_compaction_and_snapshot_times_reach_the_catalogue_many_per_write(tmp_path, file_url, monkeypatch):
    """Storage jobs note their times and write them together, at most every
    STORAGE_TIMES_EVERY seconds and at close: one catalogue write per tenant per round had a
    niced process holding the host's catalogue write lock thousands of times per round."""
    from tenantsync import fleet as fleet_mod
    from tenantsync.fleet import Fleet

    (tmp_path / "data").mkdir()
    cfg = fleet_config(tmp_path, file_url)
    fleet = Fleet(cfg, open_catalogue(cfg))
    names = ["a.db", "b.db"]
    paths, conns = tenant_dbs(tmp_path, names)
    for name in names:
        fleet.catalogue.discover(name, paths[name], cfg.host)
        for _ in range(2):
            write_rows(conns[name], 1)
            fleet.sync(name)
    writes = []
    record = fleet.catalogue.record_storage_times
    monkeypatch.setattr(fleet.catalogue, "record_storage_times",
                        lambda **kw: (writes.append(kw), record(**kw))[1])
    monkeypatch.setattr(fleet_mod, "STORAGE_TIMES_EVERY", 3600.0)
    assert fleet.compact("a.db", 1, force=True).file
    assert fleet.snapshot("b.db", force=True).file
    assert writes == [] and fleet.catalogue.get("a.db").last_compact_at is None  # not yet
    monkeypatch.setattr(fleet_mod, "STORAGE_TIMES_EVERY", 0.0)
    assert fleet.compact("b.db", 1, force=True).file  # due now: everything gathered goes out
    assert len(writes) == 1 and set(writes[0]["compacted"]) == {"a.db", "b.db"}
    assert set(writes[0]["snapshotted"]) == {"b.db"}
    monkeypatch.setattr(fleet_mod, "STORAGE_TIMES_EVERY", 3600.0)  # from the write just made
    write_rows(conns["a.db"], 1)
    fleet.sync("a.db")
    assert fleet.snapshot("a.db", force=True).file
    fleet.close()  # the rest at close
    assert len(writes) == 2 and set(writes[1]["snapshotted"]) == {"a.db"}
    rows = {t.name: t for t in fleet.catalogue.records()}
    assert rows["a.db"].last_compact_at and rows["b.db"].last_compact_at
    assert rows["a.db"].last_snapshot_at and rows["b.db"].last_snapshot_at
