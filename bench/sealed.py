#!/usr/bin/env python3
"""Encryption at rest, on vs off in one run: shipping and restoring a large database, and
hydrating a 1 MB tenant, with the same fleet code and a ``file://`` replica.

    python bench/sealed.py                       # 300 MB, 3 ships, 3 restores, 50 hydrations per mode
    python bench/sealed.py --size-mb 100 --json out.json

Each mode is a Fleet (``encrypt`` off / on, a keyring in the environment) over its own
replica root. ``ship``: the first sync of a fresh copy of the database (one full snapshot:
LZ4 frames, sealed when encrypted), seconds, the modes alternating. ``restore``: ``restore.restore`` of the newest state into
a new file, the modes alternating so the disk's own variation falls on both; MB/s of the
database. ``hydrate``: a 1 MB tenant archived and hydrated again and again (OnDemand, as
``tenantsync hydrate`` runs it), per-hydration times. Commit-to-replica lag with
encryption on vs off is bench/fleet.py's ``--tools ts-embedded,ts-embedded-encrypted``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from datetime import timedelta

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import core  # noqa: E402 - bench/core.py, for its database builder
from observe import percentile  # noqa: E402 - bench/observe.py's nearest-rank percentile

MODES = ("plain", "encrypted")


def build_small(path: str, size: int) -> None:
    """A database of about ``size`` bytes: rows of random text, in WAL mode."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    while os.path.getsize(path) < size:
        conn.execute("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 200) "
                     "INSERT INTO t(v) SELECT hex(randomblob(150)) FROM c")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()


def fleet_for(work: str, mode: str):
    from tenantsync.catalogue import open_catalogue
    from tenantsync.config import Config
    from tenantsync.fleet import Fleet

    root = os.path.join(work, mode)
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    cfg = Config(replica=f"file://{root}/replica", globs=(f"{root}/data/*.db",),
                 catalogue=f"sqlite:///{root}/cat.db", host="bench", idle_after=timedelta(seconds=1),
                 encrypt=mode == "encrypted")
    return Fleet(cfg, open_catalogue(cfg)), root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=300)
    p.add_argument("--ships", type=int, default=3, help="first syncs of a fresh copy of the database per mode")
    p.add_argument("--restores", type=int, default=3)
    p.add_argument("--hydrations", type=int, default=50)
    p.add_argument("--json")
    a = p.parse_args()
    import installed  # bench/installed.py
    installed.compile_sources()  # tenantsync's bytecode, as pip would have left it
    os.environ["TENANTSYNC_KEYRING"] = json.dumps({"keys": {"bench": base64.b64encode(os.urandom(32)).decode()}})
    from tenantsync.ondemand import OnDemand
    from tenantsync.restore import restore

    work = tempfile.mkdtemp(prefix="tenantsync-sealed-")
    out: dict = {"size_mb": a.size_mb, "modes": {m: {} for m in MODES}}
    try:
        big = os.path.join(work, "big.db")
        core.Bench.build_big(big, a.size_mb)
        small = os.path.join(work, "small.db")
        build_small(small, 2**20)
        fleets, roots = {}, {}
        for mode in MODES:
            fleets[mode], roots[mode] = fleet_for(work, mode)
            shutil.copy(small, os.path.join(roots[mode], "data", "small.db"))
            fleets[mode].catalogue.discover("small.db", os.path.join(roots[mode], "data", "small.db"), "bench")
            fleets[mode].sync("small.db")
        # Each ship is the first sync of a fresh copy (a new tenant), the modes alternating.
        for i in range(a.ships):
            for mode in MODES if i % 2 == 0 else reversed(MODES):
                name = "big.db" if i == a.ships - 1 else f"big{i}.db"  # the last one is restored below
                path = os.path.join(roots[mode], "data", name)
                shutil.copy(big, path)
                fleets[mode].catalogue.discover(name, path, "bench")
                t = time.perf_counter()
                fleets[mode].sync(name)
                out["modes"][mode].setdefault("ship_s", []).append(time.perf_counter() - t)
                fleets[mode].release(name)
                if name != "big.db":
                    os.remove(path)
        size = os.path.getsize(big)
        for i in range(a.restores):
            for mode in MODES if i % 2 == 0 else reversed(MODES):
                target = os.path.join(work, f"restored-{mode}.db")
                t = time.perf_counter()
                restore(fleets[mode].replica("big.db"), target, force=True)
                out["modes"][mode].setdefault("restore_s", []).append(time.perf_counter() - t)
                os.remove(target)
        ondemand = {mode: OnDemand(fleets[mode]) for mode in MODES}
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        for i in range(a.hydrations):  # the modes alternating, as for restores
            for mode in MODES if i % 2 == 0 else reversed(MODES):
                ondemand[mode].archive("small.db")
                t = time.perf_counter()
                ondemand[mode].hydrate("small.db")
                times[mode].append(time.perf_counter() - t)
        for mode in MODES:
            out["modes"][mode]["hydrate_ms"] = {"p50": percentile(times[mode], 50) * 1000,
                                                "p99": percentile(times[mode], 99) * 1000, "n": a.hydrations}
        for mode in MODES:
            m = out["modes"][mode]
            m["restore_mbps"] = size / 1e6 / min(m["restore_s"])
            m["ship_best_s"] = min(m["ship_s"])
            fleets[mode].close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plain, sealed = out["modes"]["plain"], out["modes"]["encrypted"]
    rows = [(f"ship the database (first sync, full snapshot), best of {a.ships}", f"{plain['ship_best_s']:.2f} s",
             f"{sealed['ship_best_s']:.2f} s", sealed["ship_best_s"] / plain["ship_best_s"]),
            (f"restore {size / 1e6:,.0f} MB, best of {a.restores}", f"{plain['restore_mbps']:.0f} MB/s",
             f"{sealed['restore_mbps']:.0f} MB/s", sealed["restore_mbps"] / plain["restore_mbps"]),
            ("hydrate a 1 MB tenant: p50", f"{plain['hydrate_ms']['p50']:.1f} ms",
             f"{sealed['hydrate_ms']['p50']:.1f} ms", sealed["hydrate_ms"]["p50"] / plain["hydrate_ms"]["p50"]),
            (f"   p99 ({a.hydrations} each)", f"{plain['hydrate_ms']['p99']:.1f} ms",
             f"{sealed['hydrate_ms']['p99']:.1f} ms", sealed["hydrate_ms"]["p99"] / plain["hydrate_ms"]["p99"])]
    print("| measurement | plain | encrypted | encrypted / plain |\n|---|---|---|---|")
    for name, x, y, r in rows:
        print(f"| {name} | {x} | {y} | {r:.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
