#!/usr/bin/env python3
"""The operators' view at fleet size: response times of the status page, /metrics and
/readyz over a catalogue of ``--tenants`` (10,000) rows, and what counting metrics costs a sync.

    python bench/observe.py                      # 10,000 tenants, 200 requests per route
    python bench/observe.py --tenants 1000 --requests 50 --json out.json

The catalogue is a real SQLite catalogue holding the rows a fleet of that size leaves: every
tenant synced (TXID, sizes, WAL bytes), a tenth with writes pending for 0-120 s (the lag
histogram and the lag sort have work), a few in error. The API is the one ``serve`` runs
(serving.Served, api_guard.Guard, server.make_app with the observe and status-page routes)
on 127.0.0.1, asked by one client at a time; each route's answers are timed from the
request to the last byte. The replica is a ``file://`` root with each asked tenant's
files. Metrics count in multiprocess mode, as a fleet process does.

The cost of metrics on a sync: the calls one shipped sync makes (one job count, three
store-request counts) timed in a loop, next to the CPU of a sync pass measured on the same
machine by bench/remote.py's profile (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def percentile(xs: list[float], p: float) -> float:
    ranked = sorted(xs)
    return ranked[min(len(ranked) - 1, max(0, round(p / 100 * len(ranked) + 0.5) - 1))]


def build(work: str, n: int):
    from tenantsync.catalogue import TenantState, open_catalogue
    from tenantsync.config import Config
    from tenantsync.storage import open_storage

    cfg = Config(replica=f"file://{work}/replica", globs=(f"{work}/data/*.db",),
                 catalogue=f"sqlite:///{work}/catalogue.db", host="bench", api_token="bench-token")
    catalogue = open_catalogue(cfg)
    names = [f"tenant-{i:05d}.db" for i in range(n)]
    catalogue.discover_many([(name, f"{work}/data/{name}") for name in names], "bench")
    now = datetime.now(timezone.utc)
    rng = random.Random(1)
    for i, name in enumerate(names):  # one transaction each, as syncs make them
        catalogue.record_sync(name, txid=rng.randint(1, 5000), position=None, at=now - timedelta(seconds=rng.uniform(1, 600)),
                              state=TenantState.active, bytes_added=rng.randint(10_000, 50_000_000),
                              wal_bytes=rng.randint(0, 4_000_000))
    pending = rng.sample(names, n // 10)
    for name in pending:
        catalogue.record_writes([name], now - timedelta(seconds=rng.uniform(0, 120)))
    for name in rng.sample(names, max(1, n // 500)):
        catalogue.record_error(name, "s3://bucket/x: write lock.json: no answer (3 tries over 12.2 s)")
    store = open_storage(cfg.replica)
    store.make_root()
    return cfg, catalogue, store, names


def serve(cfg, catalogue, store):
    from tenantsync.api_guard import Guard, Policy
    from tenantsync.observe import CachedCheck, observe_routes
    from tenantsync.server import make_app
    from tenantsync.serving import Served, tcp_listener
    from tenantsync.status_page import status_routes

    class Tenants:  # the routes read the catalogue only; no job runs in this bench
        pass

    owner = Tenants()
    owner.catalogue = catalogue
    checks = {"store": CachedCheck(lambda: next(iter(store.list("readyz-probe/")), None))}
    routes = observe_routes(catalogue, 60.0, checks) + status_routes(catalogue, store, cfg.fleet, cfg.host)
    sock = tcp_listener("127.0.0.1", 0)
    served = Served(Guard(make_app(owner, routes), Policy(cfg.api_token, True)), [sock]).start("bench-http")
    return served, f"http://127.0.0.1:{sock.getsockname()[1]}"


def timed(url: str, requests: int) -> dict:
    times, size = [], 0
    for _ in range(requests):
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                body, status = resp.read(), resp.status
        except urllib.error.HTTPError as e:  # /readyz: 503 while lag is above max-lag
            body, status = e.read(), e.code
        times.append(time.perf_counter() - t0)
        size = len(body)
    return {"status": status, "p50_ms": percentile(times, 50) * 1000, "p95_ms": percentile(times, 95) * 1000,
            "max_ms": max(times) * 1000, "bytes": size, "n": requests}


def metrics_cost(loops: int) -> dict:
    """µs that one shipped sync spends counting: a job and three store requests."""
    from tenantsync import metrics
    from tenantsync.outcome import Shipped

    outcome = Shipped("t.db", 1, 2, 4096)
    metrics.job_done("sync", outcome, 0.01)
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(loops):
        metrics.job_done("sync", outcome, 0.012)
        metrics.store_request("write", "ok", 0.031, sent=120)
        metrics.store_request("list", "ok", 0.030, received=600)
        metrics.store_request("write", "ok", 0.033, sent=4096)
    return {"us_per_sync": (time.perf_counter() - t0) / loops * 1e6,
            "cpu_us_per_sync": (time.process_time() - cpu0) / loops * 1e6, "loops": loops}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tenants", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--json")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="tenantsync-observe-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(work, "metrics")  # as a fleet process counts
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    t0 = time.monotonic()
    cfg, catalogue, store, names = build(work, a.tenants)
    print(f"catalogue of {a.tenants:,} tenants built in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    cost = metrics_cost(20_000)
    asked = names[len(names) // 2]
    from tenantsync import layout
    from tenantsync.replica import Replica

    # The tenant page lists its replica (names and sizes, no content read): give it 20 files.
    replica = Replica(store.child(asked))
    for txid in range(1, 21):
        replica.storage.write_if_absent(layout.ltx_key(store.kind, 0, txid, txid), bytes(100))
    served, base = serve(cfg, catalogue, store)
    routes = {
        "/ (first page)": "/",
        "/?q=…&sort=lag (search, lag order)": "/?q=tenant-04&sort=lag&order=desc",
        "/?page=N/100&sort=wal_bytes (deep page)": f"/?page={max(1, a.tenants // 100)}&sort=wal_bytes&order=desc",
        "/t/NAME (tenant page)": f"/t/{asked}",
        "/metrics": "/metrics",
        "/readyz": "/readyz",
    }
    results = {"tenants": a.tenants, "requests": a.requests, "metrics_cost": cost, "routes": {}}
    try:
        for label, path in routes.items():
            results["routes"][label] = r = timed(base + path, a.requests)
            print(f"{label:42} {r['status']} p50 {r['p50_ms']:6.1f} ms  p95 {r['p95_ms']:6.1f} ms  max {r['max_ms']:6.1f} ms "
                  f"({r['bytes']:,} bytes)")
    finally:
        served.shutdown()
    print(f"metrics per shipped sync: {cost['us_per_sync']:.1f} µs ({cost['cpu_us_per_sync']:.1f} µs CPU)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
