#!/usr/bin/env python3
"""Where the single-database replicator spends its time under a write load (diagnostics for
docs/BENCHMARKS.md; tenantsync itself is not modified, only wrapped with timers).

    python bench/capture_profile.py [--seconds 10] [--sync NORMAL] [--bounded-read]

Creates a scratch database, runs ``tenantsync.replicate.run`` in this process with timers
around the pass, the checkpoint barrier (``Capture.checkpoint``: the application cannot
commit while it runs), the upload and the WAL scan, starts ``bench/core.py``'s
single-row INSERT writer for ``--seconds``, then prints the writer's result and the timers.

``--bounded-read`` swaps in a prototype of one fix: read the WAL in growing chunks and stop
at the first frame whose salts are not the current WAL header's (``wal.scan`` rejects that
frame and everything after it anyway), instead of reading and checksumming up to the end
of the file, which after a WAL restart still holds the previous generation's frames.
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

import numpy as np  # noqa: E402

from tenantsync import capture, replicate  # noqa: E402
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


def instrument(bounded: bool) -> None:
    orig_scan, orig_read, orig_header = walmod.scan, Capture._read_wal, Capture._wal_header

    def scan(data, header, start, checksum):
        result = orig_scan(data, header, start, checksum)
        BYTES["scanned"] += len(data)
        BYTES["committed"] += result.end_offset - start
        return result

    def wal_header(self):
        header, size = orig_header(self)
        self._bench_salts = (header.salt1, header.salt2, header.page_size) if header else None
        return header, size

    def read_wal(self, start, end):
        salts = getattr(self, "_bench_salts", None)
        fs = walmod.FRAME_HEADER_SIZE + salts[2] if salts else 0
        if not bounded or not salts or end - start < fs:
            data = orig_read(self, start, end)
            BYTES["read"] += len(data)
            return data
        out, pos, frames = [], start, 256
        with open(self.wal_path, "rb") as f:
            while pos < end:
                data = os.pread(f.fileno(), min(end - pos, frames * fs), pos)
                if not data:
                    break
                BYTES["read"] += len(data)
                whole = len(data) // fs
                hdrs = np.frombuffer(data, ">u4", whole * fs // 4).reshape(whole, fs // 4)
                bad = np.flatnonzero((hdrs[:, 2] != salts[0]) | (hdrs[:, 3] != salts[1]))
                if bad.size:
                    out.append(data[: int(bad[0]) * fs])
                    break
                out.append(data)
                pos += len(data)
                frames *= 2
        return b"".join(out)

    capture.walmod.scan = timed("wal.scan", scan)
    Capture._wal_header = wal_header
    Capture._read_wal = timed("Capture._read_wal", read_wal)
    Capture.sync_once = timed("Capture.sync_once (whole pass)", Capture.sync_once)
    Capture.checkpoint = timed("Capture.checkpoint (writers blocked)", Capture.checkpoint)
    Capture._passive_checkpoint = timed("  of which wal_checkpoint(PASSIVE)", Capture._passive_checkpoint)
    Capture._upload = timed("Capture._upload (LTX write + fsyncs)", Capture._upload)
    replicate.save_position = timed("save_position (state file)", replicate.save_position)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--sync", default="NORMAL")
    p.add_argument("--bounded-read", action="store_true")
    a = p.parse_args()
    instrument(a.bounded_read)
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
        print(f"WAL bytes read {BYTES['read'] / 1e6:.0f} MB, checksummed {BYTES['scanned'] / 1e6:.0f} MB, "
              f"committed frames found {BYTES['committed'] / 1e6:.0f} MB"
              + (" (bounded-read prototype)" if a.bounded_read else ""))
        print(f"{'timer':42} {'calls':>6} {'total s':>8} {'mean ms':>8} {'max ms':>7}")
        for name, v in TIMES.items():
            print(f"{name:42} {len(v):6d} {sum(v):8.2f} {1000 * sum(v) / len(v):8.1f} {1000 * max(v):7.1f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
