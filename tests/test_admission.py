"""The admission policy (scheduler/admission.py) gives the same sequence of decisions with
its marks in memory (the embedded runtime) and in Redis (the Celery fleet, a real
redis-server): one scripted scenario, run over both backends."""

from __future__ import annotations

import pytest
import redis

from scheduler.admission import (AGAIN_ROUNDS, TRANSIENT_RETRIES, AdmittingDispatcher, Ended, MemoryStore,
                                 job_key)
from scheduler.admission_redis import PENDING_TTL, RedisStore, once_key, sync_keys
from tenantsync.errors import DatabaseError, StorageUnavailable
from tenantsync.outcome import Contended, Contention, NothingNew, Shipped, Written


class Recorder(AdmittingDispatcher):
    """A runtime that only records what the policy starts."""

    def __init__(self, store):
        super().__init__(store)
        self.started: list[tuple] = []

    def _start_syncs(self, names):
        self.started.append(("sync", *names))

    def _start_jobs(self, job, names, kwargs):
        self.started.append((job, *names, *sorted(kwargs.items())))


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        yield MemoryStore()
        return
    server = request.getfixturevalue("redis_server")
    client = redis.Redis.from_url(server.url)
    try:
        yield RedisStore(client)
    finally:
        client.close()


def retried(ended: Ended, base: float) -> list[str]:
    """The re-offered tenants, each checked to wait ``base`` seconds give or take half."""
    assert all(0.5 * base <= delay <= 1.5 * base for delay in ended.retry.values()), (ended.retry, base)
    return sorted(ended.retry)


def scenario(d: Recorder) -> list:
    """The script: every decision the policy makes, in order."""
    seen: list = []
    step = seen.append

    # Syncs: one pending per tenant; a request while pending marks it dirty.
    step(d.request_syncs(["a"]))
    step(d.request_syncs(["a", "a", "b"]))
    # A write during every pass of a's sync: it runs again at once AGAIN_ROUNDS times, then
    # ends, and the last write admits it once more.
    passes = []

    def busy_sync(name):
        passes.append(name)
        d.request_syncs([name])
        return Shipped(name, len(passes), 1, 4096)

    ended = d.run_syncs(["a"], busy_sync)
    step((len(passes), ended.retry, type(ended.outcomes["a"]).__name__))
    step(d.run_syncs(["b"], NothingNew).retry)  # b was not marked: ends, not admitted again
    step(d.request_syncs(["b"]))  # ended: admitted again
    # A request for a tenant found behind, not for a new write (the catch-up plan), leaves a
    # pending sync unmarked: that sync reads the WAL when it runs, and no empty pass follows.
    step(d.request_syncs(["e"]))
    step(d.request_syncs(["e"], writes=False))
    passes_e: list = []
    step((d.run_syncs(["e"], lambda name: passes_e.append(name) or Shipped(name, 1, 1, 4096)).retry, passes_e))
    step(d.request_syncs(["e"], writes=False))  # ended: admitted again

    # Maintenance jobs: one per (job, tenant, arguments) until it has run.
    step(d.submit("compact", ["x", "x", "y"], level=1))
    step(d.submit("compact", ["x", "y"], level=1))
    step(d.submit("compact", ["x"], level=2))
    def written(names, level):
        return {n: Written(n, "compact", "f.ltx", level) for n in names}

    step(d.run_jobs("compact", ["x", "y"], written, {"level": 1}, batched=True).retry)
    step(d.submit("compact", ["x"], level=1))  # ended: offered again

    # Contended: re-offered after retry_after, still pending meanwhile (writes mark it dirty).
    step(d.request_syncs(["c"]))
    ended = d.run_syncs(["c"], lambda name: Contended(name, Contention.LEASE_HELD, 0.4))
    step(retried(ended, 0.4))
    step(d.request_syncs(["c"]))  # still pending: marked dirty, not admitted
    shipped = []
    ended = d.run_syncs(["c"], lambda name: shipped.append(name) or Shipped(name, len(shipped), 1, 1), attempt=1)
    step((shipped, ended.retry))  # the dirty mark ran it again at once, then it ended
    step(d.request_syncs(["c"]))

    # A transient failure (storage unreachable) backs off exponentially, keeping its once-key;
    # past TRANSIENT_RETRIES it gives up and frees it. Any other failure is done at once.
    def unreachable(names, level):
        raise StorageUnavailable("s3://bucket: connection refused")

    step(d.submit("compact", ["z"], level=3))
    step(retried(d.run_jobs("compact", ["z"], unreachable, {"level": 3}, batched=True), 1))
    step(d.submit("compact", ["z"], level=3))  # backing off: not offered again meanwhile
    step(retried(d.run_jobs("compact", ["z"], unreachable, {"level": 3}, batched=True, attempt=3), 8))
    step(d.run_jobs("compact", ["z"], unreachable, {"level": 3}, batched=True, attempt=TRANSIENT_RETRIES).retry)
    step(d.submit("compact", ["z"], level=3))
    def broken(name):
        raise DatabaseError(f"{name}: cannot open database")

    step(d.submit("archive", ["w"]))
    ended = d.run_jobs("archive", ["w"], broken, {}, batched=False)
    step((ended.retry, ended.outcomes["w"].transient))
    step(d.submit("archive", ["w"]))
    step(d.started)
    return seen


