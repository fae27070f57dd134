"""The fault-injecting proxy itself (tests/faultproxy.py), with real boto3 clients and the
real S3 servers behind it: what passes is exact, and each fault is what a client sees."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import botocore.handlers
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError, ReadTimeoutError

from .dbutil import wait_for
from .faultproxy import FaultProxy, control

ROOT = Path(__file__).resolve().parents[1]

#: A body larger than one read of the proxy's copy loop and than botocore's 1 MB thresholds.
LARGE = 20 * 1024 * 1024


def client_through(url: str, read_timeout: float = 10, pool: int = 10):
    """A boto3 client for ``url`` that tries once: a fault must reach the caller, not be
    retried away."""
    return boto3.client("s3", endpoint_url=url, region_name="us-east-1", config=Config(
        s3={"addressing_style": "path"}, retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=2, read_timeout=read_timeout, max_pool_connections=pool,
    ))


@pytest.fixture(params=["moto", "seaweed"])
def server(request):
    """(proxy, bucket, direct client) for a fresh bucket on each S3 server."""
    proxy = request.getfixturevalue("s3_proxy" if request.param == "moto" else "seaweed_proxy")
    direct = request.getfixturevalue("s3_client" if request.param == "moto" else "seaweed_client")
    bucket = f"proxy-{os.urandom(6).hex()}"
    direct.create_bucket(Bucket=bucket)
    return proxy, bucket, direct


@pytest.fixture
def moto(s3_proxy, s3_client):
    """(proxy, bucket, client through the proxy) with one small object "k" in the bucket."""
    bucket = f"proxy-{os.urandom(6).hex()}"
    s3_client.create_bucket(Bucket=bucket)
    s3_client.put_object(Bucket=bucket, Key="k", Body=b"0123456789")
    return s3_proxy, bucket, client_through(s3_proxy.url)


def test_objects_pass_through_byte_exact(server):
    """Small and 20 MB bodies, as bytes and as a file (which botocore sends with Expect:
    100-continue), whole and ranged GETs, HEAD and LIST: the same bytes as on the server."""
    proxy, bucket, direct = server
    s3 = client_through(proxy.url, read_timeout=60)
    small, large = os.urandom(1000), os.urandom(LARGE)
    s3.put_object(Bucket=bucket, Key="small", Body=small)
    s3.put_object(Bucket=bucket, Key="large", Body=io.BytesIO(large))
    assert direct.get_object(Bucket=bucket, Key="large")["Body"].read() == large
    assert s3.get_object(Bucket=bucket, Key="small")["Body"].read() == small
    assert s3.get_object(Bucket=bucket, Key="large")["Body"].read() == large
    start = LARGE // 2 - 12345
    ranged = s3.get_object(Bucket=bucket, Key="large", Range=f"bytes={start}-{start + 99_999}")
    assert ranged["Body"].read() == large[start:start + 100_000]
    assert s3.head_object(Bucket=bucket, Key="large")["ContentLength"] == LARGE
    listed = s3.list_objects_v2(Bucket=bucket)["Contents"]
    assert sorted((o["Key"], o["Size"]) for o in listed) == [("large", LARGE), ("small", 1000)]
    with pytest.raises(ClientError) as missing:
        s3.head_object(Bucket=bucket, Key="absent")
    assert missing.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    # The proxy counts an answer done just after its last byte went out, so the client may ask first.
    assert wait_for(lambda: proxy.stats()["in_flight"] == 0, 5)
    stats = proxy.stats()
    assert stats["methods"] == {"PUT": 2, "GET": 4, "HEAD": 2} and stats["faults"] == {}
    assert stats["connections"] == 1  # one keep-alive connection carried every request


def test_the_round_trip_is_added_to_every_request(moto):
    proxy, bucket, s3 = moto
    s3.head_object(Bucket=bucket, Key="k")  # the connection is open before measuring

    def slowest_of_three() -> float:
        times = []
        for _ in range(3):
            began = time.monotonic()
            s3.head_object(Bucket=bucket, Key="k")
            times.append(time.monotonic() - began)
        return min(times)

    plain = slowest_of_three()
    proxy.set_rtt(0.25)
    delayed = slowest_of_three()
    assert 0.25 <= delayed < plain + 0.25 + 0.2, (plain, delayed)
    proxy.set_rtt(0.25, jitter=0.1)
    assert 0.15 <= slowest_of_three() < plain + 0.35 + 0.2


def test_waiting_for_100_continue_costs_a_second_round_trip(moto):
    """As on a network: the 100 Continue comes back and the body goes out before the server
    can answer. botocore sends every PUT body with Expect: 100-continue unless told not to."""
    proxy, bucket, waits = moto
    plain = client_through(proxy.url)
    plain.meta.events.unregister("before-call.s3", botocore.handlers.add_expect_header)
    for s3 in (waits, plain):
        s3.head_object(Bucket=bucket, Key="k")  # the connection is open before measuring
    proxy.set_rtt(0.25)
    proxy.reset_stats()

    def put(s3) -> float:
        began = time.monotonic()
        s3.put_object(Bucket=bucket, Key="k", Body=b"a small body")
        return time.monotonic() - began

    one = put(plain)
    assert proxy.stats()["expect_continue"] == 0
    two = put(waits)
    assert proxy.stats()["expect_continue"] == 1
    # One round trip against two (the proxy's delays; the slack is the server's own time).
    assert 0.25 <= one < 0.45 and 0.5 <= two < 0.7, (one, two)


def test_a_blackhole_loses_connections_until_their_clients_give_up(moto):
    """Requests on new and pooled connections are held; a held connection stays unanswered
    after heal, until its client's read timeout; new requests pass at once after heal."""
    proxy, bucket, s3 = moto
    pooled = client_through(proxy.url, read_timeout=2)
    pooled.head_object(Bucket=bucket, Key="k")
    s3.head_object(Bucket=bucket, Key="k")
    proxy.blackhole()
    began = time.monotonic()
    with pytest.raises(ReadTimeoutError):
        client_through(proxy.url, read_timeout=1).get_object(Bucket=bucket, Key="k")  # a new connection
    assert time.monotonic() - began >= 1
    outcome = []
    held = threading.Thread(target=lambda: outcome.append(
        pytest.raises(ReadTimeoutError, pooled.head_object, Bucket=bucket, Key="k")))
    held.start()
    assert wait_for(lambda: proxy.stats()["faults"] == {"blackhole": 2}, 5)  # held before heal
    proxy.heal()
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"0123456789"
    held.join(5)
    assert outcome and time.monotonic() - began >= 3  # lost, healed or not: its client timed out
    assert wait_for(lambda: proxy.stats()["in_flight"] == 0, 5)
    assert proxy.stats()["faults"] == {"blackhole": 2}


