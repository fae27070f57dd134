"""The HTTP API of ``tenantsync serve`` in embedded mode, with concurrent hydrations."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from scheduler import embedded
from tenantsync.catalogue import TenantState, open_catalogue
from tenantsync.client import Client
from tenantsync import config as configmod
from tenantsync.config import Config
from tenantsync.errors import TenantSyncError
from tenantsync.ondemand import open_by_others
from tenantsync.replica import Replica
from tenantsync.restore import restore
from tenantsync.storage import open_storage
from tenantsync.tenants import shard

from .dbutil import app_db, application_holding, dump, wait_for, write_rows

TENANTS = int(os.environ.get("TENANTSYNC_SERVE_TENANTS", "40"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: The API token of every fleet these tests serve over HTTP (set by conftest.py).
TOKEN = os.environ["TENANTSYNC_API_TOKEN"]


def call(url, method="GET", body=None, token=TOKEN):
    """(status, JSON answer); ``body`` is JSON-encoded unless it is bytes (sent as they are)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(url, method=method, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())



@contextlib.contextmanager
def embedded_fleet(cfg: Config, host: str = "127.0.0.1", up_within: float = 15):
    """``cfg``'s embedded fleet on a thread, serving its API on ``host`` at a free port:
    yields the base URL (asked through loopback) once /healthz answers."""
    port = free_port()
    stop = threading.Event()
    thread = threading.Thread(target=embedded.run, args=(cfg, stop), kwargs={"http": (host, port)}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _up(base), up_within)
        yield base
    finally:
        stop.set()
        thread.join(60)


@pytest.fixture
def served(tmp_path, file_url):
    data = tmp_path / "data"
    data.mkdir()
    cfg = Config(replica=file_url, globs=(f"{data}/*.db",), catalogue=f"sqlite:///{tmp_path}/cat.db",
                 host="h1", idle_after=timedelta(seconds=1), api_token=TOKEN,
                 archive_after=((f"{data}/*.db", timedelta(seconds=3)),))
    with embedded_fleet(cfg) as base:
        yield cfg, base, data


def _up(base):
    try:
        return call(base + "/healthz")[0] in (200, 401)
    except OSError:
        return False


def test_idle_tenants_are_archived_and_concurrent_hydrations_bring_them_back(served):
    cfg, base, data = served
    conns = {}
    for i in range(TENANTS):
        name = f"t{i:03d}.db"
        conns[name] = app_db(data / name)
        write_rows(conns[name], 10)
    hot = {f"t{i:03d}.db" for i in range(0, TENANTS, 4)}
    cold = set(conns) - hot
    for name in cold:
        conns.pop(name).close()
    catalogue = open_catalogue(cfg)
    stop_writing = threading.Event()

    for name in hot:
        conns.pop(name).close()

    def keep_hot():
        rng = random.Random(1)
        mine = {name: app_db(data / name) for name in hot}
        while not stop_writing.is_set():
            write_rows(mine[rng.choice(sorted(hot))], 2)
            time.sleep(0.02)

    writer = threading.Thread(target=keep_hot)
    writer.start()
    try:
        assert wait_for(lambda: all(
            (t := catalogue.get(n)) is not None and t.state == TenantState.archived for n in cold), 90)
        assert all(not (data / n).exists() for n in cold)
        assert all(catalogue.get(n).state != TenantState.archived for n in hot)
        rng = random.Random(2)
        names = [rng.choice(sorted(cold)) for _ in range(25)] + [rng.choice(sorted(hot)) for _ in range(25)]
        with ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(lambda n: call(f"{base}/tenants/{n}/hydrate", "POST", {}), names))
    finally:
        stop_writing.set()
        writer.join()
    assert all(status == 200 for status, _ in answers), answers
    for name, (_, body) in zip(names, answers):
        assert body["name"] == name and os.path.exists(body["path"])
        dump(body["path"])  # complete and readable: never a partial file
    assert call(f"{base}/tenants/nope.db")[0] == 404


def test_client_over_http_reports_failures_in_one_line(served):
    cfg, base, data = served
    with pytest.raises(TenantSyncError, match="no LTX files|unknown"):
        Client(base, token=TOKEN).hydrate("missing.db")
    assert not (data / "missing.db").exists()


# -- `tenantsync serve` with shard children (host-workers) ------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def serve_command(tmp_path, file_url):
    """``tenantsync serve`` as a user runs it, with ``host-workers: 2`` in its tenantsync.yml:
    the command's process syncs shard 0 and a child process shard 1. ``idle-after`` is long,
    so a tenant written during the test stays open in the process of its shard. Yields
    ``start(names)`` (see there) and ``cli(*args)``, another tenantsync command on the same
    config; stops the serve command with SIGTERM after."""
    data = tmp_path / "data"
    data.mkdir()
    port = free_port()
    config = tmp_path / "tenantsync.yml"
    config.write_text(json.dumps({"replica": file_url, "globs": [f"{data}/*.db"], "host": "h1",
                                  "catalogue": f"sqlite:///{tmp_path}/cat.db", "idle-after": "10m",
                                  "host-workers": 2, "api-token": TOKEN}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    procs = []

    def start(names: list[str]):
        """Tenants ``names`` with rows, then the command, then a write to each once synced:
        each is then open in the process of its shard. Returns (base URL, catalogue,
        {name: path}, {name: its rows})."""
        paths = {name: str(data / name) for name in names}
        for path in paths.values():
            write_rows(conn := app_db(path), 10)
            conn.close()
        with open(tmp_path / "serve.log", "wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tenantsync", "serve", "--config", str(config), "--listen", f"127.0.0.1:{port}"],
                env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=log, stderr=log))
        base = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: _up(base), 30), (tmp_path / "serve.log").read_text()
        catalogue = open_catalogue(configmod.load(str(config)))
        expected = {}
        for name, path in paths.items():
            assert wait_for(lambda: (t := catalogue.get(name)) is not None and (t.txid or 0) > 0, 30)
            write_rows(conn := app_db(path), 5)  # a write within idle-after: the tenant is open
            conn.close()
            expected[name] = dump(path)
            assert wait_for(lambda: open_in_tenantsync(path), 30)
        return base, catalogue, paths, expected

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tenantsync", *args, "--config", str(config)], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)

    yield start, cli
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def names_on_shards(count: int = 2, prefix: str = "t") -> list[str]:
    """One tenant name per shard of ``count`` (shard 0: the command's process, then children)."""
    found: dict[int, str] = {}
    for i in range(1000):
        found.setdefault(shard(name := f"{prefix}{i:03d}.db", count), name)
        if len(found) == count:
            return [found[k] for k in range(count)]
    raise AssertionError("no names for every shard")


