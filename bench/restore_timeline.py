#!/usr/bin/env python3
"""Where one restore spends its time: timestamps around its steps, in-process.

    python bench/restore_timeline.py file:///path/to/replica [-o /dev/shm/out.db] [--runs 3]

Wraps ``restore.restore``'s steps (the worker start, the big file's header and index with
their checks, each range's decoding in a worker, ``quick_check``) and prints when each began
and ended, from the call of ``restore.restore``, after the imports (timed too). Put the output
on tmpfs to leave the disk out. The replica comes from ``bench/restore.py --keep`` or any
``tenantsync replicate``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import installed  # bench/installed.py

installed.compile_sources()  # tenantsync's bytecode, as pip would have left it, before its imports are timed
t_start = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tenantsync.restore as restore  # noqa: E402
import tenantsync.restore_pool as pool  # noqa: E402
from tenantsync.replica import Replica  # noqa: E402
from tenantsync.storage import open_storage  # noqa: E402

IMPORTS = time.perf_counter() - t_start


def timed(marks: list, label: str, fn):
    def wrapper(*args, **kwargs):
        began = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            marks.append((label, began, time.perf_counter()))
    return wrapper


def one(url: str, out: str) -> None:
    marks: list = []
    originals = (pool.warm_up, pool.read_layout, pool._Pool.run, restore._structure_check)
    pool.warm_up = timed(marks, "worker start", pool.warm_up)
    pool.read_layout = timed(marks, "header, index, checks", pool.read_layout)
    pool._Pool.run = timed(marks, "range", pool._Pool.run)
    restore._structure_check = timed(marks, "quick_check", restore._structure_check)
    try:
        if os.path.exists(out):
            os.remove(out)
        t0 = time.perf_counter()
        restore.restore(Replica(open_storage(url)), out, force=True)
        total = time.perf_counter() - t0
    finally:
        pool.warm_up, pool.read_layout, pool._Pool.run, restore._structure_check = originals
    print(f"imports {IMPORTS:.3f} s (first run only), restore {total:.3f} s")
    ranges = [(b - t0, e - t0) for label, b, e in marks if label == "range"]
    for label, b, e in marks:
        if label != "range":
            print(f"  {label:22s} {b - t0:6.3f} .. {e - t0:6.3f} s")
    if ranges:
        print(f"  {len(ranges)} ranges decoded  {min(b for b, _ in ranges):6.3f} .. {max(e for _, e in ranges):6.3f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("replica", help="replica URL (file:// or s3://)")
    p.add_argument("-o", "--output", default="/dev/shm/tenantsync-restore-timeline.db")
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()
    for _ in range(a.runs):
        one(a.replica, a.output)
    os.remove(a.output)


if __name__ == "__main__":
    main()
