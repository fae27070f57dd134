"""Catalogue write throughput under the embedded mode's contention: PROCESSES processes of
THREADS threads each record syncs (``Catalogue.record_sync``) of random tenants of a 10,000
tenant SQLite catalogue, paced at RATE per second in all, for SECONDS. Reports the calls
done and their latency (p50/p99/max): a sync's catalogue write is on its critical path.

    python bench/catalogue_writes.py [--processes 3] [--threads 4] [--rate 400] [--seconds 20] [--busy 1]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone

from tenantsync.catalogue import Catalogue, TenantState
from tenantsync.process import SWITCH_INTERVAL

TENANTS = 10_000


def spin(stop: threading.Event) -> None:
    """Python work holding the interpreter lock, as a syncing process's encodes do."""
    while not stop.is_set():
        sum(i * i for i in range(2000))


def worker(url: str, threads: int, rate: float, seconds: float, busy: int, out) -> None:
    catalogue = Catalogue(url, fleet="bench", migrate=False)
    sys.setswitchinterval(SWITCH_INTERVAL)  # as fleet processes run (tenantsync.process.prepare_process)
    stop = threading.Event()
    for _ in range(busy):
        threading.Thread(target=spin, args=(stop,), daemon=True).start()
    latencies: list[float] = []
    lock = threading.Lock()
    start = time.monotonic() + 0.5

    def run(seed: int) -> None:
        rng = random.Random(seed)
        interval = threads / rate
        due, mine = start, []
        while due < start + seconds:
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            name = f"t{rng.randrange(TENANTS):05d}.db"
            t = time.monotonic()
            catalogue.record_sync(name, txid=rng.randrange(1, 1 << 40), position={"offset": 4096},
                                  at=datetime.now(timezone.utc), state=TenantState.active, bytes_added=4096)
            mine.append(time.monotonic() - t)
            due += interval
        with lock:
            latencies.extend(mine)

    pool = [threading.Thread(target=run, args=(os.getpid() * 100 + i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    stop.set()
    out.put(latencies)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--processes", type=int, default=3)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--rate", type=float, default=400, help="record_sync calls per second, all processes")
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--busy", type=int, default=0, help="threads per process spinning in Python")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/catalogue.db"
        Catalogue(url, fleet="bench").discover_many(((f"t{i:05d}.db", f"/data/t{i:05d}.db") for i in range(TENANTS)), "h")
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        procs = [ctx.Process(target=worker, args=(url, a.threads, a.rate / a.processes, a.seconds, a.busy, out))
                 for _ in range(a.processes)]
        for proc in procs:
            proc.start()
        lat = sorted(x for _ in procs for x in out.get())
        for proc in procs:
            proc.join()
    pct = lambda q: round(1000 * lat[min(len(lat) - 1, int(q * len(lat)))], 2)  # noqa: E731
    print(json.dumps({"calls": len(lat), "per_s": round(len(lat) / a.seconds, 1), "p50_ms": pct(0.5),
                      "p99_ms": pct(0.99), "max_ms": round(1000 * lat[-1], 2), **vars(a)}))


if __name__ == "__main__":
    main()
