"""The embedded dispatcher: one pending sync per tenant, one queued maintenance job per
(job, tenant, arguments), syncs never behind maintenance; jobs in child processes."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from scheduler import admission
from scheduler.dispatch import InProcessDispatcher
from scheduler.job_process import JobProcess, fleet_jobs
from tenantsync.capture import Capture
from tenantsync.catalogue import open_catalogue
from tenantsync.config import Config
from tenantsync.errors import DatabaseError, StorageUnavailable, TenantSyncError, WorkerDied
from tenantsync.outcome import Contended, Contention, Failed, NothingNew, Shipped, Skip, Skipped, Written, failed
from tenantsync.tenants import shard
from tenantsync.replica import Replica
from tenantsync.storage import open_storage

from .dbutil import app_db, process_gone, wait_for, write_rows


def make(jobs, **kw):
    results = []
    d = InProcessDispatcher(jobs, on_result=lambda job, r: results.append((job, r)), **kw)
    return d, results


def test_a_maintenance_job_is_queued_once_until_it_has_run():
    gate, started = threading.Event(), threading.Event()

    def compact(name, level=1):
        started.set()
        gate.wait(10)
        return Written(name, "compact", "f.ltx", level)

    d, results = make({"compact": compact})
    try:
        d.submit("compact", ["a"], level=1)
        assert started.wait(5)
        for _ in range(5):  # the schedule offers it again while it runs
            d.submit("compact", ["a"], level=1)
        d.submit("compact", ["a"], level=2)  # other arguments: another job
        d.submit("compact", ["b"], level=1)  # another tenant
        gate.set()
        assert wait_for(lambda: len(results) == 3, 5)
        assert sorted((r.tenant, r.level) for _, r in results) == [("a", 1), ("a", 2), ("b", 1)]
        d.submit("compact", ["a"], level=1)  # finished: may run again
        assert wait_for(lambda: len(results) == 4, 5)
    finally:
        gate.set()
        d.close()


def test_batched_jobs_go_out_32_tenants_at_a_time_once_per_tenant_until_finished(caplog):
    """The embedded storage jobs: a plan's 70 compactions are three calls into the storage
    process; a tenant's failure is logged and the rest of its batch reported, and it may be
    offered again after; a batch that fails as a whole is one log line, and one with storage
    unreachable is re-offered after a backoff, then may be offered again."""
    gate, reachable, calls = threading.Event(), threading.Event(), []

    def compact(names, level=1):
        calls.append(list(names))
        gate.wait(10)
        if names[0] == "down" and not reachable.is_set():
            raise StorageUnavailable("s3://bucket: connection refused")
        return {n: Failed(n, DatabaseError(f"{n}: cannot open database")) if n == "t5"
                else Written(n, "compact", "f.ltx", level) for n in names}

    names = [f"t{i}" for i in range(70)]
    d, results = make({"compact": compact}, batched=("compact",))
    try:
        assert d.submit("compact", names, level=1) == 70
        assert wait_for(lambda: len(calls) == 1, 5)
        assert d.submit("compact", names, level=1) == 0  # queued or running: not again
        gate.set()
        assert wait_for(lambda: len(results) == 70, 5)
        assert [r.tenant for _, r in results if isinstance(r, Failed)] == ["t5"]
        assert [len(c) for c in calls] == [32, 32, 6] and sum(calls, []) == names
        assert "compact t5 failed: t5: cannot open database" in caplog.text
        assert d.submit("compact", ["t5", "t6"], level=1) == 2  # finished: offered again
        assert d.submit("compact", ["down", "t7"], level=1) == 2
        assert wait_for(lambda: len(calls) == 5, 5)
        assert wait_for(lambda: "compact of 2 tenants (down, ...) failed: s3://bucket: connection refused"
                        in caplog.text, 5)
        assert d.submit("compact", ["down"], level=1) == 0  # re-offered after a backoff: still admitted
        reachable.set()
        assert wait_for(lambda: len(calls) == 6, 5) and calls[5] == ["down", "t7"]
        assert wait_for(lambda: d.submit("compact", ["down"], level=1) == 1, 5)
    finally:
        gate.set()
        d.close()


def test_storage_batches_wait_while_most_sync_threads_are_busy_but_not_forever(monkeypatch):
    import scheduler.dispatch as dispatch

    monkeypatch.setattr(dispatch, "STORAGE_YIELDS_FOR", 60.0)
    gate, ran = threading.Event(), []
    d, _ = make({"sync": lambda name: gate.wait(30) and NothingNew(name),
                 "compact": lambda names, level=1: ran.extend(names) or {n: NothingNew(n) for n in names}},
                workers=4, batched=("compact",))
    try:
        d.request_sync("a")
        d.request_sync("b")  # two of four threads busy: storage goes on
        d.submit("compact", ["t0"])
        assert wait_for(lambda: ran == ["t0"], 5)
        d.request_sync("c")  # three of four: it waits
        d.submit("compact", ["t1"])
        time.sleep(0.5)
        assert ran == ["t0"]
        gate.set()  # the syncs end: it goes (long before STORAGE_YIELDS_FOR)
        assert wait_for(lambda: ran == ["t0", "t1"], 5)
        gate.clear()
        for name in ("d", "e", "f"):
            d.request_sync(name)
        monkeypatch.setattr(dispatch, "STORAGE_YIELDS_FOR", 0.5)
        d.submit("compact", ["t2"])  # syncs stay busy: it goes anyway after the limit
        assert wait_for(lambda: ran == ["t0", "t1", "t2"], 5)
    finally:
        gate.set()
        d.close()


def test_closing_finishes_syncs_and_running_jobs_and_drops_queued_ones():
    gate, started, ran = threading.Event(), threading.Event(), []

    def compact(names, level=1):
        started.set()
        gate.wait(10)
        ran.extend(names)
        return {n: Written(n, "compact", "f.ltx") for n in names}

    d, results = make({"compact": compact, "sync": NothingNew}, batched=("compact",))
    assert d.submit("compact", [f"t{i}" for i in range(3200)]) == 3200  # 100 batches
    assert started.wait(5)
    d.request_sync("a")
    threading.Timer(0.5, gate.set).start()
    d.close()
    assert ran == [f"t{i}" for i in range(32)] and ("sync", NothingNew("a")) in results


def test_syncs_do_not_wait_behind_maintenance():
    gate = threading.Event()
    d, results = make({"compact": lambda name, level=1: gate.wait(10) and Written(name, "compact", "f.ltx"),
                       "sync": NothingNew})
    try:
        for i in range(4):  # more long jobs than the maintenance pool has threads
            d.submit("compact", [f"t{i}"], level=1)
        d.request_sync("a")
        assert wait_for(lambda: ("sync", NothingNew("a")) in results, 5)
    finally:
        gate.set()
        d.close()


def test_a_slow_shard_does_not_hold_the_sync_threads_of_another():
    gate = threading.Event()
    slow = [f"s{i}" for i in range(40) if shard(f"s{i}", 2) == 1][:6]
    fast = next(f"f{i}" for i in range(40) if shard(f"f{i}", 2) == 0)
    d, results = make({"sync": lambda name: (name in slow and gate.wait(10)) or NothingNew(name)},
                      workers=2, shards=2)
    try:
        for name in slow:  # more than shard 1's threads, all stuck in its process
            d.request_sync(name)
        d.request_sync(fast)
        assert wait_for(lambda: ("sync", NothingNew(fast)) in results, 5)
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
        return NothingNew(name)

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


def test_a_contended_sync_is_offered_again_after_its_retry_after_and_stays_pending_meanwhile():
    outcomes = [Contended("a", Contention.LEASE_HELD, 0.2), Contended("a", Contention.TXID_TAKEN, 0.2),
                Shipped("a", 7, 1, 4096), NothingNew("a")]
    calls = []

    def sync(name):
        calls.append(time.monotonic())
        return outcomes[len(calls) - 1]

    d, results = make({"sync": sync})
    try:
        assert d.request_sync("a")
        assert wait_for(lambda: len(calls) == 1, 5)
        assert not d.request_sync("a")  # still pending while contended: only marked dirty
        assert wait_for(lambda: ("sync", outcomes[2]) in results, 5)
        assert wait_for(d.idle, 5)
        # Each re-offer after about retry_after (0.5 to 1.5 times it); the dirty mark is
        # taken by the sync that shipped, not left for another run.
        assert len(calls) == 4 and all(b - a >= 0.1 for a, b in zip(calls, calls[1:3]))
    finally:
        d.close()


def test_once_the_store_answers_again_the_syncs_waiting_out_a_backoff_run_at_once_longest_failing_first(monkeypatch):
    """An outage parks every failing tenant on its exponential backoff; the first sync that
    ships (here: a fresh tenant's) shows the store is back, and the parked ones run then, in
    the order they started failing, not when their backoffs end."""
    monkeypatch.setattr(admission, "_jitter", lambda seconds: 30 * seconds)  # a long outage's backoff
    up = threading.Event()
    calls: list[tuple[str, bool]] = []

    def sync(name):
        calls.append((name, up.is_set()))
        if not up.is_set():
            return failed(name, StorageUnavailable("store unreachable"))
        return Shipped(name, 1, 1, 4096)

    d, results = make({"sync": sync}, workers=1)
    try:
        for name in ("t1", "t2", "t3"):
            assert d.request_sync(name)
            assert wait_for(lambda: (name, False) in calls, 5)
        assert not d.request_sync("t2")  # parked: still pending, a write only marks it dirty
        up.set()
        assert d.request_sync("probe")
        # Within 5 s, not after their 30-s backoff.
        assert wait_for(lambda: all(("sync", Shipped(n, 1, 1, 4096)) in results for n in ("t1", "t2", "t3")), 5)
        after = [name for name, was_up in calls if was_up]
        assert list(dict.fromkeys(after)) == ["probe", "t1", "t2", "t3"]  # t2 twice: its dirty mark
        assert wait_for(d.idle, 5)
    finally:
        d.close()


def _test_jobs(marker: str):
    """A child's jobs for the tests below (spawned children import this module)."""
    def slow(name, seconds):
        time.sleep(seconds)
        return {"tenant": name}

    def fail(name, picklable):
        if picklable:
            raise DatabaseError(f"{name}: cannot open database")
        raise _Unpicklable(name)

    # Four jobs that each wait for the other three: they all return only if the child runs
    # them side by side, else the barrier times out and every one fails.
    together = threading.Barrier(4, timeout=10)

    def meet(name):
        together.wait()
        return {"tenant": name}

    jobs = {"pid": lambda name: {"pid": os.getpid()}, "slow": slow, "fail": fail, "meet": meet}
    return jobs, lambda: open(marker, "w").close()


class _Unpicklable(Exception):
    def __init__(self, name):
        super().__init__(name)
        self.lock = threading.Lock()


def test_storage_jobs_run_in_a_niced_child_that_is_replaced_if_it_dies(tmp_path):
    url = f"file://{tmp_path}/replica"
    conn = app_db(tmp_path / "a.db")
    capture = Capture(str(tmp_path / "a.db"), Replica(open_storage(url).child("a.db")))
    for _ in range(3):
        write_rows(conn, 5)
        capture.sync_once()
    cfg = Config(replica=url, globs=(f"{tmp_path}/*.db",), catalogue=f"sqlite:///{tmp_path}/c.db", host="h")
    open_catalogue(cfg).discover("a.db", str(tmp_path / "a.db"), "h")
    jobs = JobProcess("tenantsync-storage", fleet_jobs, (cfg, None), nice=10)
    try:
        result = jobs.run("compact", ["a.db", "../b.db"], level=1, force=True)  # a batch
        assert result["a.db"].file == "0000000000000001-0000000000000003.ltx"
        assert isinstance(result["../b.db"].error, TenantSyncError), result  # one failed, not the batch
        first = jobs.pid
        assert first is not None and first != os.getpid()
        assert os.getpriority(os.PRIO_PROCESS, first) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)  # 19 at most
        os.kill(first, signal.SIGKILL)
        assert wait_for(lambda: jobs.pid is None, 10)
        assert jobs.run("compact", ["a.db"], level=1) == {"a.db": Skipped("a.db", Skip.NOTHING_TO_WRITE)}
        assert jobs.pid not in (None, first)  # a new child
    finally:
        jobs.close()


