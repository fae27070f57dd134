"""What operators read: /metrics (bounded series, every process of the host counted) and
/readyz (store, lag). Real catalogues, a real fleet, a real S3 server behind the fault proxy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from datetime import datetime, timedelta, timezone

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tenantsync import metrics
from tenantsync.catalogue import open_catalogue
from tenantsync.config import Config
from tenantsync.outcome import Failed, NothingNew, Shipped
from tenantsync.tenants import shard

from .dbutil import app_db, wait_for, write_rows
from .test_server import ROOT, TOKEN, _up, call, embedded_fleet, free_port


def series(text: str) -> dict[str, float]:
    """Every sample of an exposition, parsed by prometheus_client's own parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name + json.dumps(sample.labels, sort_keys=True)] = sample.value
    return out


def fleet_of(tmp_path, n: int) -> Config:
    cfg = Config(replica=f"file://{tmp_path}/replica", globs=(f"{tmp_path}/*.db",),
                 catalogue=f"sqlite:///{tmp_path}/cat-{n}.db", host="h1")
    catalogue = open_catalogue(cfg)
    names = [f"t{i:05d}.db" for i in range(n)]
    catalogue.discover_many([(name, f"{tmp_path}/{name}") for name in names], "h1")
    now = datetime.now(timezone.utc)
    catalogue.record_writes(names[: n // 2], now - timedelta(seconds=30))  # half have writes pending
    catalogue.record_caught_up(names[0], now - timedelta(seconds=40))  # a pass before the write: still pending
    catalogue.record_caught_up(names[1], now)  # a pass after it: current again
    return cfg


def test_series_are_the_same_for_10_and_1000_tenants(tmp_path):
    for outcome in (Shipped("a", 1, 1, 10), NothingNew("a"), Failed("a", RuntimeError("boom"), transient=True)):
        metrics.job_done("sync", outcome, 0.01)
    for result in ("ok", "not_found", "throttled"):
        metrics.store_request("write", result, 0.03, sent=100, received=0)
    counts = {}
    for n in (10, 1000):
        cfg = fleet_of(tmp_path, n)
        text, content_type = metrics.exposition(open_catalogue(cfg), 60.0)
        assert content_type.startswith("text/plain")
        got = series(text.decode())
        counts[n] = len([k for k in got if k.startswith("tenantsync_")])
        assert got['tenantsync_tenants{"state": "idle"}'] == n
        # Half were written 30 s ago; the second was synced since: lag is 30 s for the rest.
        pending = n // 2 - 1
        assert got['tenantsync_replication_lag_seconds_bucket{"le": "10.0"}'] == n - pending
        assert got['tenantsync_replication_lag_seconds_bucket{"le": "60.0"}'] == n
        assert 29 <= got["tenantsync_replication_lag_max_seconds{}"] < 40
        assert got['tenantsync_jobs_total{"job": "sync", "outcome": "shipped"}'] >= 1
        assert got['tenantsync_store_bytes_total{"direction": "up"}'] >= 300
    assert counts[10] == counts[1000], counts


def test_metrics_switched_off_count_nothing_and_the_fleet_is_still_shown(tmp_path):
    cfg = fleet_of(tmp_path, 10)
    script = (
        "import sys\n"
        "from tenantsync import metrics\n"
        "from tenantsync.catalogue import open_catalogue\n"
        "from tenantsync.config import Config\n"
        "from tenantsync.outcome import Shipped\n"
        "metrics.job_done('sync', Shipped('a', 1, 1, 10), 0.01)\n"
        "metrics.store_request('write', 'ok', 0.03, sent=100)\n"
        "metrics.lease_handover(); metrics.fence_refusal()\n"
        f"cfg = Config(replica={cfg.replica!r}, globs={cfg.globs!r}, catalogue={cfg.catalogue!r}, host='h1')\n"
        "sys.stdout.write(metrics.exposition(open_catalogue(cfg), 60.0)[0].decode())\n")
    env = {k: v for k, v in os.environ.items() if k != metrics.ENV}
    for switch, counted in (("off", False), ("on", True)):
        out = subprocess.run([sys.executable, "-c", script], env=dict(env, PYTHONPATH=ROOT, TENANTSYNC_METRICS=switch),
                             capture_output=True, text=True, check=True).stdout
        got = series(out)
        assert got['tenantsync_tenants{"state": "idle"}'] == 10
        assert ('tenantsync_jobs_total{"job": "sync", "outcome": "shipped"}' in got) is counted
        assert ('tenantsync_store_requests_total{"operation": "write", "result": "ok"}' in got) is counted


@pytest.fixture
def proxied_fleet(tmp_path, proxied_s3_url, monkeypatch):
    from tenantsync import observe

    monkeypatch.setattr(observe, "STORE_CHECK_EVERY", 0.0)  # every /readyz asks the store: see each change
    data = tmp_path / "data"
    data.mkdir()
    cfg = Config(replica=proxied_s3_url, globs=(f"{data}/*.db",), catalogue=f"sqlite:///{tmp_path}/cat.db",
                 host="h1", api_token=TOKEN, max_lag=timedelta(seconds=2))
    with embedded_fleet(cfg) as base:
        yield cfg, base, data


def test_readyz_fails_while_the_store_is_away_and_lag_passes_max_lag(proxied_fleet, s3_proxy):
    cfg, base, data = proxied_fleet
    write_rows(conn := app_db(data / "a.db"), 3)

    def shipped() -> bool:
        status, body = call(base + "/tenants/a.db")
        return status == 200 and body["txid"] != "0" * 16

    last = {}

    def ready() -> bool:
        last["readyz"] = call(base + "/readyz")
        return shipped() and last["readyz"][0] == 200

    assert wait_for(ready, 30), last  # what /readyz said last, if it never was ready
    s3_proxy.blackhole()
    try:
        write_rows(conn, 2)  # cannot ship: its lag grows past max-lag (2 s)
        assert wait_for(lambda: "lag" in call(base + "/readyz")[1].get("failed", {}), 30)
        status, body = call(base + "/readyz")
        assert status == 503 and body["ready"] is False
        assert "store" in body["failed"], body
        assert body["lagging"][0]["name"] == "a.db" and body["lagging"][0]["lag"] > 2
    finally:
        s3_proxy.heal()
    assert wait_for(lambda: call(base + "/readyz")[0] == 200, 60), call(base + "/readyz")
    conn.close()


def test_metrics_add_up_every_process_of_the_host(tmp_path, file_url):
    """``tenantsync serve`` with a shard child: syncs done in either process are counted."""
    data = tmp_path / "data"
    data.mkdir()
    names = []
    i = 0
    while len({shard(n, 2) for n in names}) < 2 or len(names) < 6:
        names.append(f"t{i}.db")
        i += 1
    for name in names:
        write_rows(conn := app_db(data / name), 3)
        conn.close()
    config = tmp_path / "tenantsync.yml"
    config.write_text(json.dumps({"replica": file_url, "globs": [f"{data}/*.db"], "host": "h1",
                                  "catalogue": f"sqlite:///{tmp_path}/cat.db", "host-workers": 2}))
    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT)
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tenantsync", "serve", "--config", str(config),
                                 "--listen", f"127.0.0.1:{port}"], env=env, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        def shipped() -> float:
            with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
                got = series(resp.read().decode())
            return got.get('tenantsync_jobs_total{"job": "sync", "outcome": "shipped"}', 0)

        assert wait_for(lambda: _up(base) and shipped() >= len(names), 60), (tmp_path / "serve.log").read_text()
    finally:
        proc.terminate()
        proc.wait(30)


