#!/usr/bin/env python3
"""Core benchmarks: tenantsync and Litestream 0.5 side by side, same workloads, one run.

    python bench/core.py --quick          # smoke run, ~1.5 minutes
    python bench/core.py                  # full run, ~9-10 minutes
    python bench/core.py --only lag,restore --json out.json

Both replicators replicate to a ``file://`` replica on the same disk; the databases,
replicas and restore outputs live in a scratch directory (``--workdir``, default a new
directory under the system temp dir, removed at the end unless ``--keep``).

Workloads (each on a fresh database, replicator started and settled first):

1. throughput  -- one writer process, single-row INSERT transactions (~200-byte rows) for
   ``--seconds``, default autocheckpoint, ``synchronous=NORMAL`` and ``=FULL``; ``--rounds``
   rounds ordered baseline, tenantsync, litestream, baseline, litestream, tenantsync,
   baseline, ... and each tool run is divided by the mean of the baselines around it, so
   drifting machine load hits all of them alike. The max ``-wal`` size of these runs is the
   "single-row" WAL figure of workload 3. After each run the replica is restored with
   the tool that wrote it and its row count compared with the source database.
2. lag          -- the writer commits row ids 1..N at ``--rate`` tx/s and logs each commit's
   time. An inotify watch on ``REPLICA/ltx/0`` records when each L0 file appears (both
   tools publish L0 files atomically there, one per sync pass). Afterwards the L0 files are
   applied in TXID order to a scratch image with tenantsync's LTX decoder and
   ``max(id)`` is read after each, so every row's visibility time is the arrival time of
   the first L0 file that contains it. Same monitor, same decoder, for both tools.
3. burst        -- ``--burst-rows`` rows in 1000-row transactions as fast as possible; max
   ``-wal`` size (polled every 5 ms) and burst duration with/without each replicator.
4. CPU / RSS    -- replicator user+sys CPU from ``/proc/PID/stat`` over each workload's
   window, and peak RSS (VmHWM; confirmed by wait4's ru_maxrss at exit).
5. restore      -- a ``--size-mb`` database of random-ish compressible rows, replicated once
   by each tool (wait for its snapshot, stop it), then restored by both tools from both
   replicas; wall time of the ``restore`` command, MB/s of database restored, and a
   byte comparison of the outputs with the source.
"""

from __future__ import annotations

import argparse
import ctypes
import filecmp
import json
import os
import re
import select
import shutil
import signal
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(HERE))
BIN = os.path.dirname(sys.executable)


def tenantsync_cmd() -> list[str]:
    """The venv's console script if installed, else ``python -m tenantsync`` from this repo
    (the same single Python process either way)."""
    script = os.path.join(BIN, "tenantsync")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-m", "tenantsync"]