def test_a_child_dying_fails_its_jobs_in_flight_and_the_next_job_starts_another(tmp_path):
    jobs = JobProcess("tenantsync-test", _test_jobs, (str(tmp_path / "closed"),), threads=2)
    try:
        first = jobs.run("pid", "a")["pid"]
        errors = []
        waiting = threading.Thread(target=lambda: errors.append(pytest.raises(TenantSyncError, jobs.run, "slow", "a", seconds=30)))
        waiting.start()
        time.sleep(0.5)  # the job is running in the child
        os.kill(first, signal.SIGKILL)
        waiting.join(15)
        assert not waiting.is_alive() and "process died (exit code -9)" in str(errors[0].value)
        # Worth running again (the admission policy retries transient failures): a sync lost
        # with its process would leave the tenant's last commits unshipped until its next write.
        assert errors[0].type is WorkerDied and failed("a", errors[0].value).transient
        assert jobs.run("pid", "a")["pid"] not in (first, os.getpid())
        assert not (tmp_path / "closed").exists()  # killed: its close never ran
    finally:
        jobs.close()
    assert (tmp_path / "closed").exists()  # the replacement closed in order


PARENT = """
import sys, threading
from scheduler.job_process import JobProcess
from tests.test_dispatch import _test_jobs
jobs = JobProcess("tenantsync-test", _test_jobs, (sys.argv[1],), threads=2)
print(jobs.run("pid", "a")["pid"], flush=True)
threading.Thread(target=jobs.run, args=("slow", "a"), kwargs={"seconds": 30}, daemon=True).start()
threading.Event().wait()
"""