def open_in_tenantsync(path: str) -> set[int]:
    """The pids holding ``path`` open, other than this test's process: tenantsync's own."""
    return set(open_by_others([path])) - {os.getpid()}


def assert_archived(catalogue, url: str, name: str, path: str, expected: list, restored) -> None:
    """The tenant is archived, its local files gone, and its replica restores to ``expected``."""
    assert not any(os.path.exists(path + s) for s in ("", "-wal", "-shm")), name
    assert catalogue.get(name).state == TenantState.archived
    restore(Replica(open_storage(url).child(name)), str(restored))
    assert dump(str(restored)) == expected


def test_http_archive_of_a_tenant_open_in_a_shard_child_archives_it(serve_command, tmp_path, file_url):
    """Archival over HTTP reaches the process of the tenant's shard, which lets go of the
    tenant itself: a tenant written within idle-after, so open in its process (a child for
    shard 1), is archived (200), its files gone and the replica holding every row; hydrating
    it over HTTP brings the same rows back, and a tenant nowhere is a 404 whichever process
    looked (the child's RestoreError kept its type). The archival must not refuse because
    the file is open by tenantsync's own child ("open by pid N")."""
    start, _ = serve_command
    base, catalogue, paths, expected = start(names_on_shards())
    for name, path in paths.items():
        status, body = call(f"{base}/tenants/{name}/archive", "POST")
        assert status == 200 and body["archived"], (name, body)
        assert_archived(catalogue, file_url, name, path, expected[name], tmp_path / "restored" / name)
    for name, path in paths.items():
        status, body = call(f"{base}/tenants/{name}/hydrate", "POST", {})
        assert status == 200 and body["restored"] and body["state"] == TenantState.active.value, (name, body)
        assert dump(path) == expected[name]
    for missing in names_on_shards(prefix="missing"):  # RestoreError, also from a child: 404
        status, body = call(f"{base}/tenants/{missing}/hydrate", "POST", {})
        assert status == 404, (missing, body)


def test_http_archive_refused_while_an_application_has_the_file_open_names_its_pid(serve_command):
    """Only an application's handle refuses archival (409), and the refusal names the
    application's pid, not tenantsync's: tenantsync's process holding the tenant (a shard
    child) lets go of it first. The tenant stays local and is not archived."""
    start, _ = serve_command
    name = names_on_shards()[1]
    base, catalogue, paths, _ = start([name])
    with application_holding(paths[name], "INSERT INTO t(v) VALUES (1)") as holder:
        status, body = call(f"{base}/tenants/{name}/archive", "POST")
        assert status == 409, body
        pids = re.search(r"open by pid ([\d, ]+)$", body["error"])
        assert pids and {int(p) for p in pids[1].split(", ")} == {holder.pid}, body
        assert os.path.exists(paths[name]) and catalogue.get(name).state != TenantState.archived


def test_cli_archive_while_serve_has_the_tenant_open_waits_for_it_to_let_go(serve_command, tmp_path, file_url):
    """``tenantsync archive NAME``, another process than the running fleet's: the command
    sends it to the fleet over its control socket, and the fleet process holding the tenant
    (the command's own for shard 0, a child for shard 1) archives it, instead of refusing
    with that process's pid (test_owner_socket.py has the path of an archival by a process
    that does not reach the owner). Hydrating over HTTP brings the rows back.
    An application writing the tenant and holding it open still makes it refuse (after
    the bounded wait), naming the application's pid only."""
    start, cli = serve_command
    base, catalogue, paths, expected = start(names_on_shards())
    for name, path in paths.items():
        proc = cli("archive", name)
        assert proc.returncode == 0 and proc.stdout.startswith(f"archived {name} "), (proc.stdout, proc.stderr)
        assert_archived(catalogue, file_url, name, path, expected[name], tmp_path / "restored" / name)
        status, body = call(f"{base}/tenants/{name}/hydrate", "POST", {})
        assert status == 200 and body["restored"] and dump(path) == expected[name], (name, body)
    name = names_on_shards()[1]
    with application_holding(paths[name], "INSERT INTO t(v) VALUES (1)") as holder:
        assert wait_for(lambda: open_in_tenantsync(paths[name]) - {holder.pid}, 30)  # the child has it open
        proc = cli("archive", name)
        pids = re.search(r"open by pid ([\d, ]+)$", proc.stderr.strip())
        assert proc.returncode != 0 and pids and {int(p) for p in pids[1].split(", ")} == {holder.pid}, proc.stderr
        assert os.path.exists(paths[name]) and catalogue.get(name).state != TenantState.archived


def test_an_owner_that_does_not_answer_is_a_504():
    from tenantsync.errors import NoAnswer
    from tenantsync.server import status_of

    assert status_of(NoAnswer("archive a.db: no answer")) == 504