EXPECTED = [
    1, 1,
    (1 + AGAIN_ROUNDS, {}, "Shipped"), {}, 1,
    1, 0, ({}, ["e"]), 1,
    2, 0, 1, {}, 1,
    1, ["c"], 0, (["c", "c"], {}), 1,
    1, ["z"], 0, ["z"], {}, 1,
    1, ({}, False), 1,
    [("sync", "a"), ("sync", "b"), ("sync", "a"), ("sync", "b"), ("sync", "e"), ("sync", "e"),
     ("compact", "x", "y", ("level", 1)), ("compact", "x", ("level", 2)), ("compact", "x", ("level", 1)),
     ("sync", "c"), ("sync", "c"),
     ("compact", "z", ("level", 3)), ("compact", "z", ("level", 3)),
     ("archive", "w"), ("archive", "w")],
]


def test_one_scenario_gives_the_same_decisions_in_memory_and_in_redis(store):
    assert scenario(Recorder(store)) == EXPECTED


def test_redis_marks_expire_so_a_killed_worker_cannot_wedge_a_tenant(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    try:
        d = Recorder(RedisStore(client))
        d.request_syncs(["a"])
        d.request_syncs(["a"])  # pending: marked dirty
        d.submit("compact", ["x"], level=1)
        keys = [*sync_keys("a"), once_key(job_key("compact", {"level": 1}), "x")]
        assert all(0 < client.ttl(key) <= PENDING_TTL for key in keys), [client.ttl(k) for k in keys]
    finally:
        client.close()


def test_hosts_and_fleets_sharing_a_redis_keep_their_own_sync_marks(redis_server):
    """A file of one name on two hosts (an old host's fenced copy after a failover) or in two
    fleets: a request on one must not be swallowed as pending by the other's. Storage jobs
    are the fleet's: asked for by two hosts, they run once."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        a, b = RedisStore(client, "s3://bucket/fleet", "a"), RedisStore(client, "s3://bucket/fleet", "b")
        other_fleet = RedisStore(client, "s3://bucket/other", "a")
        assert a.request(["t.db"]) == [True]
        assert b.request(["t.db"]) == [True] and other_fleet.request(["t.db"]) == [True]
        assert a.request(["t.db"]) == [False]  # its own pending sync: marked dirty
        assert b.finish(["t.db"]) == [False] and a.finish(["t.db"]) == [True]
        compact = job_key("compact", {"level": 1})
        assert a.claim(compact, ["t.db"]) == [True] and b.claim(compact, ["t.db"]) == [False]
        assert other_fleet.claim(compact, ["t.db"]) == [True]
        assert a.claim("archive", ["t.db"]) == [True] and b.claim("archive", ["t.db"]) == [True]
    finally:
        client.close()


def test_a_catch_up_request_admits_a_sync_pending_for_too_long_again(redis_server):
    """A sync whose job died with a killed worker leaves its tenant pending: a catch-up
    request (stale_after) admits it again once the mark is that old, not before."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        store = RedisStore(client, "s3://bucket/fleet", "a")
        assert store.request(["t.db"]) == [True]
        assert store.request(["t.db"], stale_after=30) == [False]  # pending for under 30 s
        client.set(store.sync_keys("t.db")[0], int(client.time()[0]) - 31)  # set 31 s ago
        assert store.request(["t.db"], stale_after=30) == [True]
        assert store.request(["t.db"], stale_after=30) == [False]  # the new mark is fresh
    finally:
        client.close()


def test_syncs_the_broker_did_not_take_leave_no_mark_and_say_so_in_one_line(redis_server, monkeypatch):
    """A publish refused through its retries (Redis restarting) is BrokerUnavailable, and
    the pending marks just set are cleared: a mark for a job never sent would swallow every
    later request for its tenant."""
    import kombu.exceptions

    from scheduler.queue import CeleryDispatcher
    from scheduler.routing import make_app
    from tenantsync.config import Config
    from tenantsync.errors import BrokerUnavailable

    app = make_app(Config(replica="file:///tmp/r", broker=redis_server.url, host="h"))
    dispatcher = CeleryDispatcher(app, "h", fleet="file:///tmp/r")

    def refused(*args, **kwargs):
        raise kombu.exceptions.OperationalError("Error 111 connecting to 127.0.0.1. Connection refused.")

    monkeypatch.setattr(app, "send_task", refused)
    try:
        with pytest.raises(BrokerUnavailable, match="^broker: the job was not sent: Error 111"):
            dispatcher.request_syncs(["t.db"])
        with pytest.raises(BrokerUnavailable):
            dispatcher.submit("compact", ["t.db"], level=1)
        assert dispatcher.store.request(["t.db"]) == [True]  # no mark was left
        assert dispatcher.store.claim(job_key("compact", {"level": 1}), ["t.db"]) == [True]
    finally:
        dispatcher.close()