L0_NAME = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{16}\.ltx$")
CLK_TCK = os.sysconf("SC_CLK_TCK")
TOOLS = ("tenantsync", "litestream")
SCHEMA = "CREATE TABLE t(id INTEGER PRIMARY KEY, ts REAL, v TEXT)"
LOREM = (
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud "
    "exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat. Duis aute irure "
    "dolor in reprehenderit in voluptate velit esse cillum dolore eu fugiat nulla pariatur. "
    "Excepteur sint occaecat cupidatat non proident, sunt in culpa qui officia deserunt "
    "mollit anim id est laborum. Sed ut perspiciatis unde omnis iste natus error sit "
    "voluptatem accusantium doloremque laudantium, totam rem aperiam, eaque ipsa quae ab "
    "illo inventore veritatis et quasi architecto beatae vitae dicta sunt explicabo."
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> float:
    return os.getloadavg()[0]


def cpu_pressure() -> float | None:
    """PSI: share of the last 10 s in which some runnable task waited for a CPU (%)."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None


# ---------------------------------------------------------------------------------------
# Writer processes (``python bench/core.py _writer MODE ...``): the application.
# ---------------------------------------------------------------------------------------

def writer_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="core.py _writer")
    p.add_argument("mode", choices=["throughput", "paced", "burst"])
    p.add_argument("db")
    p.add_argument("--sync", default="NORMAL")
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--rate", type=float, default=200)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--log")
    p.add_argument("--autocheckpoint", type=int, default=None, help="diagnostics only; default: SQLite's")
    a = p.parse_args(argv)
    conn = sqlite3.connect(a.db, isolation_level=None, timeout=60)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={a.sync}")  # default wal_autocheckpoint (1000 pages)
    if a.autocheckpoint is not None:
        conn.execute(f"PRAGMA wal_autocheckpoint={a.autocheckpoint}")
    urandom = os.urandom
    out: dict = {"mode": a.mode, "sync": a.sync}
    if a.mode == "throughput":
        sql = "INSERT INTO t(ts, v) VALUES (?, ?)"
        now = time.monotonic
        n = stalls = 0
        stall_time = worst = 0.0
        t0 = prev = now()
        deadline = t0 + a.seconds
        while True:
            conn.execute(sql, (time.time(), urandom(100).hex()))
            n += 1
            t = now()
            dt = t - prev
            prev = t
            if dt > 0.005:  # a commit that waited: lock held by someone else, fsync, checkpoint
                stalls += 1
                stall_time += dt
                worst = max(worst, dt)
            if t >= deadline:
                break
        out.update(commits=n, elapsed=now() - t0, stalls=stalls, stall_time=stall_time, worst=worst)
    elif a.mode == "paced":
        sql = "INSERT INTO t(id, ts, v) VALUES (?, ?, ?)"
        n = int(a.seconds * a.rate)
        commits = [0.0] * (n + 1)
        late = 0
        t0 = time.time() + 0.05
        for i in range(1, n + 1):
            target = t0 + i / a.rate
            delay = target - time.time()
            if delay > 0:
                time.sleep(delay)
            elif delay < -0.01:
                late += 1
            conn.execute(sql, (i, time.time(), urandom(100).hex()))
            commits[i] = time.time()
        with open(a.log, "w") as f:
            json.dump(commits, f)
        out.update(commits=n, elapsed=commits[n] - t0, late=late)
    else:
        sql = "INSERT INTO t(ts, v) VALUES (?, ?)"
        t0 = time.monotonic()
        done = 0
        while done < a.rows:
            k = min(a.batch, a.rows - done)
            ts = time.time()
            rows = [(ts, urandom(100).hex()) for _ in range(k)]
            conn.execute("BEGIN")
            conn.executemany(sql, rows)
            conn.execute("COMMIT")
            done += k
        out.update(rows=done, elapsed=time.monotonic() - t0)
    conn.close()
    print(json.dumps(out), flush=True)


def run_writer(mode: str, db: str, **kw) -> dict:
    cmd = [sys.executable, HERE, "_writer", mode, db]
    for k, v in kw.items():
        cmd += [f"--{k}", str(v)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"writer failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def new_db(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(SCHEMA)
    conn.close()


def count_rows(path: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT count(*) FROM t").fetchone()[0]
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------
# Processes, /proc accounting, pollers
# ---------------------------------------------------------------------------------------

def tool_env() -> dict:
    env = dict(os.environ)
    env.pop("AWS_CA_BUNDLE", None)  # Litestream refuses to start with it set
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def proc_cpu(pid: int) -> float:
    """user+sys seconds of a live process (fields 14, 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status(pid: int, key: str) -> int:
    """A kB field of /proc/PID/status, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def wait_rusage(p: subprocess.Popen, timeout: float) -> dict:
    """Reap a child with wait4 to get its own CPU and max RSS."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            return {"rc": p.returncode, "cpu": ru.ru_utime + ru.ru_stime, "maxrss": ru.ru_maxrss * 1024}
        if time.monotonic() > deadline:
            p.kill()
            pid, status, ru = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
            return {"rc": p.returncode, "cpu": ru.ru_utime + ru.ru_stime, "maxrss": ru.ru_maxrss * 1024,
                    "killed": True}
        time.sleep(0.02)


def ltx_files(replica_dir: str) -> dict[str, int]:
    out = {}
    for root, _dirs, files in os.walk(os.path.join(replica_dir, "ltx")):
        for name in files:
            if L0_NAME.match(name):
                path = os.path.join(root, name)
                try:
                    out[os.path.relpath(path, replica_dir)] = os.stat(path).st_size
                except FileNotFoundError:
                    pass
    return out


class Replicator:
    """One replicator process on one database, replicating to ``file://replica_dir``."""

    def __init__(self, tool: str, db: str, replica_dir: str, logdir: str):
        self.tool, self.db, self.replica_dir = tool, db, replica_dir
        self.log_path = os.path.join(logdir, f"{tool}-{os.path.basename(os.path.dirname(db))}.log")
        self.p: subprocess.Popen | None = None
        self.started = 0.0

    def start(self) -> None:
        url = "file://" + self.replica_dir
        if self.tool == "tenantsync":
            cmd = tenantsync_cmd() + ["replicate", self.db, "--replica", url]
        else:
            cmd = [os.path.join(BIN, "litestream"), "replicate", self.db, url]
        self._log = open(self.log_path, "ab")
        self.started = time.monotonic()
        self.p = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=tool_env())

    def wait_first_l0(self, timeout: float = 600) -> float:
        """Seconds from start until the first L0 file is in the replica."""
        l0 = os.path.join(self.replica_dir, "ltx", "0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"{self.tool} exited with {self.p.returncode}; see {self.log_path}")
            try:
                if any(L0_NAME.match(n) for n in os.listdir(l0)):
                    return time.monotonic() - self.started
            except FileNotFoundError:
                pass
            time.sleep(0.01)
        raise RuntimeError(f"{self.tool}: no L0 file after {timeout}s; see {self.log_path}")

    def wait_quiet(self, quiet: float, timeout: float = 300) -> float:
        """Wait until the replica's file set has not changed for ``quiet`` seconds."""
        last, since = None, time.monotonic()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            cur = ltx_files(self.replica_dir)
            if cur != last:
                last, since = cur, time.monotonic()
            elif cur and time.monotonic() - since >= quiet:
                return since - self.started
            time.sleep(0.25)
        return time.monotonic() - self.started

    def cpu(self) -> float:
        return proc_cpu(self.p.pid)

    def hwm(self) -> int:
        return proc_status(self.p.pid, "VmHWM")

    def stop(self, timeout: float = 120) -> dict:
        hwm = self.hwm()
        t = time.monotonic()
        self.p.send_signal(signal.SIGTERM)
        ru = wait_rusage(self.p, timeout)
        ru["stop_seconds"] = time.monotonic() - t
        ru["hwm"] = hwm
        self._log.close()
        if ru["rc"] not in (0, -signal.SIGTERM) or ru.get("killed"):
            log(f"warning: {self.tool} exited rc={ru['rc']} killed={ru.get('killed', False)}; see {self.log_path}")
        return ru


class WalPoller(threading.Thread):
    """Max size of DB-wal, polled every 5 ms (the WAL only shrinks on TRUNCATE)."""

    def __init__(self, db: str, interval: float = 0.005):
        super().__init__(daemon=True)
        self.path, self.interval = db + "-wal", interval
        self.max = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.max = max(self.max, os.stat(self.path).st_size)
            except FileNotFoundError:
                pass
            self._halt.wait(self.interval)

    def finish(self) -> int:
        self._halt.set()
        self.join()
        return self.max


class L0Watch(threading.Thread):
    """Arrival time (time.time()) of each LTX file published in a directory, via inotify."""

    IN_CREATE, IN_MOVED_TO = 0x100, 0x80

    def __init__(self, directory: str):
        super().__init__(daemon=True)
        self.libc = ctypes.CDLL("libc.so.6", use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        wd = self.libc.inotify_add_watch(self.fd, directory.encode(), self.IN_CREATE | self.IN_MOVED_TO)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory}")
        self.arrivals: dict[str, float] = {}
        self.masks: dict[str, int] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            r, _, _ = select.select([self.fd], [], [], 0.1)
            if not r:
                continue
            now = time.time()
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                continue
            off = 0
            while off < len(buf):
                _wd, mask, _cookie, n = struct.unpack_from("iIII", buf, off)
                name = buf[off + 16: off + 16 + n].rstrip(b"\0").decode()
                off += 16 + n
                if L0_NAME.match(name) and name not in self.arrivals:
                    self.arrivals[name] = now
                    self.masks[name] = mask

    def finish(self) -> dict[str, float]:
        self._halt.set()
        self.join()
        os.close(self.fd)
        return self.arrivals


# ---------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.a = args
        self.root = args.workdir or tempfile.mkdtemp(prefix="tenantsync-bench-")
        os.makedirs(self.root, exist_ok=True)
        self.logdir = os.path.join(self.root, "logs")
        os.makedirs(self.logdir, exist_ok=True)
        self.results: dict = {"args": vars(args), "loadavg": {}}
        self.n = 0

    def fresh(self, label: str) -> tuple[str, str]:
        self.n += 1
        d = os.path.join(self.root, f"{self.n:02d}-{label}")
        os.makedirs(d)
        db = os.path.join(d, "app.db")
        new_db(db)
        return db, os.path.join(d, "replica")

    def restore(self, tool: str, replica_dir: str, out: str, txid: str | None = None,
                checkout: str | None = None) -> dict:
        """One restore by ``tool``'s CLI; with ``checkout``, tenantsync's code from that
        directory (an earlier commit) instead of this one."""
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(out + suffix):
                os.remove(out + suffix)
        url = "file://" + replica_dir
        env = tool_env()
        if tool == "tenantsync":
            cmd = ([sys.executable, "-m", "tenantsync"] if checkout else tenantsync_cmd()) + ["restore", "--replica", url, "-o", out]
            if checkout:
                env["PYTHONPATH"] = checkout
        else:
            cmd = [os.path.join(BIN, "litestream"), "restore", "-o", out, url]
        t = time.monotonic()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        ru = wait_rusage(p, 900)
        ru["seconds"] = time.monotonic() - t
        ru["stderr"] = p.stderr.read().decode(errors="replace")[-1000:]
        p.stdout.close()
        p.stderr.close()
        if ru["rc"] != 0:
            raise RuntimeError(f"{tool} restore of {replica_dir} failed: {ru['stderr']}")
        ru["size"] = os.path.getsize(out)
        return ru

    # -- 1 + 3 (single-row) -------------------------------------------------------------

    def one_run(self, tool: str | None, label: str, writer_mode: str, **wkw) -> dict:
        """Fresh DB; optional replicator; writer; replicator stats; verification."""
        db, replica = self.fresh(label)
        rep = None
        res: dict = {"tool": tool or "baseline", "load_start": loadavg(), "psi_start": cpu_pressure()}
        if tool:
            rep = Replicator(tool, db, replica, self.logdir)
            rep.start()
            res["first_l0"] = rep.wait_first_l0(60)
            time.sleep(1.0)  # let startup work (Litestream's several initial writes) settle
            cpu0 = rep.cpu()
        poller = WalPoller(db)
        poller.start()
        t0 = time.monotonic()
        res["writer"] = run_writer(writer_mode, db, **wkw)
        res["window"] = time.monotonic() - t0
        res["wal_max"] = poller.finish()
        if rep:
            res["cpu"] = rep.cpu() - cpu0
            time.sleep(self.a.drain)  # both tools ship within this (Litestream: 1 s interval)
            res["stop"] = rep.stop()
            res["rss_peak"] = res["stop"]["hwm"]
            if self.a.verify:
                out = os.path.join(os.path.dirname(db), "restored.db")
                r = self.restore(tool, replica, out)
                res["verify"] = {"source_rows": count_rows(db), "replica_rows": count_rows(out),
                                 "restore_seconds": r["seconds"]}
                os.remove(out)
        res["load_end"] = loadavg()
        self.cleanup(os.path.dirname(db))
        return res

    def cleanup(self, d: str) -> None:
        if not self.a.keep:
            shutil.rmtree(d, ignore_errors=True)

    def throughput(self) -> None:
        """Rounds of baseline, A, B, baseline (A/B alternate per round); each tool run is
        compared with the mean of the baselines right before and after it."""
        out = {}
        order: list = [None]
        for i in range(self.a.rounds):
            order += (["tenantsync", "litestream"] if i % 2 == 0 else ["litestream", "tenantsync"]) + [None]
        for sync in ("NORMAL", "FULL"):
            runs = []
            for tool in order:
                name = tool or "baseline"
                log(f"throughput sync={sync} {name}: {self.a.seconds:.0f} s of single-row INSERTs")
                r = self.one_run(tool, f"tp-{sync.lower()}-{name}", "throughput", sync=sync, seconds=self.a.seconds)
                w = r["writer"]
                r["tps"] = w["commits"] / w["elapsed"]
                log(f"  {r['tps']:.0f} tx/s, wal max {r['wal_max'] / 1e6:.1f} MB, "
                    f"writer stalls >5 ms: {w['stalls']} ({w['stall_time']:.2f} s, worst {w['worst'] * 1000:.0f} ms)"
                    + (f", cpu {r['cpu']:.1f} s, rss {r['rss_peak'] / 2**20:.0f} MiB, verify {r.get('verify')}"
                       if tool else ""))
                runs.append(r)
            for i, r in enumerate(runs):
                if r["tool"] != "baseline":
                    before = next(x for x in reversed(runs[:i]) if x["tool"] == "baseline")
                    after = next(x for x in runs[i + 1:] if x["tool"] == "baseline")
                    r["ratio"] = r["tps"] / statistics.fmean([before["tps"], after["tps"]])
            out[sync] = runs
        self.results["throughput"] = out

    # -- 2 -----------------------------------------------------------------------------

    def lag(self) -> None:
        out = {}
        for tool in TOOLS:
            log(f"lag {tool}: {self.a.rate:.0f} tx/s for {self.a.lag_seconds:.0f} s")
            db, replica = self.fresh(f"lag-{tool}")
            res: dict = {"load_start": loadavg(), "psi_start": cpu_pressure()}
            rep = Replicator(tool, db, replica, self.logdir)
            rep.start()
            rep.wait_first_l0(60)
            time.sleep(1.0)
            watch = L0Watch(os.path.join(replica, "ltx", "0"))
            watch.start()
            pre = set(os.listdir(os.path.join(replica, "ltx", "0")))
            cpu0 = rep.cpu()
            poller = WalPoller(db)
            poller.start()
            commit_log = os.path.join(os.path.dirname(db), "commits.json")
            t0 = time.monotonic()
            res["writer"] = run_writer("paced", db, sync=self.a.lag_sync, rate=self.a.rate,
                                       seconds=self.a.lag_seconds, log=commit_log)
            window = time.monotonic() - t0
            time.sleep(self.a.drain + 1.0)
            res["cpu"] = rep.cpu() - cpu0
            res["cpu_pct"] = 100 * res["cpu"] / (window + self.a.drain + 1.0)
            res["wal_max"] = poller.finish()
            res["stop"] = rep.stop()
            res["rss_peak"] = res["stop"]["hwm"]
            arrivals = watch.finish()
            with open(commit_log) as f:
                commits = json.load(f)
            res.update(self.visibility(replica, arrivals, pre, commits))
            masks: dict = {}
            for m in watch.masks.values():
                key = {0x100: "IN_CREATE", 0x80: "IN_MOVED_TO"}.get(m, hex(m))
                masks[key] = masks.get(key, 0) + 1
            res["inotify_events"] = masks
            res["load_end"] = loadavg()
            log(f"  p50 {res['p50']:.3f} s, p99 {res['p99']:.3f} s, max {res['max']:.3f} s, "
                f"{res['files']} L0 files, invisible {res['invisible']}, cpu {res['cpu_pct']:.1f} %")
            out[tool] = res
            self.cleanup(os.path.dirname(db))
        self.results["lag"] = out

    @staticmethod
    def visibility(replica: str, arrivals: dict, pre: set, commits: list) -> dict:
        """Apply L0 files in TXID order to a scratch image; max(id) after each one.
        (Static: bench/remote.py applies the L0 files it fetched from S3 the same way.)"""
        if REPO not in sys.path:
            sys.path.insert(0, REPO)
        from tenantsync.ltx import Decoder

        l0 = os.path.join(replica, "ltx", "0")
        names = sorted(n for n in os.listdir(l0) if L0_NAME.match(n))
        image = os.path.join(os.path.dirname(replica), "image.db")
        fd = os.open(image, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        steps = []  # (arrival, max_id)
        missing_arrival = 0
        try:
            for name in names:
                with open(os.path.join(l0, name), "rb") as f:
                    dec = Decoder(f.read(), name=name)
                ps = dec.header.page_size
                for pgno, page in dec.pages():
                    os.pwrite(fd, page, (pgno - 1) * ps)
                dec.close()
                os.ftruncate(fd, dec.header.commit * ps)
                if name in pre:
                    continue
                conn = sqlite3.connect(f"file:{image}?immutable=1", uri=True)
                try:
                    max_id = conn.execute("SELECT max(id) FROM t").fetchone()[0] or 0
                finally:
                    conn.close()
                t = arrivals.get(name)
                if t is None:
                    missing_arrival += 1
                    continue
                steps.append((t, max_id))
        finally:
            os.close(fd)
            os.remove(image)
        lags = []
        j = 0
        n = len(commits) - 1
        for i in range(1, n + 1):
            while j < len(steps) and steps[j][1] < i:
                j += 1
            if j == len(steps):
                break
            lags.append(steps[j][0] - commits[i])
        lags.sort()
        q = (lambda p: lags[min(len(lags) - 1, int(p * len(lags)))]) if lags else (lambda p: float("nan"))
        return {
            "files": len(steps), "missing_arrival": missing_arrival, "rows": n,
            "invisible": n - len(lags), "p50": q(0.50), "p90": q(0.90), "p99": q(0.99),
            "max": lags[-1] if lags else float("nan"), "mean": statistics.fmean(lags) if lags else float("nan"),
            "min": lags[0] if lags else float("nan"),
            # per L0 file: seconds since the first commit, rows visible after it
            "steps": [(round(t - commits[1], 4), m) for t, m in steps],
        }

    # -- 3 -----------------------------------------------------------------------------

    def burst(self) -> None:
        out = {}
        for tool in (None, "tenantsync", "litestream"):
            name = tool or "baseline"
            log(f"burst {name}: {self.a.burst_rows} rows in 1000-row transactions")
            r = self.one_run(tool, f"burst-{name}", "burst", sync=self.a.lag_sync, rows=self.a.burst_rows, batch=1000)
            log(f"  {r['writer']['elapsed']:.2f} s, wal max {r['wal_max'] / 1e6:.1f} MB"
                + (f", cpu {r['cpu']:.1f} s, verify {r.get('verify')}" if tool else ""))
            out[name] = r
        self.results["burst"] = out

    # -- 5 -----------------------------------------------------------------------------

    @staticmethod
    def build_big(path: str, size_mb: int) -> None:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, ts REAL, v TEXT)")
        text = LOREM * 2
        chunk = 100_000
        while os.path.getsize(path) < size_mb * 2**20:
            conn.execute("BEGIN")
            conn.execute(
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?) "
                "INSERT INTO t(ts, v) SELECT julianday('now'), "
                "printf('%s|%s', hex(randomblob(16)), substr(?, 1 + abs(random()) % 400, 300)) FROM c",
                (chunk, text),
            )
            conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.close()

    def restore_bench(self) -> None:
        a = self.a
        d = os.path.join(self.root, "restore")
        os.makedirs(d, exist_ok=True)
        src = os.path.join(d, "source.db")
        log(f"restore: building a {a.size_mb} MB database")
        t = time.monotonic()
        self.build_big(src, a.size_mb)
        res: dict = {"build_seconds": time.monotonic() - t, "db_bytes": os.path.getsize(src)}
        log(f"  built {res['db_bytes'] / 1e6:.0f} MB in {res['build_seconds']:.1f} s")
        replicas = {}
        res["replicate"] = {}
        for tool in TOOLS:
            replicas[tool], res["replicate"][tool] = self.replicate_once(tool, src, os.path.join(d, tool))
        out_dir = a.restore_out or d
        os.makedirs(out_dir, exist_ok=True)
        res["out_dir"] = out_dir
        res["write_floor_seconds"] = write_floor(res["db_bytes"], out_dir)
        log(f"  plain write+fsync of {res['db_bytes'] / 1e6:.0f} MB: {res['write_floor_seconds']:.2f} s")
        runs: dict = {}
        combos = [("tenantsync", "tenantsync"), ("litestream", "litestream"),
                  ("tenantsync", "litestream"), ("litestream", "tenantsync")]
        for rep_i in range(a.restore_reps):
            for restorer, written in combos:
                out = os.path.join(out_dir, f"out-{restorer}-from-{written}.db")
                load, psi = loadavg(), cpu_pressure()
                r = self.restore(restorer, replicas[written], out)
                r["load"], r["psi"] = load, psi
                r["mbps"] = res["db_bytes"] / 2**20 / r["seconds"]
                log(f"  {restorer} restore of {written}'s replica: {r['seconds']:.2f} s "
                    f"({r['mbps']:.0f} MiB/s), cpu {r['cpu']:.1f} s, rss {r['maxrss'] / 2**20:.0f} MiB, load {load:.2f}")
                runs.setdefault(f"{restorer}<-{written}", []).append(r)
                if rep_i == a.restore_reps - 1:
                    r["same_as_source"] = self.same_content(src, out, written)
                    os.remove(out)
        res["runs"] = runs
        self.results["restore"] = res
        self.cleanup(d)

    def replicate_once(self, tool: str, src: str, sub: str) -> tuple[str, dict]:
        """A copy of ``src`` replicated by ``tool`` until its replica is complete, then the
        replicator stopped; returns the replica directory and what it cost."""
        os.makedirs(sub)
        db = os.path.join(sub, "app.db")
        shutil.copyfile(src, db)
        replica = os.path.join(sub, "replica")
        rep = Replicator(tool, db, replica, self.logdir)
        log(f"restore: initial replication by {tool}")
        load = loadavg()
        rep.start()
        first = rep.wait_first_l0(900)
        # tenantsync's first L0 is the complete database; Litestream keeps writing
        # (L0, compactions, snapshot) for a while: wait until its replica is quiet.
        quiet = rep.wait_quiet(self.a.quiet) if tool == "litestream" else first
        st = rep.stop()
        size = sum(ltx_files(replica).values())
        log(f"  first L0 after {first:.1f} s, quiet after {quiet:.1f} s, cpu {st['cpu']:.1f} s, "
            f"rss {st['maxrss'] / 2**20:.0f} MiB, replica {size / 1e6:.0f} MB in {len(ltx_files(replica))} files")
        return replica, {"first_l0": first, "quiet": quiet, "cpu": st["cpu"], "rss_peak": st["maxrss"],
                         "replica_bytes": size, "files": len(ltx_files(replica)), "load": load}

    @staticmethod
    def same_content(src: str, out: str, written: str) -> str:
        if filecmp.cmp(src, out, shallow=False):
            return "identical bytes"
        # Litestream adds its own tables to the database it replicates; compare rows.
        a, b = sqlite3.connect(src), sqlite3.connect(f"file:{out}?immutable=1", uri=True)
        try:
            q = "SELECT count(*), sum(id), total(length(v)) FROM t"
            same = a.execute(q).fetchone() == b.execute(q).fetchone()
        finally:
            a.close()
            b.close()
        return "same rows" if same else "DIFFERENT"


def write_floor(nbytes: int, out_dir: str) -> float:
    """What the machine allows right now: seconds to write ``nbytes`` with 8 MiB pwrites
    into a new file in ``out_dir``, then fsync (every restore does at least this)."""
    buf = memoryview(os.urandom(8 << 20))
    floor = os.path.join(out_dir, "floor.bin")
    fd = os.open(floor, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        t = time.monotonic()
        for off in range(0, nbytes, len(buf)):
            os.pwrite(fd, buf[:nbytes - off], off)
        os.fsync(fd)
        return time.monotonic() - t
    finally:
        os.close(fd)
        os.remove(floor)


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------

def fmt_ratio(x, y) -> str:
    try:
        return f"{x / y:.2f}"
    except (TypeError, ZeroDivisionError):
        return "–"


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def report(res: dict) -> str:
    rows = []  # (measurement, target, litestream, tenantsync, ratio ts/ls)

    def add(name, target, ls, ts, ratio):
        rows.append((name, target, ls, ts, ratio))

    tp = res.get("throughput")
    if tp:
        def of(runs, tool):
            return [r for r in runs if r["tool"] == tool]

        def mean(xs):
            return statistics.fmean(xs) if xs else float("nan")

        for sync in ("NORMAL", "FULL"):
            runs = tp[sync]
            base = of(runs, "baseline")
            ts, ls = of(runs, "tenantsync"), of(runs, "litestream")
            rts, rls = mean([r["ratio"] for r in ts]), mean([r["ratio"] for r in ls])

            def cell(rs, ratio):
                each = ", ".join(f"{r['ratio']:.2f}" for r in rs)
                return f"{ratio:.2f} ({each}; {mean([r['tps'] for r in rs]):.0f} tx/s)"
            bases = ", ".join(f"{r['tps']:.0f}" for r in base)
            add(f"write throughput with/without replicator, synchronous={sync} (baselines {bases} tx/s)",
                "≥ 0.97", cell(ls, rls), cell(ts, rts), fmt_ratio(rts, rls))
        for sync in ("NORMAL", "FULL"):
            runs = tp[sync]
            base = of(runs, "baseline")
            ts, ls = of(runs, "tenantsync"), of(runs, "litestream")
            wts, wls = max(r["wal_max"] for r in ts), max(r["wal_max"] for r in ls)
            add(f"max WAL, single-row txs for {res['args']['seconds']:.0f} s, {sync} "
                f"(baseline {mib(max(r['wal_max'] for r in base))})", "", mib(wls), mib(wts), fmt_ratio(wts, wls))
        for sync in ("NORMAL", "FULL"):
            runs = tp[sync]
            base = of(runs, "baseline")
            ts, ls = of(runs, "tenantsync"), of(runs, "litestream")

            def stalls(rs):
                return (f"{mean([r['writer']['stall_time'] for r in rs]):.2f} s, worst "
                        f"{max(r['writer']['worst'] for r in rs) * 1000:.0f} ms")
            add(f"writer time in commits > 5 ms per run, {sync} (baseline {stalls(base)})", "",
                stalls(ls), stalls(ts), "")
        for sync in ("NORMAL", "FULL"):
            ts, ls = of(tp[sync], "tenantsync"), of(tp[sync], "litestream")
            cts = mean([r["cpu"] / r["window"] for r in ts])
            cls = mean([r["cpu"] / r["window"] for r in ls])
            add(f"replicator CPU during throughput run, {sync} (% of a core)", "",
                f"{100 * cls:.0f} %", f"{100 * cts:.0f} %", fmt_ratio(cts, cls))
            hts, hls = max(r["rss_peak"] for r in ts), max(r["rss_peak"] for r in ls)
            add(f"replicator peak RSS, throughput run, {sync}", "", mib(hls), mib(hts), fmt_ratio(hts, hls))
        for sync in ("NORMAL", "FULL"):
            ts, ls = of(tp[sync], "tenantsync"), of(tp[sync], "litestream")
            if all("verify" in r for r in ts + ls):
                def v(rs):
                    bad = [r for r in rs if r["verify"]["source_rows"] != r["verify"]["replica_rows"]]
                    rows = sum(r["verify"]["source_rows"] for r in rs)
                    return f"{'ok' if not bad else 'MISSING ROWS'} ({rows} rows in {len(rs)} runs)"
                add(f"replica complete after throughput runs, {sync} (restored by its own tool)", "all rows",
                    v(ls), v(ts), "")
    lag = res.get("lag")
    if lag:
        ls, ts = lag["litestream"], lag["tenantsync"]
        rate = res["args"]["rate"]
        add(f"lag commit→replica p50 at {rate:.0f} tx/s", "", f"{ls['p50']:.3f} s", f"{ts['p50']:.3f} s",
            fmt_ratio(ts["p50"], ls["p50"]))
        add(f"lag commit→replica p99 at {rate:.0f} tx/s", "≤ 0.25 s", f"{ls['p99']:.3f} s", f"{ts['p99']:.3f} s",
            fmt_ratio(ts["p99"], ls["p99"]))
        add("lag max", "", f"{ls['max']:.3f} s", f"{ts['max']:.3f} s", fmt_ratio(ts["max"], ls["max"]))
        add("L0 files during lag run / rows never visible", "",
            f"{ls['files']} / {ls['invisible']}", f"{ts['files']} / {ts['invisible']}", "")
        add(f"replicator CPU at {rate:.0f} tx/s (% of a core)", "", f"{ls['cpu_pct']:.1f} %", f"{ts['cpu_pct']:.1f} %",
            fmt_ratio(ts["cpu_pct"], ls["cpu_pct"]))
        add(f"replicator peak RSS at {rate:.0f} tx/s", "", mib(ls["rss_peak"]), mib(ts["rss_peak"]),
            fmt_ratio(ts["rss_peak"], ls["rss_peak"]))
    b = res.get("burst")
    if b:
        base, ts, ls = b["baseline"], b["tenantsync"], b["litestream"]
        rows_n = res["args"]["burst_rows"]
        add(f"max WAL, {rows_n // 1000}k-row burst in 1000-row txs (baseline {mib(base['wal_max'])})", "",
            mib(ls["wal_max"]), mib(ts["wal_max"]), fmt_ratio(ts["wal_max"], ls["wal_max"]))
        add(f"burst duration (baseline {base['writer']['elapsed']:.2f} s)", "",
            f"{ls['writer']['elapsed']:.2f} s", f"{ts['writer']['elapsed']:.2f} s",
            fmt_ratio(ts["writer"]["elapsed"], ls["writer"]["elapsed"]))
        add("replicator CPU during burst / peak RSS", "", f"{ls['cpu']:.1f} s / {mib(ls['rss_peak'])}",
            f"{ts['cpu']:.1f} s / {mib(ts['rss_peak'])}", fmt_ratio(ts["cpu"], ls["cpu"]))
    r = res.get("restore")
    if r:
        size = r["db_bytes"]
        rp = r["replicate"]
        add(f"initial replication of the {size / 1e6:.0f} MB database: first L0 / replica quiet", "",
            f"{rp['litestream']['first_l0']:.1f} s / {rp['litestream']['quiet']:.1f} s",
            f"{rp['tenantsync']['first_l0']:.1f} s", fmt_ratio(rp["tenantsync"]["first_l0"], rp["litestream"]["first_l0"]))
        add("  replicator CPU / peak RSS for it", "",
            f"{rp['litestream']['cpu']:.1f} s / {mib(rp['litestream']['rss_peak'])}",
            f"{rp['tenantsync']['cpu']:.1f} s / {mib(rp['tenantsync']['rss_peak'])}",
            fmt_ratio(rp["tenantsync"]["cpu"], rp["litestream"]["cpu"]))
        add("  replica size (files)", "", f"{rp['litestream']['replica_bytes'] / 1e6:.0f} MB ({rp['litestream']['files']})",
            f"{rp['tenantsync']['replica_bytes'] / 1e6:.0f} MB ({rp['tenantsync']['files']})",
            fmt_ratio(rp["tenantsync"]["replica_bytes"], rp["litestream"]["replica_bytes"]))

        fl = r.get("write_floor_seconds")
        if fl:
            add(f"machine floor: plain 8 MiB pwrites + fsync of the same size into {r.get('out_dir', '?')}, no tool", "",
                f"{fl:.2f} s = {size / 2**20 / fl:.0f} MiB/s", "", "")

        def best(key):
            runs = r["runs"][key]
            t = min(x["seconds"] for x in runs)
            return t, size / 2**20 / t, runs

        for written in ("litestream", "tenantsync"):
            tts, mts, rts = best(f"tenantsync<-{written}")
            tls, mls, rls = best(f"litestream<-{written}")
            target = "≥ 500 MB/s" if written == "tenantsync" else "≥ 500 MB/s (cross)"
            times_ts = ", ".join(f"{x['seconds']:.2f}" for x in rts)
            times_ls = ", ".join(f"{x['seconds']:.2f}" for x in rls)
            add(f"restore {size / 1e6:.0f} MB from {written}'s replica: best of {len(rts)} "
                f"(ts {times_ts} s; ls {times_ls} s)",
                target, f"{tls:.2f} s = {mls:.0f} MiB/s", f"{tts:.2f} s = {mts:.0f} MiB/s", fmt_ratio(mts, mls))
            add(f"  restore CPU / peak RSS ({written}'s replica)", "",
                f"{rls[-1]['cpu']:.1f} s / {mib(rls[-1]['maxrss'])}", f"{rts[-1]['cpu']:.1f} s / {mib(rts[-1]['maxrss'])}",
                fmt_ratio(rts[-1]["cpu"], rls[-1]["cpu"]))
            add(f"  output vs source ({written}'s replica)", "", rls[-1].get("same_as_source", "?"),
                rts[-1].get("same_as_source", "?"), "")
    st = res.get("startup")
    if st:
        add("process start-up (`tenantsync --help` / `litestream version`), best of 3", "",
            f"{st['litestream']:.3f} s", f"{st['tenantsync']:.3f} s", fmt_ratio(st["tenantsync"], st["litestream"]))
    lines = ["| measurement | target | Litestream 0.5.17 | tenantsync | ratio ts/ls |",
             "|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows]
    la = res.get("loadavg", {})
    lines.append("")
    lines.append(f"Load average (1 min) at start {la.get('start', 0):.2f}, at end {la.get('end', 0):.2f}; "
                 f"per run: {run_loads(res)}")
    psi = run_psi(res)
    if psi:
        lines.append("")
        lines.append(f"CPU pressure (PSI some avg10, % of time a runnable task waited for a CPU) per run: {psi}")
    return "\n".join(lines)


def run_loads(res: dict) -> str:
    parts = []
    for sync, runs in (res.get("throughput") or {}).items():
        parts.append(f"throughput {sync} " + "/".join(f"{r['load_start']:.1f}" for r in runs)
                     + " (run order " + ", ".join(r["tool"][:2] for r in runs) + ")")
    for tool, r in (res.get("lag") or {}).items():
        parts.append(f"lag {tool} {r['load_start']:.1f}")
    for tool, r in (res.get("burst") or {}).items():
        parts.append(f"burst {tool} {r['load_start']:.1f}")
    if res.get("restore"):
        parts.append("restores " + "/".join(f"{x['load']:.1f}" for runs in res["restore"]["runs"].values() for x in runs))
    return "; ".join(parts)


def run_psi(res: dict) -> str:
    parts = []

    def f(x):
        return "?" if x is None else f"{x:.0f}"
    for sync, runs in (res.get("throughput") or {}).items():
        parts.append(f"throughput {sync} " + "/".join(f(r.get("psi_start")) for r in runs))
    for tool, r in (res.get("lag") or {}).items():
        parts.append(f"lag {tool} {f(r.get('psi_start'))}")
    for tool, r in (res.get("burst") or {}).items():
        parts.append(f"burst {tool} {f(r.get('psi_start'))}")
    if res.get("restore"):
        parts.append("restores " + "/".join(f(x.get("psi")) for runs in res["restore"]["runs"].values() for x in runs))
    return "" if all("?" in p for p in parts) else "; ".join(parts)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_writer":
        writer_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke run (~3 min)")
    p.add_argument("--only", default="throughput,lag,burst,restore", help="comma-separated subset")
    p.add_argument("--seconds", type=float, help="throughput run length (20; quick 4)")
    p.add_argument("--lag-seconds", type=float, help="lag run length (30; quick 8)")
    p.add_argument("--rate", type=float, default=200, help="tx/s for the lag run")
    p.add_argument("--lag-sync", default="NORMAL", help="synchronous= for the lag and burst runs")
    p.add_argument("--burst-rows", type=int, help="rows in the burst (200000; quick 50000)")
    p.add_argument("--size-mb", type=int, help="restore database size (1024; quick 100)")
    p.add_argument("--restore-reps", type=int, help="restores per tool pair (2; quick 1)")
    p.add_argument("--rounds", type=int, help="throughput rounds per tool (2; quick 1)")
    p.add_argument("--drain", type=float, default=2.0, help="seconds after a writer ends before stopping")
    p.add_argument("--quiet", type=float, help="seconds of no replica change that end Litestream's startup (5; quick 3)")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip restoring after runs")
    p.add_argument("--workdir", help="scratch directory (default: new dir under $TMPDIR)")
    p.add_argument("--restore-out", help="directory for restore outputs (e.g. /dev/shm/x: the tools "
                                         "without the disk's write floor); default: in --workdir")
    p.add_argument("--keep", action="store_true", help="keep databases, replicas and logs")
    p.add_argument("--json", help="also write all raw results here")
    a = p.parse_args()
    import installed  # bench/installed.py
    installed.compile_sources()  # tenantsync's bytecode, as pip would have left it
    q = a.quick
    a.seconds = a.seconds or (4 if q else 20)
    a.lag_seconds = a.lag_seconds or (8 if q else 30)
    a.burst_rows = a.burst_rows or (50_000 if q else 200_000)
    a.size_mb = a.size_mb or (100 if q else 1024)
    a.restore_reps = a.restore_reps or (1 if q else 2)
    a.quiet = a.quiet or (3 if q else 5)
    a.rounds = a.rounds or (1 if q else 2)
    only = set(a.only.split(","))
    bench = Bench(a)
    log(f"workdir {bench.root}; tenantsync and litestream from {BIN}; load {loadavg():.2f}")
    version = subprocess.run([os.path.join(BIN, "litestream"), "version"], capture_output=True, text=True,
                             env=tool_env()).stdout.strip()
    bench.results["litestream_version"] = version
    bench.results["sqlite_version"] = sqlite3.sqlite_version
    bench.results["tenantsync_cmd"] = " ".join(tenantsync_cmd())
    git = lambda *c: subprocess.run(["git", "-C", REPO, *c], capture_output=True, text=True).stdout.strip()
    bench.results["git"] = {"head": git("rev-parse", "--short", "HEAD"),
                            "dirty": git("status", "--short", "--", "tenantsync").splitlines()}
    log(f"tenantsync: {bench.results['tenantsync_cmd']} at {bench.results['git']['head']}, "
        f"uncommitted in tenantsync/: {bench.results['git']['dirty'] or 'none'}")
    bench.results["loadavg"]["start"] = loadavg()
    t0 = time.monotonic()
    startup = {}
    for tool, cmd in (("tenantsync", tenantsync_cmd() + ["--help"]),
                      ("litestream", [os.path.join(BIN, "litestream"), "version"])):
        times = []
        for _ in range(3):
            t = time.monotonic()
            subprocess.run(cmd, capture_output=True, env=tool_env(), check=True)
            times.append(time.monotonic() - t)
        startup[tool] = min(times)
    bench.results["startup"] = startup
    try:
        if "throughput" in only:
            bench.throughput()
        if "lag" in only:
            bench.lag()
        if "burst" in only:
            bench.burst()
        if "restore" in only:
            bench.restore_bench()
    finally:
        bench.results["loadavg"]["end"] = loadavg()
        bench.results["seconds"] = time.monotonic() - t0
        if a.json:
            with open(a.json, "w") as f:
                json.dump(bench.results, f, indent=1, default=str)
        if not a.keep:
            shutil.rmtree(bench.root, ignore_errors=True)
    print(f"\n## tenantsync vs Litestream {version}, {'quick' if q else 'full'} run, "
          f"{bench.results['seconds'] / 60:.1f} min, {os.cpu_count()} CPUs, SQLite {sqlite3.sqlite_version}\n")
    print(report(bench.results))


if __name__ == "__main__":
    main()
