"""The embedded dispatcher: one pending sync per tenant, one queued maintenance job per
(job, tenant, arguments), syncs never behind maintenance, storage jobs in a child process."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading

import pytest

from scheduler.dispatch import InProcessDispatcher, StorageJobProcess
from tenantsync.capture import Capture
from tenantsync.catalogue import Catalogue
from tenantsync.config import Config
from tenantsync.errors import TenantSyncError
from tenantsync.replica import Replica
from tenantsync.storage import open_storage

from .dbutil import app_db, wait_for, write_rows


def make(jobs, **kw):
    results = []
    d = InProcessDispatcher(jobs, on_result=lambda job, r: results.append((job, r)), **kw)
    return d, results


def test_a_maintenance_job_is_queued_once_until_it_has_run():
    gate, started = threading.Event(), threading.Event()

    def compact(name, level=1):
        started.set()
        gate.wait(10)
        return {"tenant": name, "level": level}

    d, results = make({"compact": compact})
    try:
        d.submit("compact", "a", level=1)
        assert started.wait(5)
        for _ in range(5):  # the schedule offers it again while it runs
            d.submit("compact", "a", level=1)
        d.submit("compact", "a", level=2)  # other arguments: another job
        d.submit("compact", "b", level=1)  # another tenant
        gate.set()
        assert wait_for(lambda: len(results) == 3, 5)
        assert sorted((r["tenant"], r["level"]) for _, r in results) == [("a", 1), ("a", 2), ("b", 1)]
        d.submit("compact", "a", level=1)  # finished: may run again
        assert wait_for(lambda: len(results) == 4, 5)
    finally:
        gate.set()
        d.close()


def test_syncs_do_not_wait_behind_maintenance():
    gate = threading.Event()
    d, results = make({"compact": lambda name, level=1: gate.wait(10) and {},
                       "sync": lambda name: {"tenant": name}})
    try:
        for i in range(4):  # more long jobs than the maintenance pool has threads
            d.submit("compact", f"t{i}", level=1)
        d.request_sync("a")
        assert wait_for(lambda: ("sync", {"tenant": "a"}) in results, 5)
    finally:
        gate.set()
        d.close()


def test_a_write_during_a_sync_runs_it_once_more():
    gate, started = threading.Event(), threading.Event()
    calls = []

    def sync(name):
        calls.append(name)
        started.set()
        gate.wait(10)
        return {"tenant": name}

    d, _ = make({"sync": sync})
    try:
        assert d.request_sync("a")
        assert started.wait(5)
        assert not d.request_sync("a") and not d.request_sync("a")  # marked dirty, not queued
        gate.set()
        assert wait_for(d.idle, 5)
        assert calls == ["a", "a"]
    finally:
        gate.set()
        d.close()


def test_storage_jobs_run_in_a_niced_child_that_is_replaced_if_it_dies(tmp_path):
    url = f"file://{tmp_path}/replica"
    conn = app_db(tmp_path / "a.db")
    capture = Capture(str(tmp_path / "a.db"), Replica(open_storage(url).child("a.db")))
    for _ in range(3):
        write_rows(conn, 5)
        capture.sync_once()
    cfg = Config(replica=url, globs=(f"{tmp_path}/*.db",), catalogue=f"sqlite:///{tmp_path}/c.db", host="h")
    Catalogue(cfg.catalogue).discover("a.db", str(tmp_path / "a.db"), "h")
    jobs = StorageJobProcess(cfg)
    others = {p.pid for p in multiprocessing.active_children()}  # left by other tests, if any
    try:
        result = jobs.job("compact")("a.db", level=1, force=True)
        assert result["file"] == "0000000000000001-0000000000000003.ltx"
        (child,) = [p for p in multiprocessing.active_children() if p.pid not in others]
        assert child.pid != os.getpid()
        assert os.getpriority(os.PRIO_PROCESS, child.pid) == os.getpriority(os.PRIO_PROCESS, 0) + jobs.NICE
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        with pytest.raises(TenantSyncError, match="storage-job process died"):
            jobs.job("retain")("a.db")
        assert jobs.job("compact")("a.db", level=1) == {"tenant": "a.db", "level": 1, "file": None}  # a new child
    finally:
        jobs.close()
