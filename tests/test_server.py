"""The HTTP API of ``tenantsync serve`` in embedded mode, with concurrent hydrations."""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from scheduler import embedded
from tenantsync.catalogue import TenantState, open_catalogue
from tenantsync.client import Client
from tenantsync.config import Config
from tenantsync.errors import TenantSyncError

from .dbutil import app_db, dump, wait_for, write_rows

TENANTS = int(os.environ.get("TENANTSYNC_SERVE_TENANTS", "40"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url, method="GET", body=None):
    """(status, JSON answer); ``body`` is JSON-encoded unless it is bytes (sent as they are)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, method=method, data=data)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())



@pytest.fixture
def served(tmp_path, file_url):
    data = tmp_path / "data"
    data.mkdir()
    port = free_port()
    cfg = Config(replica=file_url, globs=(f"{data}/*.db",), catalogue=f"sqlite:///{tmp_path}/cat.db",
                 host="h1", idle_after=timedelta(seconds=1),
                 archive_after=((f"{data}/*.db", timedelta(seconds=3)),))
    stop = threading.Event()
    thread = threading.Thread(target=embedded.run, args=(cfg, stop), kwargs={"http": ("127.0.0.1", port)},
                              daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    assert wait_for(lambda: _up(base), 10)
    yield cfg, base, data
    stop.set()
    thread.join(30)


def _up(base):
    try:
        return call(base + "/healthz")[0] == 200
    except OSError:
        return False


def test_idle_tenants_are_archived_and_concurrent_hydrations_bring_them_back(served):
    cfg, base, data = served
    expected, conns = {}, {}
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
        Client(base).hydrate("missing.db")
    assert not (data / "missing.db").exists()
