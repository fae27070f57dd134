"""The periodic plans' choice of tenants (real SQLite catalogue, recording dispatcher)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from scheduler import schedule as schedule_mod
from scheduler.admission import AdmittingDispatcher, MemoryStore
from scheduler.schedule import Schedule
from tenantsync.catalogue import FencedCopy, TenantState, open_catalogue
from tenantsync.config import Config


def plans_config(tmp_path, host: str = "h", **kw) -> Config:
    return Config(replica=f"file://{tmp_path}/r", globs=(f"{tmp_path}/*.db",),
                  catalogue=f"sqlite:///{tmp_path}/c.db", host=host, **kw)


class Recorder:
    def __init__(self):
        self.syncs: list[str] = []
        self.jobs: list[tuple] = []

    def request_syncs(self, names, stale_after=None, writes=True) -> int:
        names = list(names)
        self.syncs.extend(names)
        self.for_writes = writes
        return len(names)

    def submit(self, job: str, names, **kwargs) -> int:
        names = list(names)
        self.jobs.extend((job, name, kwargs) for name in names)
        return len(names)


def test_catch_up_retries_a_failed_tenant_once_its_error_is_old_enough(tmp_path):
    cfg = plans_config(tmp_path)
    cat = open_catalogue(cfg)
    for name in ("healthy", "failed-first-sync"):
        cat.discover(name, f"{tmp_path}/{name}", "h")
    cat.record_sync("healthy", txid=1, position=None, at=datetime.now(timezone.utc), state=TenantState.active)
    cat.record_error("failed-first-sync", "cannot open database: Too many open files")  # never written
    rec = Recorder()
    plans = Schedule(cfg, cat, rec)
    now = datetime.now(timezone.utc)
    plans.run("catch-up", now)
    assert rec.syncs == []  # it failed just now
    plans.run("catch-up", now + schedule_mod.RETRY_ERRORS_AFTER + timedelta(seconds=1))
    assert rec.syncs == ["failed-first-sync"]
    assert rec.for_writes is False  # found behind, not written: a pending sync is not marked dirty


def test_compaction_is_offered_only_to_tenants_synced_within_two_intervals(tmp_path):
    cfg = plans_config(tmp_path)
    cat = open_catalogue(cfg)
    now = datetime.now(timezone.utc)
    for name, ago in (("recent", 10), ("two-intervals", 50), ("idle", 3600)):
        cat.discover(name, f"{tmp_path}/{name}", "h")
        cat.record_sync(name, txid=1, position=None, at=now - timedelta(seconds=ago), state=TenantState.active)
    cat.discover("never-synced", f"{tmp_path}/never", "h")
    rec = Recorder()
    assert Schedule(cfg, cat, rec).run(1, now) == 2  # L1 every 30 s: synced within 60 s
    assert rec.jobs == [("compact", "recent", {"level": 1}), ("compact", "two-intervals", {"level": 1})]


def test_host_plans_touch_only_this_hosts_tenants_and_beat_runs_only_storage_plans(tmp_path):
    """A lagging tenant of another host must not be synced from this host's queue (its
    files are not here): catch-up and archival run in each host's watcher, for its own
    tenants; beat (any worker, the whole fleet) runs compaction, snapshots, retention."""
    from scheduler.beat import beat_schedule
    from scheduler.schedule import host_plans, storage_plans

    cfg = plans_config(tmp_path, host="a", archive_after=((f"{tmp_path}/*.db", timedelta(days=7)),))
    cat = open_catalogue(cfg)
    now = datetime.now(timezone.utc)
    for name, host in (("mine.db", "a"), ("theirs.db", "b")):
        cat.discover(name, f"{tmp_path}/{name}", host)
        cat.record_sync(name, txid=1, position=None, at=now - timedelta(minutes=1), state=TenantState.active)
        cat.record_writes([name], now - timedelta(seconds=30))  # written after its last sync
    rec = Recorder()
    watcher_plans = Schedule(cfg, cat, rec, host_plans(cfg))
    assert set(watcher_plans.every) == {"catch-up", "heartbeat", "archive"}
    watcher_plans.run("catch-up", now)
    assert rec.syncs == ["mine.db"]
    assert sorted(e["args"][0] for e in beat_schedule(cfg).values() if isinstance(e["args"][0], str)) == ["retain"]
    assert {e["args"][0] for e in beat_schedule(cfg).values()} == set(storage_plans(cfg))
    assert "catch-up" not in storage_plans(cfg) and "archive" not in storage_plans(cfg)


def test_over_the_disk_budget_the_least_recently_written_idle_tenants_are_archived_first(tmp_path):
    """``max-local-bytes``: after the tenants idle past ``archive-after``, idle tenants go
    oldest write first until the rest fit; an active tenant is never chosen for space."""
    from types import SimpleNamespace


    now = datetime.now(timezone.utc)
    cfg = plans_config(tmp_path, max_local_bytes=2500,
                       archive_after=((f"{tmp_path}/cold-*.db", timedelta(days=7)),))

    def tenant(name: str, size: int, written_ago: timedelta, state=TenantState.idle, synced_ago=None):
        path = tmp_path / name
        path.write_bytes(b"x" * size)
        return SimpleNamespace(name=name, path=str(path), state=state, last_write_at=now - written_ago,
                               last_sync_at=None if synced_ago is None else now - synced_ago)

    tenants = [
        tenant("cold-a.db", 5000, timedelta(days=8)),        # past archive-after
        tenant("b.db", 1000, timedelta(hours=3)),
        tenant("c.db", 1000, timedelta(hours=1)),
        tenant("d.db", 1000, timedelta(hours=5), TenantState.active),  # oldest, but in use
        tenant("e.db", 1000, timedelta(minutes=5)),
        tenant("gone.db", 1000, timedelta(hours=9), TenantState.archived),  # not local
        # Written 9 days ago but hydrated (a sync) a second ago: the application just asked for it.
        tenant("cold-hydrated.db", 10, timedelta(days=9), TenantState.active, synced_ago=timedelta(seconds=1)),
    ]
    # Without cold-a: b, c, d, e = 4000 bytes > 2500; b (3 h) then c (1 h) bring it to 2000.
    assert schedule_mod.archival_candidates(cfg, tenants, now) == ["cold-a.db", "b.db", "c.db"]
    assert schedule_mod.archival_candidates(plans_config(tmp_path), tenants, now) == []


def test_freeze_is_offered_to_this_hosts_tenants_archived_past_their_globs_cold_after(tmp_path):
    """``cold-after`` per glob, counted from the archival (an archived tenant's last sync);
    tenants not archived, archived too recently, of a glob without it, of another host, or
    frozen already are left alone; without ``cold-after`` there is no freeze plan at all."""
    from scheduler.schedule import host_plans

    assert "freeze" not in host_plans(plans_config(tmp_path))
    cfg = plans_config(tmp_path, cold_after=((f"{tmp_path}/cold-*.db", timedelta(days=30)),))
    assert host_plans(cfg)["freeze"] == schedule_mod.FREEZE_EVERY
    cat = open_catalogue(cfg)
    now = datetime.now(timezone.utc)
    for name, host, state, ago in (("cold-old.db", "h", TenantState.archived, 31),
                                   ("cold-new.db", "h", TenantState.archived, 29),
                                   ("cold-live.db", "h", TenantState.idle, 40),
                                   ("cold-done.db", "h", TenantState.frozen, 60),
                                   ("cold-theirs.db", "other", TenantState.archived, 60),
                                   ("warm.db", "h", TenantState.archived, 90)):
        cat.discover(name, f"{tmp_path}/{name}", host)
        cat.record_sync(name, txid=1, position=None, at=now - timedelta(days=ago), state=TenantState.active)
        if state is not TenantState.active:
            assert cat.transition(name, state)
    rec = Recorder()
    assert Schedule(cfg, cat, rec, host_plans(cfg)).run("freeze", now) == 1
    assert rec.jobs == [("freeze", "cold-old.db", {})]


def test_failover_hands_the_active_tenants_of_a_host_not_seen_to_one_live_host_each(tmp_path):
    """Hosts a and c alive, b not seen for longer than failover-after, d never seen (a version
    before heartbeats: never taken for dead). b's active tenants are shared between a and c,
    each asked of exactly one; its idle ones and every live host's stay where they are."""
    now = datetime(2026, 12, 7, 12, 0, tzinfo=timezone.utc)
    hosts = {name: plans_config(tmp_path, host=name, failover_after=timedelta(seconds=30)) for name in "abc"}
    catalogue = open_catalogue(hosts["a"])
    for i in range(40):
        catalogue.discover(f"b{i:02d}.db", f"/data/b{i:02d}.db", "b")
        catalogue.record_sync(f"b{i:02d}.db", txid=1, position=None, at=now, state=TenantState.active)
    catalogue.discover("b-idle.db", "/data/b-idle.db", "b")
    for host, name in (("c", "c0.db"), ("d", "d0.db")):
        catalogue.discover(name, f"/data/{name}", host)
        catalogue.record_sync(name, txid=1, position=None, at=now, state=TenantState.active)
    catalogue.heartbeat("a", now - timedelta(seconds=2))
    catalogue.heartbeat("c", now - timedelta(seconds=29))
    catalogue.heartbeat("b", now - timedelta(seconds=31))

    shares = {}
    for name in "ac":
        recorder = Recorder()
        assert Schedule(hosts[name], catalogue, recorder, {}).run("failover", now) == len(recorder.jobs)
        b_seen = (now - timedelta(seconds=31)).isoformat()
        assert {(job, str(kwargs)) for job, _, kwargs in recorder.jobs} == {
            ("hydrate", str({"failover_from": "b", "dead_since": b_seen}))}
        shares[name] = {tenant for _, tenant, _ in recorder.jobs}
    assert shares["a"] | shares["c"] == {f"b{i:02d}.db" for i in range(40)} and not shares["a"] & shares["c"]
    assert shares["a"] and shares["c"]

    # A copy of one of a's share fenced on a (it failed over from a earlier, and no operator
    # has decided on it yet): a leaves that one alone; hydrating it would be refused.
    fenced = sorted(shares["a"])[0]
    catalogue.record_fenced(FencedCopy("", "a", fenced, f"/data/{fenced}", f"/data/{fenced}.fenced", "test", 1, now))
    recorder = Recorder()
    Schedule(hosts["a"], catalogue, recorder, {}).run("failover", now)
    assert {tenant for _, tenant, _ in recorder.jobs} == shares["a"] - {fenced}

    catalogue.heartbeat("a", now - timedelta(seconds=31))  # a's own heartbeat stale: it cannot judge
    recorder = Recorder()
    assert Schedule(hosts["a"], catalogue, recorder, {}).run("failover", now) == 0 and recorder.jobs == []


class Admitting(AdmittingDispatcher):
    """The real admission policy (once-keys in memory); jobs recorded, never run: every
    job sent is one lost with a killed worker, its once-key still held."""

    def __init__(self):
        super().__init__(MemoryStore())
        self.sent: list[tuple] = []

    def _start_syncs(self, names):
        raise AssertionError("no syncs here")

    def _start_jobs(self, job, names, kwargs):
        self.sent.extend((job, name, kwargs["failover_from"], kwargs["dead_since"]) for name in names)


def test_a_host_that_dies_again_is_failed_over_again_though_its_last_deaths_jobs_were_lost(tmp_path):
    """Host b dies; a's failover plan sends the hydration of b's tenant, and the worker running
    it is killed: its once-key stays held until the broker redelivers the job (Celery's
    visibility timeout, 120 s) or the key expires. b comes back and dies again before that: the
    new death's hydration must be sent at once, not wait for the lost one."""
    now = datetime(2026, 12, 7, 12, 0, tzinfo=timezone.utc)
    cfg = plans_config(tmp_path, host="a", failover_after=timedelta(seconds=10))
    catalogue = open_catalogue(cfg)
    catalogue.discover("t.db", "/data/t.db", "b")
    catalogue.record_sync("t.db", txid=1, position=None, at=now, state=TenantState.active)
    dispatcher = Admitting()
    plans = Schedule(cfg, catalogue, dispatcher, {})

    first_death = now - timedelta(seconds=11)
    catalogue.heartbeat("a", now)
    catalogue.heartbeat("b", first_death)
    assert plans.run("failover", now) == 1
    assert plans.run("failover", now + timedelta(seconds=5)) == 0  # that death's job is still out
    second_death = now + timedelta(seconds=30)  # b was back meanwhile, and died again
    catalogue.heartbeat("b", second_death)
    later = second_death + timedelta(seconds=11)
    catalogue.heartbeat("a", later)
    assert plans.run("failover", later) == 1
    assert dispatcher.sent == [("hydrate", "t.db", "b", first_death.isoformat()),
                               ("hydrate", "t.db", "b", second_death.isoformat())]


def test_every_host_says_it_is_alive_and_failover_runs_only_where_configured(tmp_path):
    now = datetime(2026, 12, 7, 12, 0, tzinfo=timezone.utc)
    plain, failing_over = plans_config(tmp_path), plans_config(tmp_path, failover_after=timedelta(minutes=1))
    assert "heartbeat" in schedule_mod.host_plans(plain) and "failover" not in schedule_mod.host_plans(plain)
    assert schedule_mod.host_plans(failing_over)["failover"] == schedule_mod.FAILOVER_EVERY
    catalogue = open_catalogue(plain)
    Schedule(plain, catalogue, Recorder(), {}).run("heartbeat", now)
    assert catalogue.hosts_seen() == {"h": now}
    starting = plans_config(tmp_path, host="s")
    Schedule(starting, catalogue, Recorder(), schedule_mod.storage_plans(starting)).say_alive()  # beat's: none
    assert set(catalogue.hosts_seen()) == {"h"}
    before = datetime.now(timezone.utc)
    Schedule(starting, catalogue, Recorder(), schedule_mod.host_plans(starting)).say_alive()  # a watcher's start
    assert catalogue.hosts_seen()["s"] >= before