def test_an_answer_is_held_when_a_blackhole_begins_after_forwarding(moto):
    proxy, bucket, s3 = moto
    proxy.set_rtt(1.0)
    slow = client_through(proxy.url, read_timeout=3)
    outcome = []
    asking = threading.Thread(target=lambda: outcome.append(pytest.raises(ReadTimeoutError, slow.head_object,
                                                                          Bucket=bucket, Key="k")))
    asking.start()
    time.sleep(0.7)  # forwarded after 0.5 s; the answer is due at 1.0 s
    proxy.blackhole()
    asking.join(10)
    assert outcome and proxy.stats()["methods"] == {"HEAD": 1}


def test_a_reset_closes_the_connection_with_a_rst(moto):
    proxy, bucket, s3 = moto
    proxy.reset()
    with pytest.raises((BotoConnectionError, HTTPClientError)):
        s3.get_object(Bucket=bucket, Key="k")
    with socket.create_connection(("127.0.0.1", int(proxy.url.rsplit(":", 1)[1])), timeout=5) as raw:
        raw.sendall(f"GET /{bucket}/k HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        with pytest.raises(ConnectionResetError):  # a RST, not an orderly end of stream
            assert raw.recv(100) != b""
    proxy.heal()
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"0123456789"
    assert proxy.stats()["faults"] == {"reset": 2}


@pytest.mark.parametrize(("status", "code"), [(503, "SlowDown"), (500, "InternalError")])
def test_an_error_answer_is_an_s3_error(moto, status, code):
    proxy, bucket, s3 = moto
    proxy.error(status, code)
    for call in (lambda: s3.get_object(Bucket=bucket, Key="k"),
                 lambda: s3.put_object(Bucket=bucket, Key="k", Body=b"bytes: sent at once"),
                 lambda: s3.put_object(Bucket=bucket, Key="k", Body=io.BytesIO(b"a file: Expect: 100-continue"))):
        with pytest.raises(ClientError) as failed:
            call()
        assert failed.value.response["Error"]["Code"] == code
        assert failed.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    with pytest.raises(ClientError) as failed:
        s3.head_object(Bucket=bucket, Key="k")
    assert failed.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    proxy.heal()
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"0123456789"  # nothing was written
    assert proxy.stats()["faults"] == {"error": 4}


def test_a_share_of_requests_is_faulted(s3_server, s3_client):
    bucket = f"proxy-{os.urandom(6).hex()}"
    s3_client.create_bucket(Bucket=bucket)
    with FaultProxy(s3_server, seed=1) as proxy:
        s3 = client_through(proxy.url)
        proxy.error(503, "SlowDown", share=0.5)
        failed = 0
        for _ in range(200):
            try:
                s3.head_bucket(Bucket=bucket)
            except ClientError:
                failed += 1
        assert 60 < failed < 140
        assert proxy.stats()["faults"] == {"error": failed} and proxy.stats()["requests"] == 200


def test_slow_bodies_trickle(moto):
    proxy, bucket, s3 = moto
    data = os.urandom(200_000)
    s3.put_object(Bucket=bucket, Key="big", Body=data)
    proxy.slow_body(400_000)
    began = time.monotonic()
    assert s3.get_object(Bucket=bucket, Key="big")["Body"].read() == data
    assert time.monotonic() - began >= 0.45
    proxy.heal()
    began = time.monotonic()
    assert s3.get_object(Bucket=bucket, Key="big")["Body"].read() == data
    assert time.monotonic() - began < 0.45
    assert proxy.stats()["faults"] == {"slow_body": 1}


def test_requests_in_flight_are_counted(moto):
    proxy, bucket, _ = moto
    s3 = client_through(proxy.url, pool=8)
    proxy.set_rtt(0.6)
    proxy.reset_stats()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: s3.head_object(Bucket=bucket, Key="k"), range(16)))
    assert wait_for(lambda: proxy.stats()["in_flight"] == 0, 5)
    stats = proxy.stats()
    assert stats["requests"] == 16 and stats["methods"] == {"HEAD": 16} and stats["max_in_flight"] == 8
    assert stats["max_connections"] == 8