def test_lag_is_measured_from_the_oldest_write_not_shipped(tmp_path):
    """A pass clears what was written before it started; a write during it stays pending,
    at most since the pass started; a tenant written without pause while its passes fail
    keeps growing."""
    cfg = fleet_of(tmp_path, 2)
    catalogue = open_catalogue(cfg)
    catalogue.discover("late.db", f"{tmp_path}/late.db", "h1")  # never synced: its times are the test's
    t0 = datetime.now(timezone.utc) - timedelta(minutes=10)
    catalogue.record_caught_up("late.db", t0 + timedelta(seconds=1))
    assert catalogue.get("late.db").pending_since is None
    for i in range(5):  # writes every minute, no pass ships
        catalogue.record_writes(["late.db"], t0 + timedelta(minutes=1 + i))
    assert catalogue.get("late.db").pending_since == t0 + timedelta(minutes=1)
    catalogue.record_sync("late.db", txid=1, position=None, at=t0 + timedelta(minutes=4, seconds=30), state=None)
    # The write at minute 5 came after that pass started: pending since the pass's start.
    assert catalogue.get("late.db").pending_since == t0 + timedelta(minutes=4, seconds=30)
    catalogue.record_sync("late.db", txid=2, position=None, at=t0 + timedelta(minutes=6), state=None)
    assert catalogue.get("late.db").pending_since is None
    # A batch of write events recorded after a pass that started after those writes (so
    # shipped them) leaves nothing pending: a tenant released idle would otherwise show a
    # lag growing forever with nothing left to ship.
    catalogue.record_writes(["late.db"], t0 + timedelta(minutes=5, seconds=59))
    assert catalogue.get("late.db").pending_since is None
    assert catalogue.get("late.db").last_write_at == t0 + timedelta(minutes=5, seconds=59)
    view = catalogue.fleet_view(datetime.now(timezone.utc))
    assert "late.db" not in view.lags and list(view.lags) == ["t00000.db"]  # fleet_of's pending one
    assert view.lag_percentile(50) == 0.0 and view.lag_percentile(100) == view.lags["t00000.db"]


