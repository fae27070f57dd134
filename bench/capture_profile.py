#!/usr/bin/env python3
"""Where the single-database replicator spends its time under a write load (diagnostics for
docs/BENCHMARKS.md; tenantsync itself is not modified, only wrapped with timers).

    python bench/capture_profile.py [--seconds 10] [--sync NORMAL]

Creates a scratch database, runs ``tenantsync.replicate.run`` in this process with timers
around the pass, the checkpoint (its barrier part: the application cannot commit while it
runs), the move of the read mark, the upload and the WAL scan, starts ``bench/core.py``'s
single-row INSERT writer for ``--seconds``, then prints the writer's result and the timers.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from tenantsync import replicate  # noqa: E402
from tenantsync import wal as walmod  # noqa: E402
from tenantsync.capture import Capture  # noqa: E402
from tenantsync.replica import Replica  # noqa: E402
from tenantsync.storage import open_storage  # noqa: E402

TIMES: dict = collections.defaultdict(list)
BYTES = collections.Counter()


def timed(name, fn):
    def wrap(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            TIMES[name].append(time.perf_counter() - t)
    return wrap


def instrument() -> None:
    orig_scan = walmod.scan

    def scan(data, header, start, checksum):
        result = orig_scan(data, header, start, checksum)
        BYTES["scanned"] += len(data)
        BYTES["committed"] += result.end_offset - start
        return result

    walmod.scan = timed("wal.scan", scan)
    walmod.read_range = timed("wal.read_range", walmod.read_range)
    Capture.sync_once = timed("Capture.sync_once (whole pass)", Capture.sync_once)
    Capture._rotate_mark = timed("Capture._rotate_mark", Capture._rotate_mark)
    Capture.checkpoint = timed("Capture.checkpoint (copy ahead, then barrier)", Capture.checkpoint)
    Capture._take_barrier = timed("  of which waiting for the barrier", Capture._take_barrier)
    Capture._passive_checkpoint = timed("  of which wal_checkpoint under it", Capture._passive_checkpoint)
    Capture._upload = timed("Capture._upload (LTX write + fsyncs)", Capture._upload)
    replicate.save_position = timed("save_position (state file)", replicate.save_position)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--sync", default="NORMAL")
    a = p.parse_args()
    instrument()
    root = tempfile.mkdtemp(prefix="tenantsync-capture-profile-")
    try:
        db = os.path.join(root, "app.db")
        sys.path.insert(0, HERE)
        import core

        core.new_db(db)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        t = threading.Thread(target=replicate.run, args=(db, Replica(open_storage("file://" + root + "/replica")), stop))
        t.start()
        time.sleep(1.5)
        cpu0 = time.process_time()
        w = subprocess.run([sys.executable, os.path.join(HERE, "core.py"), "_writer", "throughput", db,
                            "--sync", a.sync, "--seconds", str(a.seconds)], capture_output=True, text=True, check=True)
        cpu = time.process_time() - cpu0
        time.sleep(1.0)
        stop.set()
        t.join()
        writer = json.loads(w.stdout)
        print(f"writer: {writer['commits'] / writer['elapsed']:.0f} tx/s, time in commits > 5 ms "
              f"{writer['stall_time']:.2f} s of {writer['elapsed']:.1f} s (worst {writer['worst'] * 1000:.0f} ms); "
              f"replicator CPU {cpu:.2f} s; load {os.getloadavg()[0]:.2f}")
        print(f"WAL bytes checksummed {BYTES['scanned'] / 1e6:.0f} MB, "
              f"committed frames found {BYTES['committed'] / 1e6:.0f} MB")
        print(f"{'timer':42} {'calls':>6} {'total s':>8} {'mean ms':>8} {'max ms':>7}")
        for name, v in TIMES.items():
            print(f"{name:42} {len(v):6d} {sum(v):8.2f} {1000 * sum(v) / len(v):8.1f} {1000 * max(v):7.1f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