def test_a_thousand_keep_alive_connections_at_once(moto):
    """1,000 connections, each with two requests in a row on it, all in flight together
    (the round trip holds them): every answer exact, every connection kept."""
    proxy, bucket, s3 = moto
    proxy.set_rtt(1.0)
    port = int(proxy.url.rsplit(":", 1)[1])
    signed = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "k"})
    target = signed.split(str(port), 1)[1]
    request = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()

    async def two_requests() -> list[bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        bodies = []
        for _ in range(2):
            writer.write(request)
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            assert head.startswith("HTTP/1.1 200 "), head
            length = int(next(line for line in head.split("\r\n") if line.lower().startswith("content-length:"))
                         .split(":")[1])
            bodies.append(await reader.readexactly(length))
        writer.close()
        return bodies

    async def all_at_once():
        return await asyncio.gather(*(two_requests() for _ in range(1000)))

    answers = asyncio.run(all_at_once())
    assert answers == [[b"0123456789"] * 2] * 1000
    stats = proxy.stats()
    assert stats["requests"] == 2000 and stats["max_connections"] == 1000
    assert stats["max_in_flight"] > 500


def test_the_proxy_runs_as_a_process_driven_through_its_control_channel(s3_server, s3_client):
    bucket = f"proxy-{os.urandom(6).hex()}"
    s3_client.create_bucket(Bucket=bucket)
    s3_client.put_object(Bucket=bucket, Key="k", Body=b"0123456789")
    proc = subprocess.Popen([sys.executable, "-m", "tests.faultproxy", "--upstream", s3_server, "--rtt", "0.2"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        s3 = client_through(url)
        began = time.monotonic()
        assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"0123456789"
        assert time.monotonic() - began >= 0.2
        assert control(url, "error", status=503, code="SlowDown", share=1.0) == {}
        with pytest.raises(ClientError, match="SlowDown"):
            s3.get_object(Bucket=bucket, Key="k")
        control(url, "heal")
        control(url, "set_rtt", rtt=0)
        assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"0123456789"
        stats = control(url, "stats")
        assert stats["requests"] == 3 and stats["faults"] == {"error": 1}
        with pytest.raises(Exception, match="400"):
            control(url, "reset", share=2)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


def test_the_request_log_keeps_the_last_requests_answered_with_when_the_store_answered(s3_server, s3_client):
    bucket = f"proxy-{os.urandom(6).hex()}"
    s3_client.create_bucket(Bucket=bucket)
    with FaultProxy(s3_server, rtt=0.2, log_size=3) as proxy:
        s3 = client_through(proxy.url)
        before = time.time()
        for i in range(4):
            s3.put_object(Bucket=bucket, Key=f"k{i}", Body=b"x")
        after = time.time()
        s3.head_object(Bucket=bucket, Key="k0")
        # An answer is logged just after its last byte went out: the client may ask first.
        assert wait_for(lambda: proxy.completed(since=1)["next"] == 5, 5)
        log = proxy.completed(since=1)
        assert log["next"] == 5 and log["dropped"] == 1  # entry 1 was pushed out by entry 4
        assert [e[1:] for e in log["entries"]] == [
            ["PUT", f"/{bucket}/k2", 200], ["PUT", f"/{bucket}/k3", 200], ["HEAD", f"/{bucket}/k0", 200]]
        # Stamped when the server answered: half a round trip before the client had the answer.
        assert before + 0.1 <= log["entries"][0][0] <= after - 0.1 - 0.2
        assert control(proxy.url, "log", since=4) == {"entries": [log["entries"][-1]], "next": 5, "dropped": 0}
    with FaultProxy(s3_server) as unlogged:
        client_through(unlogged.url).head_object(Bucket=bucket, Key="k0")
        assert unlogged.completed() == {"entries": [], "next": 0, "dropped": 0}
