"""Freezing on a schedule (``cold-after``) in both runtimes, and the freezing mark.

The embedded runner and a Celery worker (``python -m workers --storage --watch``, real
redis-server) archive idle tenants after ``archive-after`` and freeze them after
``cold-after``: each replica ends as one bundle object beside its lease, and hydration
brings every tenant back with its rows. A hydration that meets a freeze in progress waits
for it (the freeze deletes the LTX files a restore would read); a freezing mark left by a
process that died is undone.
"""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from scheduler import embedded
from tenantsync import cold, layout
from tenantsync.catalogue import TenantState, open_catalogue
from tenantsync.config import Config
from tenantsync.config import load as load_config
from tenantsync.fleet import Fleet
from tenantsync.ondemand import OnDemand
from tenantsync.outcome import Archived
from tenantsync.owner import this_process
from tenantsync.storage import open_storage

from .dbutil import app_db, dump, wait_for, write_rows
from .test_fleet_celery import child_env, children, wait_worker_ready, write_config  # noqa: F401 - fixture

HOST = "cold-host"


def written_tenants(tmp_path, count: int) -> dict[str, tuple[str, list]]:
    """``count`` tenants under data/, each written and closed (an application gone quiet):
    {name: (path, rows)}."""
    (tmp_path / "data").mkdir(exist_ok=True)
    out = {}
    for i in range(count):
        name = f"t{i}.db"
        path = str(tmp_path / "data" / name)
        conn = app_db(path)
        write_rows(conn, 20 + i)
        conn.close()
        out[name] = (path, dump(path))
    return out


def replica_objects(url: str, name: str) -> list[str]:
    return sorted(info.key for info in open_storage(url).child(name).list(""))


def all_in(catalogue, names, state: TenantState) -> bool:
    return all((r := catalogue.get(n)) is not None and r.state is state for n in names)


def assert_frozen_to_one_object(url: str, tenants: dict) -> None:
    for name in tenants:
        objects = replica_objects(url, name)
        bundles = [k for k in objects if k.startswith(layout.BUNDLE_PREFIX + "/")]
        assert len(bundles) == 1 and objects == bundles, (name, objects)  # the lapsed lease gone too


def test_the_embedded_runner_archives_then_freezes_idle_tenants_and_hydration_brings_them_back(tmp_path, file_url):
    tenants = written_tenants(tmp_path, 3)
    pattern = f"{tmp_path}/data/*.db"
    cfg = Config(replica=file_url, globs=(pattern,), catalogue=f"sqlite:///{tmp_path}/catalogue.db", host=HOST,
                 idle_after=timedelta(seconds=1), archive_after=((pattern, timedelta(seconds=2)),),
                 cold_after=((pattern, timedelta(seconds=2)),))
    stop = threading.Event()
    problems: list[str] = []
    runner = threading.Thread(target=embedded.run, args=(cfg, stop), kwargs={"report": problems.append}, daemon=True)
    runner.start()
    catalogue = open_catalogue(cfg)
    try:
        assert wait_for(lambda: all_in(catalogue, tenants, TenantState.frozen), 60), \
            {r.name: (r.state.value, r.last_error) for r in catalogue.records()}
        assert_frozen_to_one_object(file_url, tenants)
        fleet = Fleet(cfg, catalogue)
        try:
            for name, (path, rows) in tenants.items():
                hydrated = OnDemand(fleet).hydrate(name)
                assert hydrated.restored and dump(path) == rows
                assert catalogue.get(name).state is TenantState.active
        finally:
            fleet.close()
        conn = app_db(tenants["t0.db"][0])  # replication goes on from the thawed replica
        write_rows(conn, 3)
        conn.close()
        newest = dump(tenants["t0.db"][0])
        assert wait_for(lambda: any(k.startswith("ltx/0/") for k in replica_objects(file_url, "t0.db")), 20)
    finally:
        stop.set()
        runner.join(30)
    assert not runner.is_alive() and problems == []
    out = tmp_path / "check.db"
    fleet = Fleet(cfg, catalogue)
    try:
        assert cold.export(fleet, "t0.db", str(out)) and dump(str(out)) == newest
    finally:
        fleet.close()