def test_status_prints_the_fleet_and_its_most_lagging_tenants(tmp_path):
    cfg = fleet_of(tmp_path, 10)
    proc = subprocess.run([sys.executable, "-m", "tenantsync", "status", "--json", "--replica", cfg.replica,
                           "--catalogue", cfg.catalogue], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=ROOT), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["tenants"] == 10 and got["states"]["idle"] == 10
    assert {t["name"] for t in got["most_lagging"]} == {"t00000.db", "t00002.db", "t00003.db", "t00004.db"}
    assert 29 <= got["lag_seconds"]["max"] < 40 and got["lag_seconds"]["p50"] == 0.0
    text = subprocess.run([sys.executable, "-m", "tenantsync", "status", "--replica", cfg.replica,
                           "--catalogue", cfg.catalogue], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=ROOT), cwd=tmp_path).stdout
    assert "10 tenants (10 idle)" in text and "t00000.db" in text


def test_the_grafana_dashboard_queries_only_metrics_that_exist(tmp_path, redis_server):
    import re

    from scheduler.queue_metrics import QueueCollector
    from scheduler.routing import make_app

    app = make_app(Config(broker=redis_server.url, host="h1"))  # Celery mode's queue metrics too

    metrics.store_request("read", "ok", 0.01, received=1)
    metrics.job_done("sync", NothingNew("a"), 0.01)  # labelled series exist once used
    metrics.lease_handover()
    metrics.fence_refusal()
    text, _ = metrics.exposition(open_catalogue(fleet_of(tmp_path, 3)), 60.0, (QueueCollector(app, ["storage"]),))
    app.close()
    exposed = {sample.split("{")[0].split(" ")[0] for sample in text.decode().splitlines() if not sample.startswith("#")}
    dashboard = json.loads((open(os.path.join(ROOT, "compose", "grafana", "dashboards", "tenantsync.json"))).read())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"tenantsync_[a-z_]+", target["expr"])}
    assert queried and queried <= exposed, queried - exposed
