"""The replica lease: behaviour on every backend, Litestream's format, and races.

Behaviour runs on file:// and moto S3 (the ``storage`` fixture). The races that must
prove "exactly one winner" run where conditional writes are really atomic: the file
backend and SeaweedFS (moto's conditional PUT is check-then-act without a lock).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from tenantsync.errors import LeaseHeld, PreconditionFailed, StorageError
from tenantsync.layout import LEASE_KEY
from tenantsync.lease import DEFAULT_TTL, HeldLease, Lease, Leaser, decode_lease, encode_lease, format_time, parse_time
from tenantsync.storage import open_storage

T0 = datetime(2026, 11, 25, 13, 15, 23, 250000, tzinfo=timezone.utc)
TTL = timedelta(seconds=30)


class FakeClock:
    """A settable clock shared by every leaser in a test (thread-safe)."""

    def __init__(self, now: datetime = T0):
        self._now = now
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, delta: timedelta) -> datetime:
        with self._lock:
            self._now += delta
            return self._now


@pytest.fixture
def clock():
    return FakeClock()


def leaser(storage, owner, clock, **kw):
    return Leaser(storage, owner, ttl=kw.pop("ttl", TTL), clock=clock, **kw)


def stored(storage) -> dict:
    return json.loads(storage.read(LEASE_KEY))


# -- acquire, renew, release --------------------------------------------------------


def test_fresh_acquire_creates_generation_1(storage, clock):
    lease = leaser(storage, "host-a:1", clock).acquire()
    assert (lease.owner, lease.generation, lease.expires_at) == ("host-a:1", 1, T0 + TTL)
    assert lease.etag
    # Exactly Litestream's object: these fields, in Go's struct order, UTC RFC 3339.
    raw = stored(storage)
    assert list(raw) == ["generation", "expires_at", "owner"]
    assert raw == {"generation": 1, "expires_at": "2026-11-25T13:15:53.25Z", "owner": "host-a:1"}
    assert leaser(storage, "other", clock).read() == lease  # same etag as listed


def test_a_likely_absent_lease_is_created_in_one_request_and_falls_back_when_present(proxied_s3_url, s3_proxy,
                                                                                     clock):
    storage = open_storage(proxied_s3_url)
    s3_proxy.reset_stats()
    lease = leaser(storage, "a", clock).acquire(likely_absent=True)
    assert (lease.owner, lease.generation) == ("a", 1)
    assert s3_proxy.stats()["methods"] == {"PUT": 1}, "a new tenant's lease: one conditional PUT, no read"
    assert leaser(storage, "b", clock).read() == lease

    # Present after all: the failed create reads it once and does what acquire always does.
    with pytest.raises(LeaseHeld, match="held by a"):
        leaser(storage, "b", clock).acquire(likely_absent=True)
    clock.advance(TTL + timedelta(seconds=1))
    taken = leaser(storage, "b", clock).acquire(likely_absent=True)
    assert (taken.owner, taken.generation) == ("b", 2)
    clock.advance(timedelta(seconds=1))
    again = leaser(storage, "b", clock).acquire(likely_absent=True)  # our own: a renewal
    assert (again.owner, again.generation, again.expires_at) == ("b", 2, clock() + TTL)
    assert stored(storage)["owner"] == "b"


def test_a_presumed_lease_is_written_on_its_etag_in_one_request_and_a_stale_guess_falls_back(
        proxied_s3_url, s3_proxy, clock):
    """The catalogue's mirror of the version last written (with its etag) saves the read:
    a tenant waking after its lease lapsed renews it with one conditional PUT. A guess gone
    stale (another owner wrote since) costs the failed write and then the usual read."""
    storage = open_storage(proxied_s3_url)
    mine = leaser(storage, "a", clock).acquire()
    clock.advance(TTL + timedelta(seconds=5))  # lapsed while the tenant was released
    s3_proxy.reset_stats()
    again = leaser(storage, "a", clock).acquire(presumed=mine)
    assert s3_proxy.stats()["methods"] == {"PUT": 1}
    assert (again.owner, again.generation, again.expires_at) == ("a", 1, clock() + TTL)

    clock.advance(TTL + timedelta(seconds=5))
    taken = leaser(storage, "b", clock).acquire(presumed=again)  # another owner's, expired: a takeover
    assert (taken.owner, taken.generation) == ("b", 2) and stored(storage)["owner"] == "b"
    s3_proxy.reset_stats()
    leaser(storage, "a", clock).read()
    a_read = s3_proxy.stats()["methods"]  # LIST and GET
    s3_proxy.reset_stats()
    with pytest.raises(LeaseHeld, match="held by b"):
        leaser(storage, "a", clock).acquire(presumed=again)  # stale: b holds it now
    assert s3_proxy.stats()["methods"] == {"PUT": 1, **a_read}
    s3_proxy.reset_stats()
    with pytest.raises(LeaseHeld, match="held by b"):
        leaser(storage, "c", clock).acquire(presumed=taken)  # a live lease of another: read, not believed
    assert s3_proxy.stats()["methods"] == a_read


def test_renew_keeps_generation_and_moves_expiry(storage, clock):
    a = leaser(storage, "a", clock)
    first = a.acquire()
    clock.advance(timedelta(seconds=10))
    second = a.renew(first)
    assert second.generation == first.generation == 1
    assert second.expires_at == T0 + timedelta(seconds=10) + TTL
    assert second.etag != first.etag
    assert a.read() == second
    clock.advance(timedelta(milliseconds=1))  # S3 etags are content MD5s: new content, new etag
    third = a.renew(second)
    assert third.generation == 1 and third.etag not in (first.etag, second.etag)
    clock.advance(timedelta(milliseconds=1))
    with pytest.raises(LeaseHeld, match="lease generation 1 lost: now generation 1 held by a"):
        a.renew(first)  # a stale version of our own lease


def test_acquire_of_own_lease_is_a_renewal(storage, clock):
    a = leaser(storage, "a", clock)
    first = a.acquire()
    clock.advance(timedelta(seconds=5))
    again = a.acquire()
    assert again.generation == first.generation
    assert again.expires_at == first.expires_at + timedelta(seconds=5)


def test_takeover_only_after_expiry_and_increments_generation(storage, clock):
    a, b = leaser(storage, "a", clock), leaser(storage, "b", clock)
    held = a.acquire()
    clock.advance(TTL)  # now == expires_at: not yet expired (Go: now.After(expires_at))
    with pytest.raises(LeaseHeld):
        b.acquire()
    clock.advance(timedelta(microseconds=1))
    taken = b.acquire()
    assert (taken.owner, taken.generation) == ("b", 2)
    # The old holder learns it lost the lease on its next renewal.
    with pytest.raises(LeaseHeld, match=r"lease generation 1 lost: now generation 2 held by b until") as e:
        a.renew(held)
    assert e.value.owner == "b"
    assert b.read() == taken  # the failed renewal wrote nothing
    clock.advance(TTL + timedelta(seconds=1))
    assert a.acquire().generation == 3


def test_held_by_other_raises_one_clear_line(storage, clock):
    a, b = leaser(storage, "host-a:41", clock), leaser(storage, "host-b:42", clock)
    lease = a.acquire()
    clock.advance(timedelta(seconds=29))
    with pytest.raises(LeaseHeld) as e:
        b.acquire()
    assert str(e.value) == (
        f"{storage}: lease held by host-a:41 until 2026-11-25T13:15:53.25Z; retrying after it expires"
    )
    assert "\n" not in str(e.value)
    assert (e.value.owner, e.value.expires_at) == ("host-a:41", lease.expires_at)
    assert a.read() == lease  # the loser wrote nothing


def test_release_lets_the_next_acquirer_in_at_once(storage, clock):
    a, b = leaser(storage, "a", clock), leaser(storage, "b", clock)
    lease = a.acquire()
    assert a.release(lease) is True
    released = a.read()
    assert (released.owner, released.generation) == ("a", 1)
    assert released.expires_at < clock()  # expired for everyone, Litestream included
    taken = b.acquire()  # no clock advance needed
    assert (taken.owner, taken.generation) == ("b", 2)
    # Releasing or renewing the old lease again is refused and leaves b's lease alone.
    assert a.release(lease) is False
    with pytest.raises(LeaseHeld):
        a.renew(lease)
    assert b.read() == taken


def test_release_of_a_lease_taken_over_is_a_no_op(storage, clock):
    a, b = leaser(storage, "a", clock), leaser(storage, "b", clock)
    old = a.acquire()
    clock.advance(TTL * 2)
    taken = b.acquire()
    assert a.release(old) is False
    assert b.read() == taken


def test_held_stops_a_margin_before_expiry(storage, clock):
    a = leaser(storage, "a", clock)
    lease = a.acquire()
    assert a.margin == TTL / 5
    assert a.held(lease)
    assert a.held(lease, T0 + TTL - TTL / 5 - timedelta(microseconds=1))
    assert not a.held(lease, T0 + TTL - TTL / 5)
    assert not a.held(lease, T0 + TTL)
    clock.advance(TTL - TTL / 5)
    assert not a.held(lease)
    assert a.held(a.renew(lease))
    assert Leaser(storage, "x").ttl == DEFAULT_TTL == timedelta(seconds=30)


def test_invalid_configuration_is_refused(storage, clock):
    for kw in ({"ttl": timedelta(0)}, {"margin": TTL}, {"margin": -timedelta(seconds=1)}):
        with pytest.raises(ValueError):
            leaser(storage, "a", clock, **kw)
    with pytest.raises(ValueError):
        Leaser(storage, "")
    with pytest.raises(ValueError, match="timezone-aware"):
        Leaser(storage, "a", clock=lambda: datetime(2026, 1, 1)).acquire()
    lease = leaser(storage, "a", clock).acquire()
    with pytest.raises(ValueError):
        leaser(storage, "b", clock).renew(lease)


def test_only_the_exact_key_is_the_lease(storage, clock):
    storage.write_if_absent("lock.json.old", b'{"generation":9,"expires_at":"2999-01-01T00:00:00Z","owner":"x"}')
    storage.write_if_absent("lock.jsonx", b"junk")
    a = leaser(storage, "a", clock)
    assert a.read() is None
    assert a.acquire().generation == 1


def test_each_replica_has_its_own_lease(storage, clock):
    ta, tb = storage.child("tenants/a.db"), storage.child("tenants/b.db")
    la = leaser(ta, "a", clock).acquire()
    lb = leaser(tb, "b", clock).acquire()
    assert la.generation == lb.generation == 1
    with pytest.raises(LeaseHeld, match=r"tenants/a\.db.*lease held by a"):
        leaser(ta, "b", clock).acquire()
    assert [o.key for o in storage.list()] == ["tenants/a.db/lock.json", "tenants/b.db/lock.json"]


def test_malformed_lease_is_an_error_not_overwritten(storage, clock):
    storage.write_if_absent(LEASE_KEY, b"not json")
    with pytest.raises(StorageError, match="malformed lease object"):
        leaser(storage, "a", clock).acquire()
    assert storage.read(LEASE_KEY) == b"not json"


# -- losing the conditional write ---------------------------------------------------


class Interfering:
    """A storage proxy that runs ``before_write`` just before the next lease write
    (another process winning the race), or makes the write land and then report
    PreconditionFailed (a client retry that lost to its own first attempt)."""

    def __init__(self, inner, before_write=None, landed_then_412=False):
        self.inner, self.before_write, self.landed_then_412 = inner, before_write, landed_then_412

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __str__(self):
        return str(self.inner)

    def _write(self, fn, *args):
        if self.before_write:
            hook, self.before_write = self.before_write, None
            hook()
        result = fn(*args)
        if self.landed_then_412:
            self.landed_then_412 = False
            raise PreconditionFailed("simulated: retried request lost to its own first attempt")
        return result

    def write_if_absent(self, key, data, **kw):
        return self._write(self.inner.write_if_absent, key, data)

    def write_if_match(self, key, data, etag, **kw):
        return self._write(self.inner.write_if_match, key, data, etag)


@pytest.mark.parametrize("existing", ["absent", "expired"])
def test_losing_the_race_names_the_winner(storage, clock, existing):
    if existing == "expired":
        leaser(storage, "old", clock).acquire()
        clock.advance(TTL * 2)
    winner = leaser(storage, "winner", clock)
    won = []
    loser = leaser(Interfering(storage, before_write=lambda: won.append(winner.acquire())), "loser", clock)
    with pytest.raises(LeaseHeld, match="lease held by winner until") as e:
        loser.acquire()
    assert e.value.owner == "winner"
    assert winner.read() == won[0]


def test_losing_the_race_to_ourselves_retries_once(storage, clock):
    me = leaser(storage, "me", clock)
    # Another instance under our owner name wrote in between: the retry renews it.
    proxy = Interfering(storage, before_write=lambda: (clock.advance(timedelta(seconds=1)), me.acquire()))
    lease = leaser(proxy, "me", clock).acquire()
    assert (lease.owner, lease.generation, lease.expires_at) == ("me", 1, T0 + timedelta(seconds=1) + TTL)
    assert me.read() == lease


@pytest.mark.parametrize("op", ["acquire-absent", "acquire-expired", "renew"])
def test_write_that_landed_but_reported_412_is_ours(storage, clock, op):
    if op == "acquire-expired":
        leaser(storage, "old", clock).acquire()
        clock.advance(TTL * 2)
    proxy = Interfering(storage)
    me = leaser(proxy, "me", clock)
    if op == "renew":
        first = me.acquire()
        clock.advance(timedelta(seconds=3))
        proxy.landed_then_412 = True
        lease = me.renew(first)
        assert lease.generation == first.generation
    else:
        proxy.landed_then_412 = True
        lease = me.acquire()
    assert lease == me.read()
    assert lease.owner == "me"
    # Who it was taken from survives the lost answer: else a takeover the fleet must check
    # the replica after (fence.py) is taken as our own lease.
    assert lease.taken_from == ("old" if op == "acquire-expired" else "")


# -- Litestream's format ------------------------------------------------------------


GO_LEASES = [
    # json.Marshal(litestream.Lease{...}) with time.Now() in a non-UTC zone (nanoseconds).
    (b'{"generation":41,"expires_at":"2026-11-25T08:15:30.123456789-05:00","owner":"db-host:4242"}',
     41, datetime(2026, 11, 25, 13, 15, 30, 123456, tzinfo=timezone.utc), "db-host:4242"),
    # In UTC, the fraction's trailing zeros dropped.
    (b'{"generation":1,"expires_at":"2026-11-25T13:15:30.5Z","owner":"h:1"}',
     1, datetime(2026, 11, 25, 13, 15, 30, 500000, tzinfo=timezone.utc), "h:1"),
    # Whole seconds, owner omitted (`json:"owner,omitempty"`), an unknown field.
    (b'{"generation":7,"expires_at":"2026-11-25T13:15:30Z","extra":true}',
     7, datetime(2026, 11, 25, 13, 15, 30, tzinfo=timezone.utc), ""),
    (b'{"generation":2,"expires_at":"2026-11-26T00:45:30.000001+11:30","owner":"x"}',
     2, datetime(2026, 11, 25, 13, 15, 30, 1, tzinfo=timezone.utc), "x"),
]


@pytest.mark.parametrize("data,generation,expires_at,owner", GO_LEASES)
def test_litestream_written_lease_parses(data, generation, expires_at, owner):
    assert decode_lease(data) == (generation, expires_at, owner)


def test_litestream_lease_is_respected_then_taken_over(storage):
    storage.write_if_absent(LEASE_KEY, GO_LEASES[0][0])
    expires = GO_LEASES[0][2]
    clock = FakeClock(expires - timedelta(seconds=5))
    me = leaser(storage, "tenantsync:1", clock)
    with pytest.raises(LeaseHeld, match=r"held by db-host:4242 until 2026-11-25T13:15:30\.123Z"):
        me.acquire()
    clock.advance(timedelta(seconds=6))
    lease = me.acquire()
    assert lease.generation == 42
    assert storage.read(LEASE_KEY) == (
        b'{"generation":42,"expires_at":"2026-11-25T13:16:01.123456Z","owner":"tenantsync:1"}'
    )


def test_time_format_matches_go_rfc3339nano():
    assert format_time(T0) == "2026-11-25T13:15:23.25Z"
    assert format_time(T0.replace(microsecond=0)) == "2026-11-25T13:15:23Z"
    assert format_time(T0.replace(microsecond=1)) == "2026-11-25T13:15:23.000001Z"
    assert format_time(T0.replace(microsecond=123456), digits=3) == "2026-11-25T13:15:23.123Z"
    assert format_time(datetime(1, 1, 1, tzinfo=timezone.utc)) == "0001-01-01T00:00:00Z"  # Go's zero time
    est = timezone(timedelta(hours=-5))
    assert format_time(datetime(2026, 11, 25, 8, 0, tzinfo=est)) == "2026-11-25T13:00:00Z"
    for t in (T0, T0.replace(microsecond=1), datetime(1, 1, 1, tzinfo=timezone.utc)):
        assert parse_time(format_time(t)) == t
    with pytest.raises(ValueError):
        format_time(datetime(2026, 1, 1))


@pytest.mark.parametrize(
    "text",
    ["2026-11-25 13:15:30Z", "2026-11-25T13:15:30", "2026-11-25T13:15:30.Z", "2026-11-25T13:15:30.1234567890Z",
     "2026-13-25T13:15:30Z", "2026-11-25T13:15:30+0100", "2026-11-25T25:00:00Z", ""],
)
def test_bad_times_are_refused(text):
    with pytest.raises(ValueError):
        parse_time(text)


@pytest.mark.parametrize(
    "data",
    [b"[]", b"{", b'{"generation":"1","expires_at":"2026-11-25T13:15:30Z"}',
     b'{"generation":true,"expires_at":"2026-11-25T13:15:30Z"}',
     b'{"generation":-1,"expires_at":"2026-11-25T13:15:30Z"}',
     b'{"generation":1}', b'{"generation":1,"expires_at":"2026-11-25T13:15:30Z","owner":5}', b"\xff"],
)
def test_malformed_lease_objects_are_refused(data):
    with pytest.raises(ValueError):
        decode_lease(data)


def test_encode_round_trips():
    lease = Lease("o", 3, T0, "ignored")
    assert decode_lease(encode_lease(lease)) == (3, T0, "o")
    assert encode_lease(Lease("", 3, T0, "")) == b'{"generation":3,"expires_at":"2026-11-25T13:15:23.25Z"}'


# -- races on atomic backends -------------------------------------------------------

THREADS = 8

# SeaweedFS (>= 4.17, seaweedfs#8801) makes a conditional PUT atomic by re-checking the
# condition under a short-lived distributed lock, which waiters retry in ~1 s steps: a
# contended round costs one to a few seconds there, so few rounds by default (every
# mode of the expired race twice), many in the soak run.
ROUNDS = {"file": {"absent": 24, "expired": 24}, "seaweed": {"absent": 3, "expired": 6}}
SOAK_ROUNDS = 60


@pytest.fixture(params=["file", "seaweed"])
def atomic(request):
    """(backend, fresh replica root) on a backend whose conditional writes are atomic."""
    return request.param, open_storage(request.getfixturevalue(f"{request.param}_url"))


def test_race_for_an_absent_lease_has_one_winner(atomic):
    backend, storage = atomic
    race_absent(storage, ROUNDS[backend]["absent"])


def test_race_for_an_expired_lease_has_one_winner_and_no_overlap(atomic):
    backend, storage = atomic
    race_expired(storage, ROUNDS[backend]["expired"])


@pytest.mark.soak
def test_seaweed_race_soak(seaweed_url):
    storage = open_storage(seaweed_url)
    race_absent(storage, SOAK_ROUNDS // 3)
    race_expired(storage.child("expired"), SOAK_ROUNDS)


def race_absent(storage, rounds):
    """Each round, 8 owners race to create a lease nobody holds yet: one wins, with
    generation 1, and every loser is told who won."""
    clock = FakeClock()
    for r in range(rounds):
        store = storage.child(f"round-{r}")
        results = run_together([leaser(store, f"w{i}", clock).acquire for i in range(THREADS)])
        winners = [x for x in results if isinstance(x, Lease)]
        assert len(winners) == 1, results
        assert winners[0].generation == 1
        for x in results:
            if not isinstance(x, Lease):
                assert isinstance(x, LeaseHeld) and x.owner == winners[0].owner, x
        assert leaser(store, "reader", clock).read() == winners[0]


def race_expired(storage, rounds):
    """8 owners race for one lease, round after round. Between rounds the holder
    releases it, or lets it expire, or lets it expire and then races the others by
    renewing it. Each round exactly one owner ends up holding it; a takeover increments
    the generation; and no two different holders' windows (acquired .. expires_at -
    margin, or .. release) ever overlap."""
    clock = FakeClock()
    leasers = [leaser(storage, f"w{i}", clock) for i in range(THREADS)]
    current: Lease | None = None
    windows: list[tuple[str, int, datetime, datetime]] = []  # owner, generation, from, until
    takeovers = 0
    for r in range(rounds):
        mode = ("release", "expire", "expire+renew")[r % 3]
        if current is not None:
            holder = leasers[int(current.owner[1:])]
            if mode == "release":
                assert holder.release(current)
                windows[-1] = (*windows[-1][:3], clock())
            else:
                clock.advance(TTL + timedelta(milliseconds=1))

        def attempt(lx, holding=current if mode == "expire+renew" else None):
            return lx.renew(holding) if holding is not None and holding.owner == lx.owner else lx.acquire()

        start = clock()
        results = run_together([lambda lx=lx: attempt(lx) for lx in leasers])
        winners = [x for x in results if isinstance(x, Lease)]
        assert len(winners) == 1, (r, mode, results)
        win = winners[0]
        for x in results:
            if not isinstance(x, Lease):
                assert isinstance(x, LeaseHeld) and x.owner == win.owner, (r, mode, x)
        if current is None:
            assert win.generation == 1
        elif win.owner == current.owner:
            assert win.generation == current.generation  # renewed (or re-acquired) by the holder
        else:
            assert win.generation == current.generation + 1
            takeovers += 1
        assert leasers[0].read() == win
        windows.append((win.owner, win.generation, start, win.expires_at - leasers[0].margin))
        current = win
    assert current.generation == 1 + takeovers
    for (o1, g1, _, until), (o2, g2, since, _) in itertools.pairwise(windows):
        assert g2 >= g1
        if o1 != o2:
            assert since >= until, (o1, g1, until, o2, g2, since)


def run_together(fns):
    """Call every fn in its own thread, released together; return each result or exception."""
    barrier = threading.Barrier(len(fns))
    results: list[object] = [None] * len(fns)

    def run(i):
        barrier.wait()
        try:
            results[i] = fns[i]()
        except Exception as e:  # noqa: BLE001 - the test inspects it
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    return results


def test_seaweed_lease_works_with_real_time(seaweed_url):
    """The default clock against a real server: acquire, renew, release, take over."""
    storage = open_storage(seaweed_url)
    a, b = Leaser(storage, "a", ttl=timedelta(seconds=5)), Leaser(storage, "b", ttl=timedelta(seconds=5))
    lease = a.acquire()
    assert a.held(lease) and lease.expires_at > datetime.now(timezone.utc)
    with pytest.raises(LeaseHeld, match="lease held by a"):
        b.acquire()
    time.sleep(0.01)
    renewed = a.renew(lease)
    assert renewed.expires_at > lease.expires_at and renewed.generation == 1
    assert a.release(renewed)
    assert b.acquire().generation == 2


# -- HeldLease: the fleet's hold on one tenant's lease ---------------------------------


def test_held_lease_renews_only_past_half_its_ttl_and_reports_each_change_once(storage, clock):
    held = HeldLease(leaser(storage, "h:1", clock))
    held.hold()
    first = held.lease
    assert held.unrecorded() == ("h:1", T0 + TTL, 1, first.etag) and held.unrecorded() is None
    clock.advance(TTL / 2 - timedelta(seconds=1))
    held.hold()  # not half-way yet: no write
    assert held.lease is first and held.unrecorded() is None and stored(storage)["expires_at"] == format_time(T0 + TTL)
    now = clock.advance(timedelta(seconds=1))
    held.hold()
    assert held.lease.expires_at == now + TTL and held.lease.generation == 1
    assert held.unrecorded() == ("h:1", now + TTL, 1, held.lease.etag)


def test_held_lease_check_is_the_fence_and_give_up_hands_over_at_once(storage, clock):
    held = HeldLease(leaser(storage, "h:1", clock))
    with pytest.raises(LeaseHeld, match="not held by this process"):
        held.check()
    held.hold()
    held.check()
    clock.advance(TTL - TTL / 5)  # inside the margin: no longer trusted, though not expired
    with pytest.raises(LeaseHeld, match="generation 1 no longer held"):
        held.check()
    assert not held.held() and not held.expired()
    held.hold()
    assert held.give_up() == (None, None, 1, None) and held.lease is None and held.expired()
    assert leaser(storage, "h:2", clock).acquire().generation == 2  # taken over without waiting
    assert held.give_up() is None


def test_held_lease_holds_nothing_while_another_owner_has_it(storage, clock):
    leaser(storage, "h:2", clock).acquire()
    held = HeldLease(leaser(storage, "h:1", clock))
    with pytest.raises(LeaseHeld, match="h:2"):
        held.hold()
    assert held.lease is None and held.unrecorded() is None


def test_held_lease_from_a_recorded_version_renews_it_or_falls_back_to_a_read(storage, clock):
    """The catalogue's version of our own lease: renewed on its etag, and ``renewed`` says
    so for that hold. Changed since, a read decides: released by us, it is still generation
    1 and ours; taken over by another owner, LeaseHeld."""
    first = leaser(storage, "h:1", clock).acquire()
    clock.advance(TTL * 2)
    held = HeldLease(leaser(storage, "h:1", clock), presumed=first)
    held.hold()
    assert held.renewed
    held.hold()  # not half-way yet: nothing written, nothing renewed
    assert not held.renewed
    assert (held.lease.owner, held.lease.generation, held.lease.expires_at) == ("h:1", 1, clock() + TTL)

    leaser(storage, "h:1", clock).release(held.lease)  # a new version: the recorded one is gone
    again = HeldLease(leaser(storage, "h:1", clock), presumed=held.lease)
    again.hold()  # the failed write, a read, then ours again: still generation 1, nobody else's
    assert (again.lease.owner, again.lease.generation) == ("h:1", 1) and again.renewed

    clock.advance(TTL * 2)
    leaser(storage, "other:2", clock).acquire()  # taken over meanwhile
    late = HeldLease(leaser(storage, "h:1", clock), presumed=again.lease)
    with pytest.raises(LeaseHeld, match="held by other:2"):
        late.hold()
    assert late.lease is None and not late.renewed
