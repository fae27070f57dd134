"""The S3 backend against a store that misbehaves: held requests, throttling, lost answers,
slow bodies, many threads. Everything goes through the fault proxy (tests/faultproxy.py)
in front of a real S3 server; nothing of botocore is mocked.

Timeouts here are shorter than the defaults so the tests are quick; what is checked is how
the code behaves relative to them.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tenantsync.errors import PreconditionFailed, StorageUnavailable
from tenantsync.fleet import Fleet
from tenantsync.storage import StorageOptions, open_storage

from .test_fleet_embedded import fleet_config

FAST = StorageOptions(connect_timeout=1.0, read_timeout=1.0, attempts=3, retry_time=20.0)


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_blackholed_small_put_is_noticed_fast_and_unavailable(proxied_s3_url, s3_proxy):
    store = open_storage(proxied_s3_url, FAST)
    s3_proxy.blackhole()
    start = time.monotonic()
    with pytest.raises(StorageUnavailable) as e:
        store.write_if_absent("lock.json", b"{}")
    took = time.monotonic() - start
    # Three tries, each given up after read_timeout (1 s), and short backoffs: not 3 x 30 s.
    # (A small PUT does not wait for "100 Continue", which botocore would give up on after
    # another second per try.)
    assert 3.0 <= took < 5.0
    assert s3_proxy.stats()["faults"]["blackhole"] == 3
    message = str(e.value)
    assert "\n" not in message and "lock.json" in message
    assert s3_proxy.url.split("//")[1] in message and "3 tries" in message
    # Every held connection was closed by the client: none is kept for reuse.
    wait_for(lambda: s3_proxy.stats()["connections"] == 0)


def test_blackhole_that_heals_during_the_retries_succeeds(proxied_s3_url, s3_proxy, s3_client):
    store = open_storage(proxied_s3_url, StorageOptions(connect_timeout=1.0, read_timeout=1.0, attempts=6))
    store.write_if_absent("warm", b"x")  # a pooled connection exists, and is then held
    s3_proxy.blackhole()
    healer = threading.Timer(1.5, s3_proxy.heal)
    healer.start()
    try:
        etag = store.write_if_absent("ltx/0/0000000000000001-0000000000000001.ltx", b"frames")
    finally:
        healer.join()
    assert s3_proxy.stats()["faults"]["blackhole"] >= 1
    bucket = proxied_s3_url.split("/")[2]
    stored = s3_client.get_object(Bucket=bucket, Key="replica/ltx/0/0000000000000001-0000000000000001.ltx")
    assert stored["Body"].read() == b"frames" and stored["ETag"].strip('"') == etag


def test_slowdown_storm_completes_every_operation_with_backoff(proxied_s3_url, s3_proxy):
    store = open_storage(proxied_s3_url, StorageOptions(throttled_attempts=40, retry_time=60.0))
    s3_proxy.error(503, "SlowDown", share=0.7)

    def one(i: int) -> bytes:
        key = f"t/{i:03d}"
        store.write_if_absent(key, key.encode() * 100)
        return store.read(key)

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(one, range(20)))
    assert results == [f"t/{i:03d}".encode() * 100 for i in range(20)]
    stats = s3_proxy.stats()
    # 40 operations succeeded; every refused try was retried, none given up.
    assert stats["requests"] == 40 + stats["faults"]["error"]
    assert stats["faults"]["error"] >= 40  # about 0.7 / 0.3 refusals per success


def test_lost_answer_of_an_applied_write_is_recognised_as_ours(proxied_s3_url, s3_proxy, s3_client):
    """The PUT reaches the store, its answer is dropped; the retry meets 412 and must find
    its own bytes there, not report a conflict."""
    store = open_storage(proxied_s3_url, StorageOptions(connect_timeout=1.0, read_timeout=2.0))
    bucket = proxied_s3_url.split("/")[2]
    key = "ltx/0/0000000000000001-0000000000000002.ltx"
    data = os.urandom(5000)
    # With a 1 s round trip the request is forwarded after 0.5 s and answered after 1 s:
    # once the object is in the store, a blackhole drops the answer on its way back.
    s3_proxy.set_rtt(1.0)
    outcome = {}
    writer = threading.Thread(target=lambda: outcome.update(etag=store.write_if_absent(key, data)))
    writer.start()
    wait_for(lambda: s3_client.list_objects_v2(Bucket=bucket, Prefix=f"replica/{key}").get("KeyCount"))
    s3_proxy.blackhole()
    wait_for(lambda: s3_proxy.stats()["faults"].get("blackhole"))
    s3_proxy.set_rtt(0.0)
    s3_proxy.heal()
    writer.join()
    stored = s3_client.head_object(Bucket=bucket, Key=f"replica/{key}")
    assert outcome["etag"] == stored["ETag"].strip('"')
    assert s3_proxy.stats()["methods"]["PUT"] == 2  # the retry was sent, and met 412

    # Another writer's bytes under the key are still a conflict, retry or not.
    with pytest.raises(PreconditionFailed):
        store.write_if_absent(key, b"other bytes")


def test_lost_answer_of_an_applied_compare_and_swap_is_ours(proxied_s3_url, s3_proxy, s3_client):
    store = open_storage(proxied_s3_url, StorageOptions(connect_timeout=1.0, read_timeout=2.0))
    bucket = proxied_s3_url.split("/")[2]
    first = store.write_if_absent("lock.json", b'{"generation": 1}')
    s3_proxy.set_rtt(1.0)
    outcome = {}
    writer = threading.Thread(
        target=lambda: outcome.update(etag=store.write_if_match("lock.json", b'{"generation": 2}', first))
    )
    writer.start()
    wait_for(lambda: s3_client.head_object(Bucket=bucket, Key="replica/lock.json")["ETag"].strip('"') != first)
    s3_proxy.blackhole()
    wait_for(lambda: s3_proxy.stats()["faults"].get("blackhole"))
    s3_proxy.set_rtt(0.0)
    s3_proxy.heal()
    writer.join()
    assert store.read("lock.json") == b'{"generation": 2}'
    assert outcome["etag"] == next(store.list("lock.json")).etag


def test_body_deadline_follows_its_size(proxied_s3_url, s3_proxy):
    """At 100 kB/s minimum, 400 kB may take 2 + 4 s: at 400 kB/s (1 s) it completes. 20 kB
    may take 2.2 s: at 2 kB/s (10 s) it is cut, though bytes keep coming (never a silence
    of read_timeout, which alone would let it run the whole 10 s)."""
    options = StorageOptions(connect_timeout=1.0, read_timeout=1.0, min_transfer_rate=100_000, attempts=1)
    store = open_storage(proxied_s3_url, options)
    big = os.urandom(1_000_000)
    store.write_if_absent("big", big)

    s3_proxy.slow_body(400_000)
    start = time.monotonic()
    assert store.read("big", 100_000, 400_000) == big[100_000:500_000]
    assert time.monotonic() - start < 3.0

    s3_proxy.slow_body(2_000)
    start = time.monotonic()
    with pytest.raises(StorageUnavailable, match="deadline"):
        store.read("big", 0, 20_000)
    assert 2.0 < time.monotonic() - start < 4.0


def test_no_write_waits_for_100_continue(proxied_s3_url, s3_proxy):
    """A PUT is one round trip: waiting for "100 Continue" would make it two. A large
    write refused by its condition then costs its upload, which only a lost race pays."""
    store = open_storage(proxied_s3_url)
    s3_proxy.reset_stats()
    store.write_if_absent("small", os.urandom(100_000))
    large = os.urandom(3 * 1024 * 1024)
    store.write_if_absent("large", large)
    with pytest.raises(PreconditionFailed):
        store.write_if_absent("large", large)
    assert s3_proxy.stats()["expect_continue"] == 0
    assert store.read("large") == large


def test_requests_in_flight_are_capped_per_host(proxied_s3_url, s3_proxy):
    store = open_storage(proxied_s3_url, StorageOptions(max_in_flight=8))
    tenants = [store.child(f"tenant-{i}") for i in range(64)]  # children share the host's cap
    s3_proxy.set_rtt(0.05)
    s3_proxy.reset_stats()
    barrier = threading.Barrier(64)

    def sync(i: int) -> None:
        barrier.wait()
        for n in range(3):
            tenants[i].write_if_absent(f"ltx/{n}", b"x" * 100)

    with ThreadPoolExecutor(64) as pool:
        list(pool.map(sync, range(64)))
    stats = s3_proxy.stats()
    assert stats["requests"] == 192
    assert stats["max_in_flight"] == 8  # reached, never passed


def test_a_storage_batch_keeps_its_tenants_requests_in_flight_together(tmp_path, proxied_s3_url, s3_proxy):
    """A compaction round over object storage is round trips, not CPU: the 32 tenants of a
    batch are worked on storage_job_threads at a time, not one after another."""
    fleet = Fleet(fleet_config(tmp_path, proxied_s3_url))
    try:
        names = [f"t{i:02d}.db" for i in range(32)]
        s3_proxy.set_rtt(0.2)
        s3_proxy.reset_stats()
        outcomes = fleet.for_each("retain", names)
        assert {type(o).__name__ for o in outcomes.values()} == {"Deleted"} and list(outcomes) == names
        stats = s3_proxy.stats()
        assert stats["requests"] >= 32
        assert 8 <= stats["max_in_flight"] <= fleet.config.storage_job_threads() == 16  # 1 if one at a time
    finally:
        fleet.close()