def test_a_child_whose_parent_is_killed_exits_at_once_without_releasing(tmp_path):
    """SIGKILL of the parent (an operator's kill -9, the OOM killer): its successor may start
    at once as the same host, so the child must not go on releasing its tenants (which
    raced the successor's syncs); it stops mid-job, as if killed with the parent."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path / "closed")], cwd=root,
                              stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        time.sleep(0.5)  # the 30 s job is running in the child
        parent.kill()
        parent.wait()
        assert wait_for(lambda: process_gone(child), 10)
        assert not (tmp_path / "closed").exists()  # its close (the release) never ran
    finally:
        parent.kill()
        parent.wait()


def test_a_child_runs_jobs_concurrently_returns_their_errors_and_closes_in_order(tmp_path):
    jobs = JobProcess("tenantsync-test", _test_jobs, (str(tmp_path / "closed"),), threads=4)
    try:
        with pytest.raises(DatabaseError, match="a: cannot open database"):
            jobs.run("fail", "a", picklable=True)
        with pytest.raises(TenantSyncError, match="_Unpicklable: b"):
            jobs.run("fail", "b", picklable=False)
        results = []
        threads = [threading.Thread(target=lambda i=i: results.append(jobs.run("meet", f"t{i}"))) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert sorted(r["tenant"] for r in results) == ["t0", "t1", "t2", "t3"]  # side by side
        pid = jobs.pid
    finally:
        jobs.close()
    assert (tmp_path / "closed").exists()  # the child's close ran
    assert process_gone(pid)


def test_a_child_idle_for_idle_close_seconds_is_closed_and_the_next_job_starts_another(tmp_path):
    jobs = JobProcess("tenantsync-test", _test_jobs, (str(tmp_path / "closed"),), idle_close=1.0)
    try:
        first = jobs.run("pid", "a")["pid"]
        assert jobs.run("slow", "a", seconds=1.5) == {"tenant": "a"}  # busy: not closed meanwhile
        assert jobs.pid == first
        assert wait_for(lambda: jobs.pid is None, 10)  # idle: closed in order
        assert wait_for(lambda: (tmp_path / "closed").exists(), 10)  # its close may still be running
        assert jobs.run("pid", "a")["pid"] not in (first, None)
    finally:
        jobs.close()