@pytest.fixture
def fleet(tmp_path, file_url):
    (tmp_path / "data").mkdir(exist_ok=True)
    cfg = Config(replica=file_url, globs=(f"{tmp_path}/data/*.db",), catalogue=f"sqlite:///{tmp_path}/cat.db",
                 host=HOST, idle_after=timedelta(seconds=1))
    f = Fleet(cfg, open_catalogue(cfg))
    yield f
    f.close()


def archived(fleet, tmp_path) -> tuple[str, list]:
    tenants = written_tenants(tmp_path, 1)
    (name, (path, rows)), = tenants.items()
    fleet.catalogue.discover(name, path, HOST)
    fleet.sync(name)
    assert isinstance(OnDemand(fleet).archive(name), Archived)
    return path, rows


def test_a_hydration_waits_for_a_freeze_in_progress_and_then_thaws_the_bundle(tmp_path, fleet):
    """The freeze's mark is taken by this process, the hydration started in another thread
    must wait (not restore from LTX files about to go) until the freeze is done."""
    path, rows = archived(fleet, tmp_path)
    owner = this_process(HOST)
    assert fleet.catalogue.mark("t0.db", TenantState.freezing, expected={TenantState.archived}, owner=owner)
    with ThreadPoolExecutor(1) as pool:
        hydrating = pool.submit(OnDemand(fleet).hydrate, "t0.db")
        time.sleep(1.0)
        assert not hydrating.done() and fleet.catalogue.get("t0.db").state is TenantState.freezing
        cold.freeze(fleet.replica("t0.db"))  # what freeze_tenant does under its mark
        assert fleet.catalogue.unmark("t0.db", owner, state=TenantState.frozen)
        hydrated = hydrating.result(30)
    assert hydrated.restored and dump(path) == rows
    assert not any(k.startswith(layout.BUNDLE_PREFIX) for k in replica_objects(fleet.config.replica, "t0.db"))


def test_a_freezing_mark_left_by_a_dead_process_is_undone(tmp_path, fleet):
    path, rows = archived(fleet, tmp_path)
    dead = f"{HOST}/999999999/1"  # no such process on this host
    assert fleet.catalogue.mark("t0.db", TenantState.freezing, expected={TenantState.archived}, owner=dead)
    assert OnDemand(fleet).recover() == ["t0.db"]
    record = fleet.catalogue.get("t0.db")
    assert record.state is TenantState.archived and "died" in record.last_error
    assert cold.freeze_tenant(fleet, "t0.db").tenant == "t0.db"  # and it can be frozen again
    assert OnDemand(fleet).hydrate("t0.db").restored and dump(path) == rows


def test_a_celery_worker_freezes_its_hosts_tenants_on_schedule(tmp_path, redis_server, children):
    """``python -m workers --storage --watch``: the watcher's host plans archive, then send
    ``tenantsync.freeze`` to the host's queue; the worker freezes each tenant."""
    tenants = written_tenants(tmp_path, 3)
    config_path = write_config(tmp_path, redis_server.url, host=HOST, **{"idle-after": "1s", "archive-after": "2s",
                                                                         "cold-after": "2s"})
    cfg = load_config(config_path, env={})
    worker = children("solo", [sys.executable, "-m", "workers", "--storage", "--watch", "-c", "2",
                               "-n", "solo@%h"], child_env(config_path))
    wait_worker_ready(worker)
    catalogue = open_catalogue(cfg)
    assert wait_for(lambda: all_in(catalogue, tenants, TenantState.frozen) or not worker.alive(), 90), \
        ({r.name: (r.state.value, r.last_error) for r in catalogue.records()}, worker.tail())
    assert_frozen_to_one_object(cfg.replica, tenants)
    assert "tenantsync.freeze" in worker.log()
    worker.stop(30)
    fleet = Fleet(cfg, catalogue)
    try:
        for name, (path, rows) in tenants.items():
            assert OnDemand(fleet).hydrate(name).restored and dump(path) == rows
    finally:
        fleet.close()
