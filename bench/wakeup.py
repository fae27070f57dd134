#!/usr/bin/env python3
"""CPU of one idle tenant's wake-up, in process: a diagnostic, not a comparison.

At 10,000 tenants almost every write lands on a tenant that is not open (bench/fleet.py's
lag test writes each one every ~50 s; ``idle-after`` is 30 s), so the fleet's lag there is
set by how much CPU one wake-up costs under one process's GIL. Litestream has no
equivalent step (it keeps every database open), so nothing runs beside it.

    python bench/wakeup.py                      # 300 tenants, one cycle each
    python bench/wakeup.py --profile 40         # plus a cProfile, top 40 by cumulative time

One cycle per tenant: the application commits one row, then ``Fleet.sync`` and
``Fleet.release`` (an idle release that keeps the lease). With ``--app kept`` (default, as
bench/fleet.py's writer) the application keeps one connection per tenant open, so the
commit stays in the WAL and ships as a small L0; with ``--app per-write`` it opens and
closes a connection per commit, and SQLite's checkpoint on close moves the commit into the
main file before the sync, which then ships a full-page L0. The application's own writes
are timed separately and subtracted. ``--expire-leases`` lets every kept lease lapse before the cycle (each wake-up
then takes its lease again, as in the fleet benchmark where leases outlive ``idle-after``
by less than the time between two writes).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import sqlite3
import sys
import tempfile
import time

HERE = os.path.abspath(__file__)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from tenantsync import config as configmod  # noqa: E402
from tenantsync.catalogue import open_catalogue  # noqa: E402
from tenantsync.fleet import Fleet  # noqa: E402


class App:
    def __init__(self, kept: bool):
        self.kept = kept
        self.conns: dict[str, sqlite3.Connection] = {}

    def write(self, path: str) -> None:
        conn = self.conns.get(path) or sqlite3.connect(path, isolation_level=None)
        conn.execute("INSERT INTO t(v) VALUES ('x')")
        if self.kept:
            self.conns[path] = conn
        else:
            conn.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tenants", type=int, default=300)
    p.add_argument("--profile", type=int, metavar="N", help="print a cProfile (top N, cumulative)")
    p.add_argument("--expire-leases", action="store_true", help="each wake-up takes its lease again")
    p.add_argument("--app", choices=("kept", "per-write"), default="kept", help="application connections")
    a = p.parse_args()
    root = tempfile.mkdtemp(prefix="tenantsync-wakeup-")
    try:
        data = os.path.join(root, "data")
        os.makedirs(data)
        template = os.path.join(root, "template.db")
        conn = sqlite3.connect(template, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        conn.executemany("INSERT INTO t(v) VALUES (?)", [("row %d" % i,) for i in range(20)])
        conn.close()
        names = [f"t{i:05d}.db" for i in range(a.tenants)]
        for name in names:
            shutil.copyfile(template, os.path.join(data, name))
        raw = {"replica": f"file://{root}/replica", "globs": [f"{data}/*.db"],
               "catalogue": f"sqlite:///{root}/catalogue.db", "host": "bench",
               "lease-ttl": "2s" if a.expire_leases else "300s"}
        cfg_path = os.path.join(root, "tenantsync.yml")
        with open(cfg_path, "w") as f:
            json.dump(raw, f)
        catalogue = open_catalogue(configmod.load(cfg_path))
        fleet = Fleet(configmod.load(cfg_path), catalogue)
        catalogue.discover_many([(n, os.path.join(data, n)) for n in names], "bench")
        app = App(a.app == "kept")
        for n in names:
            app.write(os.path.join(data, n))
        for n in names:  # first sync (full upload) and release: every tenant is idle now
            fleet.sync(n)
            fleet.release(n, keep_lease=True)
        if a.expire_leases:
            time.sleep(2.5)

        def cycle() -> None:
            for n in names:
                app.write(os.path.join(data, n))
                fleet.sync(n)
                fleet.release(n, keep_lease=True)

        t0, w0 = time.process_time(), time.perf_counter()
        cycle()
        cpu, wall = time.process_time() - t0, time.perf_counter() - w0
        t0 = time.process_time()
        for n in names:
            app.write(os.path.join(data, n))
        own = time.process_time() - t0
        ms = 1000 / a.tenants
        print(f"{a.tenants} wake-ups (--app {a.app}{', leases expired' if a.expire_leases else ''}): "
              f"{(cpu - own) * ms:.2f} ms CPU each (the application's write, {own * ms:.2f} ms, subtracted); "
              f"{wall * ms:.2f} ms wall each with it")
        if a.profile:
            if a.expire_leases:
                time.sleep(2.5)
            prof = cProfile.Profile()
            prof.runcall(cycle)
            pstats.Stats(prof).sort_stats("cumulative").print_stats(a.profile)
        fleet.close()
        catalogue.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
