#!/usr/bin/env python3
"""Fleet benchmarks: tenantsync (embedded and Redis/Celery mode) and Litestream 0.5's
directory replication side by side, on identical sets of N tenant databases, in one run.

    python bench/fleet.py --quick                         # N=200, short windows (~8 min)
    python bench/fleet.py                                 # N=1,000 and 10,000 + S3 idle run (~28 min)
    python bench/fleet.py --tenants 1000 --only startup,idle,lag,jobs   # ~8 min
    python bench/fleet.py --tenants 1000 --mode embedded --only startup,idle
    python bench/fleet.py --json fleet.json --keep        # keep the scratch directory

For every N the same template tenant set (N copies of one small WAL-mode database,
``t00000.db`` …) is copied for each tool, which replicates it to its own ``file://``
replica root on the same disk (tenant NAME lands in ``ROOT/NAME/ltx/<level>/``
for all three setups). Each tool runs alone, in turn, while its measurements are taken:

1. startup  -- from process start until every tenant has an L0 file in its replica dir
   (the replica root is polled every 50 ms; only tenants not yet done are looked at).
   Timeout ``--startup-timeout``; a crash or timeout is reported with how many made it.
2. idle     -- ``--settle`` s after the last tenant was replicated, CPU (user+sys, % of
   one core) over ``--idle-window`` s, RSS (VmRSS) and open fds, summed over every
   process of the tool (each tool runs in its own sessions; processes are found by
   process group in /proc). Redis mode counts redis-server, the workers, the watcher and
   beat (or, with ``--watch-in-worker``, the workers alone: the first runs both).
3. lag      -- a writer process commits ``--rate`` single-row transactions/s to tenants
   chosen uniformly at random for ``--lag-seconds`` s, logging (tenant, row id, commit
   time); it keeps the connections it opened (like an app's pool, LRU-capped at 4,000).
   An inotify watch on every tenant's ``ltx/0`` records when each L0 file appears (its
   ctime, set by the link or rename that publishes it: the monitor thread's own delay on a
   busy machine is not the tool's lag; ``monitor_delay`` in the JSON says how late it read
   them) and reads its header timestamp; a commit is visible at the arrival of the first L0 of its
   tenant that arrived after the commit and whose header timestamp (taken by both tools
   after they sized the WAL to ship) is not earlier than the commit (2 ms slack), or, for
   a file that rule would skip, whose pages hold the commit's row (a writer that lost the
   CPU between its commit and reading the clock logs a time later than the file's stamp).
   Commits never seen within ``--drain`` s of the end count as missing.
4. requests -- object-storage requests of idle tenants, on S3: a moto server in this
   process counts every HTTP request (Werkzeug's request log, by bucket and kind);
   tenantsync (embedded) and Litestream replicate ``--s3-tenants`` tenants each into their
   own bucket at the same time (only those of them in ``--tools``); after ``--settle`` s idle,
   requests are counted for ``--s3-window`` s and scaled to per tenant per hour.
5. jobs     -- (tenantsync only) the watcher process is stopped (SIGTERM: it ships and
   releases everything), one row is committed to every tenant by writer processes that
   keep their connections open (so the WAL stays, as with an app's pool), and the
   watcher is started again: its start-up scan requests one sync per tenant. Jobs/s is
   N / (last new L0 - first new L0); embedded runs them in-process, Redis mode on the
   two already-running workers. (Redis mode: the workers keep running while the watcher
   is down, and their idle-release pass ships the new rows of tenants still open from the
   lag test, so only the tenants synced after the restart are counted there.)

If a tool did not replicate every tenant within the start-up timeout, lag and jobs are
skipped for it (they need replicated tenants; ``--always`` runs them anyway).

Load averages (1/5/15 min, as ``uptime``) are recorded with every measurement; the
machine is shared, so a noisy figure should be rerun (``--only``/``--tools``).
Everything listens on and talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import base64
import collections
import ctypes
import functools
import json
import logging
import os
import random
import re
import resource
import select
import shutil
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(HERE))
BIN = os.path.dirname(sys.executable)
L0_NAME = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{16}\.ltx$")
CLK_TCK = os.sysconf("SC_CLK_TCK")
HOST = "benchhost"
SCHEMA = "CREATE TABLE t(id INTEGER PRIMARY KEY, ts REAL, v TEXT)"
TOOLS = ("ts-embedded", "ts-redis", "litestream")
TOOL_LABEL = {"ts-embedded": "tenantsync embedded", "ts-redis": "tenantsync Redis", "litestream": "Litestream",
              "ts-embedded-nometrics": "tenantsync embedded, metrics off",
              "ts-embedded-encrypted": "tenantsync embedded, encrypted"}
#: What counting metrics costs: tenantsync embedded with TENANTSYNC_METRICS=off, beside the
#: default (not in TOOLS: ask for it with --tools ts-embedded,ts-embedded-nometrics).
NO_METRICS = {"TENANTSYNC_METRICS": "off"}
#: What encryption at rest costs: tenantsync embedded with `encrypt: true` and a keyring in the
#: environment (ask for it with --tools ts-embedded,ts-embedded-encrypted).
KEYRING = {"TENANTSYNC_KEYRING": json.dumps({"keys": {"bench": base64.b64encode(b"bench-kek" * 3 + b"12345").decode()}})}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def wait_for_quiet_machine(max_load: float, max_wait: float) -> list[float]:
    """Wait (up to ``max_wait`` s) for the 1-min load average to drop below ``max_load``."""
    deadline = time.monotonic() + max_wait
    first = True
    while os.getloadavg()[0] >= max_load and time.monotonic() < deadline:
        if first:
            log(f"  load {load()} >= {max_load}; waiting up to {max_wait:.0f} s for a quieter machine")
            first = False
        time.sleep(5)
    return load()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------
# Child processes and /proc accounting
# ---------------------------------------------------------------------------------------

def child_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTSYNC_")}
    env.pop("AWS_CA_BUNDLE", None)  # Litestream refuses to start with it set
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Child:
    """One child in a new session: its PID is its process group, which holds everything it forks."""

    def __init__(self, name: str, args: list[str], env: dict, log_path: str, nofile: int | None = None):
        self.name, self.args, self.env, self.log_path, self.nofile = name, args, env, log_path, nofile
        self.proc: subprocess.Popen | None = None
        self.started = 0.0

    def start(self) -> "Child":
        with open(self.log_path, "ab") as f:
            f.write(f"\n===== {time.strftime('%H:%M:%S')} start: {' '.join(self.args)}\n".encode())
            f.flush()
            pre = None
            if self.nofile:
                n = self.nofile
                pre = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))  # noqa: E731
            self.started = time.monotonic()
            self.proc = subprocess.Popen(self.args, env=self.env, stdin=subprocess.DEVNULL, stdout=f,
                                         stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=pre)
        return self

    @property
    def pgid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 60.0) -> float:
        """SIGTERM the group, wait for the main process, SIGKILL what is left; seconds taken."""
        if self.proc is None:
            return 0.0
        t = time.monotonic()
        if self.proc.poll() is None:
            self.signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"  {self.name}: still running {timeout:.0f} s after SIGTERM; SIGKILL")
        took = time.monotonic() - t
        self.signal_group(signal.SIGKILL)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        return took

    def log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def tail(self, chars: int = 1500) -> str:
        return self.log_text()[-chars:]


def group_pids(pgids: set[int]) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) in pgids:
            out.append(int(entry))
    return out


def proc_cpu(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "Threads", "Name"):
                    out[key] = value.strip()
    except OSError:
        pass
    return out


def proc_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def group_cpu(pgids: set[int]) -> dict[int, float]:
    out = {}
    for pid in group_pids(pgids):
        c = proc_cpu(pid)
        if c is not None:
            out[pid] = c
    return out


def group_snapshot(pgids: set[int]) -> dict:
    """RSS (bytes), fds, threads, processes; per process name too."""
    rss = fds = threads = 0
    per: dict[str, dict] = {}
    pids = group_pids(pgids)
    for pid in pids:
        st = proc_status(pid)
        r = int(st.get("VmRSS", "0 kB").split()[0]) * 1024
        n = proc_fds(pid)
        th = int(st.get("Threads", "0"))
        rss, fds, threads = rss + r, fds + n, threads + th
        p = per.setdefault(st.get("Name", "?"), {"procs": 0, "rss": 0, "fds": 0, "threads": 0})
        p["procs"] += 1
        p["rss"] += r
        p["fds"] += n
        p["threads"] += th
    return {"rss": rss, "fds": fds, "threads": threads, "procs": len(pids), "by_name": per}


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(after[p] - before.get(p, 0.0) for p in after)


# ---------------------------------------------------------------------------------------
# Tenant sets
# ---------------------------------------------------------------------------------------

def tenant_names(n: int) -> list[str]:
    return [f"t{i:05d}.db" for i in range(n)]


def make_template(path: str, rows: int = 20) -> None:
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(SCHEMA)
    rnd = random.Random(1)
    conn.execute("BEGIN")
    for _ in range(rows):
        conn.execute("INSERT INTO t(ts, v) VALUES (?, ?)", (time.time(), rnd.randbytes(50).hex()))
    conn.execute("COMMIT")
    conn.close()  # checkpoints and removes the -wal; the file stays in WAL mode


def copy_tenants(template: str, data_dir: str, names: list[str]) -> None:
    os.makedirs(data_dir, exist_ok=True)
    for name in names:
        shutil.copyfile(template, os.path.join(data_dir, name))


def l0_dir(replica: str, name: str) -> str:
    return os.path.join(replica, name, "ltx", "0")


def wait_replicated(replica: str, names: list[str], alive, t_start: float, timeout: float) -> dict:
    """Poll until every tenant has an L0 in REPLICA/NAME/ltx/0, the tool dies, or timeout."""
    pending = set(names)
    n = len(names)
    marks = {}
    res: dict = {"tenants": n}
    while True:
        now = time.monotonic()
        try:
            present = set(os.listdir(replica))
        except FileNotFoundError:
            present = set()
        for name in list(pending & present):
            try:
                if any(L0_NAME.match(f) for f in os.listdir(l0_dir(replica, name))):
                    pending.discard(name)
            except FileNotFoundError:
                pass
        done = n - len(pending)
        for frac in (0.5, 0.9):
            if frac not in marks and done >= frac * n:
                marks[frac] = now - t_start
        if not pending:
            res.update(seconds=now - t_start, replicated=n)
            break
        if not alive():
            res.update(seconds=None, replicated=done, exited_after=now - t_start, crashed=True)
            break
        if now - t_start > timeout:
            res.update(seconds=None, replicated=done, timeout=timeout)
            break
        time.sleep(0.05)
    res["t50"], res["t90"] = marks.get(0.5), marks.get(0.9)
    return res


# ---------------------------------------------------------------------------------------
# inotify on every tenant's ltx/0: arrival time and header timestamp of each L0 file
# ---------------------------------------------------------------------------------------

class L0Monitor(threading.Thread):
    IN_CREATE, IN_MOVED_TO, IN_Q_OVERFLOW = 0x100, 0x80, 0x4000
    HEADER = struct.Struct(">4sIIIQQq")  # magic, flags, page size, commit, min, max, timestamp (ms)

    def __init__(self, replica: str, names: list[str], keep_bodies: bool = False):
        super().__init__(daemon=True, name="l0-monitor")
        self.libc = ctypes.CDLL("libc.so.6", use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.wd: dict[int, str] = {}
        self.dirs: dict[str, str] = {}
        for name in names:
            d = l0_dir(replica, name)
            wd = self.libc.inotify_add_watch(self.fd, d.encode(), self.IN_CREATE | self.IN_MOVED_TO)
            if wd >= 0:
                self.wd[wd] = name
                self.dirs[name] = d
        self.unwatched = len(names) - len(self.wd)
        self.arrivals: dict[str, list[tuple[float, int | None]]] = collections.defaultdict(list)
        # With ``keep_bodies``, each arrival's whole file (a few hundred bytes for an L0 of
        # one commit), parallel to ``arrivals``: the lag test looks inside the few files
        # whose header timestamp alone cannot say whether they hold a commit (visibility()).
        self.bodies: dict[str, list[bytes | None]] | None = collections.defaultdict(list) if keep_bodies else None
        self.count = 0
        self.read_delays: list[float] = []  # how long after its ctime this thread read each file
        self.overflow = False
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def read_l0(self, path: str) -> tuple[int | None, bytes | None, float | None]:
        """The header timestamp of an L0 file, the file when bodies are kept, and its ctime:
        when its name appeared (both tools publish with a link or rename, which sets it)."""
        try:
            with open(path, "rb") as f:
                data = f.read() if self.bodies is not None else f.read(self.HEADER.size)
                ctime = os.fstat(f.fileno()).st_ctime
            magic, _flags, _ps, _commit, _lo, _hi, ts = self.HEADER.unpack_from(data)
            if magic != b"LTX1":
                return None, None, ctime
            return ts, data if self.bodies is not None else None, ctime
        except (OSError, struct.error):
            return None, None, None

    def run(self) -> None:
        buf_size = 1 << 20
        while not self._halt.is_set():
            r, _, _ = select.select([self.fd], [], [], 0.05)
            if not r:
                continue
            now = time.time()
            try:
                buf = os.read(self.fd, buf_size)
            except BlockingIOError:
                continue
            off = 0
            while off < len(buf):
                wd, mask, _cookie, n = struct.unpack_from("iIII", buf, off)
                fname = buf[off + 16: off + 16 + n].rstrip(b"\0").decode()
                off += 16 + n
                if mask & self.IN_Q_OVERFLOW:
                    self.overflow = True
                    continue
                name = self.wd.get(wd)
                if name is None or not L0_NAME.match(fname):
                    continue
                ts, body, ctime = self.read_l0(os.path.join(self.dirs[name], fname))
                # Arrival is the file's ctime, not when this thread got to it: a busy
                # machine delays this thread too, and that is not the tool's lag.
                at = now if ctime is None else min(now, ctime)
                with self._lock:
                    self.arrivals[name].append((at, ts))
                    self.read_delays.append(now - at)
                    if self.bodies is not None:
                        self.bodies[name].append(body)
                    self.count += 1

    def holds(self, name: str, index: int, value: str) -> bool:
        """Whether the ``index``-th L0 file that arrived for tenant ``name`` holds a row with
        the writer's ``value`` (its pages hold the text as written); needs ``keep_bodies``."""
        with self._lock:
            bodies = self.bodies[name] if self.bodies is not None else []
            body = bodies[index] if index < len(bodies) else None
        return body is not None and l0_holds(body, value)

    def tenants_since(self, t: float) -> dict[str, float]:
        """First arrival (wall time) per tenant of an L0 that arrived at or after ``t``."""
        out = {}
        with self._lock:
            for name, items in self.arrivals.items():
                for at, _ts in items:
                    if at >= t:
                        out[name] = at
                        break
        return out

    def finish(self) -> None:
        self._halt.set()
        self.join()
        os.close(self.fd)


def l0_holds(body: bytes, value: str) -> bool:
    """Whether the pages of an L0 file hold a row with the writer's ``value`` (as written)."""
    # Imported here: the writer processes import this file too, and need none of it.
    from tenantsync.ltx.decoder import decode_file

    try:
        _header, pages, _trailer = decode_file(body)
    except Exception:  # noqa: BLE001 - a file that does not decode holds nothing we can count
        return False
    needle = value.encode()
    return any(needle in page for _pgno, page in pages)


def percentile(ranked: list[float], p: float) -> float | None:
    """The ``p``-th percentile of an ascending list (nearest rank), None if it is empty."""
    if not ranked:
        return None
    return ranked[min(len(ranked) - 1, int(round(p / 100 * (len(ranked) - 1))))]


# How much earlier than a commit's logged time a file that holds it may arrive: a bound,
# with a wide margin, on a starved writer's delay between its commit and reading the clock.
CLOCK_READ_DELAY = 1.0


def visibility(commits: list, arrivals: dict, watched=None, slack_ms: float = 2.0,
               holds: Callable[[str, int, str], bool] | None = None) -> dict:
    """Lag of every commit: first L0 of its tenant arriving after it with a header timestamp
    not earlier than it (both tools stamp the header after sizing the WAL they ship).

    The writer logs a commit's time after SQLite returns, and a writer that loses the CPU
    between its commit and that clock read logs a time later than a sync that already
    shipped the commit: the timestamp rule then skips the file that holds it and charges
    the commit the wait for that tenant's next file (tens of seconds at 10,000 tenants);
    such a file can even arrive before the logged time. So a file the rule would skip, if it
    arrived at most CLOCK_READ_DELAY before the logged time, is looked into when
    ``holds(tenant, arrival index, value)`` is given and the commit's row value is logged:
    if it holds the row, it counts (a lag of 0 if it arrived before the logged time).
    Commits to tenants that had no replica dir to watch (never replicated) are only counted."""
    by_tenant: dict[str, list] = collections.defaultdict(list)
    unwatched = 0
    for name, rid, t, *value in commits:
        if watched is not None and name not in watched:
            unwatched += 1
            continue
        by_tenant[name].append((t, rid, value[0] if value else None))
    lags, missing = [], 0
    start = min((c[2] for c in commits), default=0.0)
    found_inside = 0
    buckets: dict[int, list] = collections.defaultdict(list)  # 5 s of commit time -> lags
    worst: list[tuple[float, str, float]] = []  # (lag, tenant, commit s after the start)
    for name, items in by_tenant.items():
        items.sort()
        files = sorted((at, ts, i) for i, (at, ts) in enumerate(arrivals.get(name, [])))
        j = 0
        for t, _rid, value in items:
            while j < len(files):
                at, ts, i = files[j]
                if at >= t and (ts is None or ts + slack_ms >= t * 1000):
                    break
                if at >= t - CLOCK_READ_DELAY and holds is not None and value is not None and holds(name, i, value):
                    found_inside += 1
                    break
                j += 1
            # Arrived before the logged time: the commit was shipped before the writer read the clock.
            lag = float("inf") if j == len(files) else max(0.0, files[j][0] - t)
            buckets[int((t - start) // 5)].append(lag)
            worst.append((lag, name, round(t - start, 3)))
            if j == len(files):
                missing += 1
            else:
                lags.append(lag)
    lags.sort()
    # A commit never seen counts as slower than every seen one: a percentile that lands on
    # one is reported as None with "p99_unseen" set (the drain time bounds it from below).
    ranked = lags + [float("inf")] * missing

    def pct(p):
        v = percentile(ranked, p)
        return None if v == float("inf") else v

    return {"commits": len(commits), "seen": len(lags), "missing": missing, "unwatched": unwatched,
            "found_inside": found_inside,  # commits seen in a file their timestamp would skip
            "p50": pct(50), "p90": pct(90), "p99": pct(99), "p99_unseen": bool(ranked) and pct(99) is None,
            "max": lags[-1] if lags else None, "mean": statistics.fmean(lags) if lags else None,
            # When the slow commits were made: [start s, p50, max] per 5 s of the writer's run.
            "by_5s": [[5 * k, round(statistics.median(v), 3), round(max(v), 3)] for k, v in sorted(buckets.items())],
            # The slowest commits, to look for in the logs: [lag s, tenant, commit s after the start].
            "slowest": [[round(lag, 3), name, t] for lag, name, t in sorted(worst, reverse=True)[:10]]}


# ---------------------------------------------------------------------------------------
# Writer processes: ``fleet.py _writer`` (paced random writes) and ``_touch`` (one each)
# ---------------------------------------------------------------------------------------

def writer_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="fleet.py _writer")
    p.add_argument("data")
    p.add_argument("names")
    p.add_argument("--rate", type=float, default=200)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--log", required=True)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--max-open", type=int, default=4000)
    a = p.parse_args(argv)
    with open(a.names) as f:
        names = json.load(f)
    rnd = random.Random(a.seed)
    conns: collections.OrderedDict[str, sqlite3.Connection] = collections.OrderedDict()
    n = int(a.seconds * a.rate)
    out, late = [], 0
    t0 = time.time() + 0.05
    for i in range(n):
        target = t0 + i / a.rate
        delay = target - time.time()
        if delay > 0:
            time.sleep(delay)
        elif delay < -0.02:
            late += 1
        name = rnd.choice(names)
        conn = conns.get(name)
        if conn is None:
            conn = sqlite3.connect(os.path.join(a.data, name), isolation_level=None, timeout=30)
            conn.execute("PRAGMA synchronous=NORMAL")
            conns[name] = conn
            if len(conns) > a.max_open:
                conns.popitem(last=False)[1].close()
        else:
            conns.move_to_end(name)
        value = rnd.randbytes(50).hex()
        cur = conn.execute("INSERT INTO t(ts, v) VALUES (?, ?)", (time.time(), value))
        out.append((name, cur.lastrowid, time.time(), value))
    elapsed = time.time() - t0
    with open(a.log, "w") as f:
        json.dump(out, f)
    print(json.dumps({"commits": n, "elapsed": elapsed, "late": late, "open": len(conns)}), flush=True)
    os._exit(0)  # leave the connections to the OS: no checkpoint-on-close under the replicator


def touch_main(argv: list[str]) -> None:
    """Commit one row to each tenant, keep every connection open, print, wait for SIGTERM."""
    p = argparse.ArgumentParser(prog="fleet.py _touch")
    p.add_argument("data")
    p.add_argument("names")
    a = p.parse_args(argv)
    with open(a.names) as f:
        names = json.load(f)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    conns = []
    t0 = time.time()
    for name in names:
        conn = sqlite3.connect(os.path.join(a.data, name), isolation_level=None, timeout=30)
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("INSERT INTO t(ts, v) VALUES (?, ?)", (time.time(), os.urandom(50).hex()))
        conns.append(conn)
    print(json.dumps({"touched": len(conns), "seconds": time.time() - t0}), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        time.sleep(3600)


# ---------------------------------------------------------------------------------------
# The three setups
# ---------------------------------------------------------------------------------------

class Setup:
    """One tool replicating DATA/*.db into REPLICA (file:// or an S3 URL)."""

    kind = ""

    def __init__(self, root: str, names: list[str], template: str, args, replica_url: str | None = None,
                 extra_env: dict | None = None):
        self.root, self.names, self.a = root, names, args
        self.data = os.path.join(root, "data")
        self.replica = os.path.join(root, "replica")
        self.replica_url = replica_url or "file://" + self.replica
        self.logdir = os.path.join(root, "logs")
        os.makedirs(self.logdir, exist_ok=True)
        copy_tenants(template, self.data, names)
        self.env = child_env(extra_env)
        self.children: list[Child] = []

    def pgids(self) -> set[int]:
        return {c.pgid for c in self.children if c.alive()}

    def alive(self) -> bool:
        return all(c.alive() for c in self.children)

    def child(self, name: str, args: list[str]) -> Child:
        c = Child(name, args, self.env, os.path.join(self.logdir, f"{name}.log"), self.a.nofile)
        self.children.append(c)
        return c.start()

    def start(self) -> float:
        """Start everything; returns the monotonic time replication began."""
        raise NotImplementedError

    stop_timeout = 120.0

    def stop(self) -> dict[str, float]:
        """Stop every child, last started first; seconds from SIGTERM to exit, by child."""
        return {c.name: c.stop(self.stop_timeout) for c in reversed(self.children)}

    def log_counts(self) -> dict:
        """Cumulative counts of tenantsync's contention warnings in every log."""
        pats = {"replica_conflict": r"already exists; another process", "lease_lost": r"lease generation \d+ lost",
                "lease_held": r"lease .*held by", "release_failed": r"releasing idle tenants failed",
                "emfile": r"Too many open files|too many open files", "traceback": r"Traceback"}
        out = dict.fromkeys(pats, 0)
        for c in self.children + getattr(self, "stopped", []):
            text = c.log_text()
            for k, pat in pats.items():
                out[k] += len(re.findall(pat, text))
        return out

    def errors(self) -> str:
        """The first lines of the logs that look like errors."""
        lines = []
        for c in self.children:
            for line in c.log_text().splitlines():
                if re.search(r"error|Traceback|too many open|exception", line, re.I) and len(lines) < 8:
                    lines.append(f"{c.name}: {line[:300]}")
        return "\n".join(lines)


class Tenantsync(Setup):
    def __init__(self, root, names, template, args, broker: str | None = None, encrypt: bool = False, **kw):
        super().__init__(root, names, template, args, **kw)
        self.kind = "ts-redis" if broker else "ts-embedded"
        self.broker = broker
        self.config = os.path.join(root, "tenantsync.yml")
        raw = {
            "replica": self.replica_url,
            "globs": [os.path.join(self.data, "*.db")],
            "catalogue": f"sqlite:///{os.path.join(root, 'catalogue.db')}",
            "host": HOST,
        }
        if args.sync_threads:
            raw["sync-threads"] = args.sync_threads
        if getattr(args, "idle_after", None):
            raw["idle-after"] = args.idle_after
        if encrypt:
            raw["encrypt"] = True
        if broker:
            raw["broker"] = broker
            raw["host-workers"] = args.host_workers
        with open(self.config, "w") as f:
            json.dump(raw, f, indent=2)  # JSON is YAML
        self.env["TENANTSYNC_CONFIG"] = self.config
        self.watcher: Child | None = None

    def open_tenants(self) -> int:
        """Tenants the catalogue says are open (state active): what a stop has to release."""
        with sqlite3.connect(f"file:{os.path.join(self.root, 'catalogue.db')}?mode=ro", uri=True, timeout=30) as conn:
            return conn.execute("SELECT count(*) FROM tenants WHERE state = 'active'").fetchone()[0]

    def watcher_args(self) -> list[str]:
        script = os.path.join(BIN, "tenantsync")
        cmd = [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "tenantsync"]
        return [*cmd, "watch", "--config", self.config]

    def start_watcher(self) -> float:
        self.watcher = self.child("watcher", self.watcher_args())
        return self.watcher.started

    def stop_watcher(self) -> float:
        took = self.watcher.stop(120)
        self.children.remove(self.watcher)
        self.stopped = [*getattr(self, "stopped", []), self.watcher]
        return took


class Embedded(Tenantsync):
    def start(self) -> float:
        return self.start_watcher()


class RedisMode(Tenantsync):
    def __init__(self, root, names, template, args, **kw):
        self.port = free_port()
        super().__init__(root, names, template, args, broker=f"redis://127.0.0.1:{self.port}/0", **kw)
        self.workers: list[Child] = []

    def start(self) -> float:
        self.child("redis", ["/usr/bin/redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--daemonize", "no"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                time.sleep(0.02)
        # The README's deployment: one worker process per host queue (threads; --host-workers
        # of them, each tenant's jobs always on the same one), and one storage worker.
        n = self.a.host_workers
        queues = [f"host.{HOST}"] if n == 1 else [f"host.{HOST}.{k}" for k in range(n)]
        small = self.a.storage_on_host_workers  # a small host: its workers also run the storage jobs
        celery = self.a.worker_command == "celery"
        # With python -m workers, the first worker's --storage runs them (a niced child while
        # they wait); `celery worker` takes the storage queue into each worker's own threads.
        plan = [(i + 1, f"{q},storage" if small and celery else q, self.a.worker_threads) for i, q in enumerate(queues)]
        if not small:
            plan.append((n + 1, "storage", 2))
        for i, queue, threads in plan:
            if celery:
                command = [os.path.join(BIN, "celery"), "-A", "workers", "worker", "--pool", "threads",
                           "--without-gossip", "--without-mingle"]
            else:  # the README's launcher; the first worker may also run the watcher and beat
                inside = ["--watch", "--beat", "--beat-schedule", os.path.join(self.root, "beat-schedule")]
                command = [sys.executable, "-m", "workers"] + (inside if self.a.watch_in_worker and i == 1 else [])
                command += ["--storage"] if small and i == 1 else []  # one storage child per host
            self.workers.append(self.child(f"worker{i}", [
                *command, "-Q", queue, "-c", str(threads), "-n", f"w{i}@%h", "--loglevel", "WARNING"]))
        # A worker consuming its queues blocks in BRPOP on them: wait for both.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and all(w.alive() for w in self.workers):
            out = subprocess.run(["redis-cli", "-p", str(self.port), "client", "list"], capture_output=True,
                                 text=True).stdout
            if out.count("cmd=brpop") >= len(self.workers):
                break
            time.sleep(0.2)
        else:
            log(f"  workers not consuming after 60 s (alive: {[w.alive() for w in self.workers]})")
        if self.a.watch_in_worker:
            return self.workers[0].started  # its watcher started once the worker was ready
        # Beat sends the storage plans (compaction, snapshots, retention), as in the README.
        self.child("beat", [os.path.join(BIN, "celery"), "-A", "scheduler.beat", "beat", "--loglevel", "WARNING",
                            "-s", os.path.join(self.root, "celerybeat-schedule")])
        return self.start_watcher()


class Litestream(Setup):
    kind = "litestream"
    stop_timeout = 30.0  # it retries its shutdown sync while its fds are exhausted

    def __init__(self, root, names, template, args, s3: dict | None = None, **kw):
        super().__init__(root, names, template, args, **kw)
        self.config = os.path.join(root, "litestream.yml")
        if s3:
            replica = {"type": "s3", "bucket": s3["bucket"], "path": s3["path"], "endpoint": s3["endpoint"],
                       "region": "us-east-1", "force-path-style": True,
                       # The server's identity: moto takes any, SeaweedFS only its own.
                       "access-key-id": os.environ.get("AWS_ACCESS_KEY_ID", "test"),
                       "secret-access-key": os.environ.get("AWS_SECRET_ACCESS_KEY", "test")}
        else:
            replica = {"type": "file", "path": self.replica}
        cfg = {"dbs": [{"dir": self.data, "pattern": "*.db", "watch": True, "replica": replica}]}
        with open(self.config, "w") as f:
            json.dump(cfg, f, indent=2)

    def start(self) -> float:
        c = self.child("litestream", [os.path.join(BIN, "litestream"), "replicate", "-config", self.config])
        return c.started


# ---------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------

def git_state() -> dict:
    def git(*args):
        return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True).stdout.strip()

    return {"head": git("rev-parse", "--short", "HEAD"), "dirty": git("status", "--short", "--untracked-files=no")}


class Bench:
    def __init__(self, args):
        self.a = args
        self.root = args.workdir or tempfile.mkdtemp(prefix="tenantsync-fleet-")
        os.makedirs(self.root, exist_ok=True)
        self.results: dict = {"args": {k: v for k, v in vars(args).items()}, "runs": {}, "started": time.time(),
                              "nofile": resource.getrlimit(resource.RLIMIT_NOFILE), "git": git_state()}
        log(f"scratch directory {self.root}")

    def wanted(self, what: str) -> bool:
        return what in self.a.only

    # -- one tool on one tenant set ----------------------------------------------------

    def run_tool(self, kind: str, n: int, template: str) -> dict:
        names = tenant_names(n)
        root = os.path.join(self.root, f"n{n}", kind)
        shutil.rmtree(root, ignore_errors=True)
        log(f"N={n} {TOOL_LABEL[kind]}: copying {n} tenants")
        if kind == "ts-embedded-nometrics":
            setup = Embedded(root, names, template, self.a, extra_env=NO_METRICS)
        elif kind == "ts-embedded-encrypted":
            setup = Embedded(root, names, template, self.a, extra_env=KEYRING, encrypt=True)
        else:
            cls = {"ts-embedded": Embedded, "ts-redis": RedisMode, "litestream": Litestream}[kind]
            setup = cls(root, names, template, self.a)
        res: dict = {"tool": kind, "tenants": n, "git": git_state()}
        try:
            self._run_tool(setup, res, names)
        except Exception as e:  # noqa: BLE001 - record and go on with the other tools
            log(f"  {kind}: benchmark step failed: {e!r}")
            res["failure"] = repr(e)
        finally:
            res["errors"] = setup.errors()
            setup.stop()
            res["logs"] = setup.log_counts()
            log(f"  log warnings (cumulative): {res['logs']}")
            if not self.a.keep:
                shutil.rmtree(root, ignore_errors=True)
        return res

    def _run_tool(self, setup: Setup, res: dict, names: list[str]) -> None:
        a = self.a
        res["load_before"] = wait_for_quiet_machine(a.max_load, a.max_wait)
        t0 = setup.start()
        spies = self.spy(setup, f"n{len(names)}-startup", a.startup_timeout) if isinstance(setup, Tenantsync) else []
        log(f"  started (load {load()}); waiting for every tenant's first L0 (timeout {a.startup_timeout:.0f} s)")
        st = wait_replicated(setup.replica, names, setup.alive, t0, a.startup_timeout)
        st["load"] = load()
        for spy in spies:
            spy.send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
            spy.wait(60)
        res["startup"] = st
        st["logs"] = setup.log_counts()
        if st["seconds"] is not None:
            log(f"  all {len(names)} replicated in {st['seconds']:.2f} s (50 % {st['t50']:.2f} s, "
                f"90 % {st['t90']:.2f} s) load {st['load']}")
        else:
            log(f"  NOT all replicated: {st['replicated']}/{len(names)} "
                f"({'crashed' if st.get('crashed') else 'timeout'}) load {st['load']}")
            if not setup.alive():
                res["exit"] = {c.name: c.proc.returncode for c in setup.children}
                log(f"  {setup.kind} exited: {res['exit']}\n{setup.errors()}")
                return
        if self.wanted("idle"):
            log(f"  idle {a.settle:.0f} s, then measuring {a.idle_window:.0f} s")
            time.sleep(a.settle)
            res["idle"] = self.measure_idle(setup, len(names))
            i = res["idle"]
            log(f"  idle: cpu {i['cpu_pct']:.1f} % of a core, rss {i['rss'] / 2**20:.0f} MiB, {i['fds']} fds, "
                f"{i['threads']} threads, {i['procs']} procs; load {i['load']}")
        if not setup.alive():
            return
        if st["seconds"] is None and not a.always:
            # Lag and jobs assume replicated tenants; measured anyway, they time out (minutes).
            log("  skipping lag and jobs: not every tenant was replicated (--always runs them anyway)")
            res["skipped"] = "not every tenant replicated"
            return
        if self.wanted("lag"):
            res["lag"] = self.measure_lag(setup, names)
            res["lag"]["logs"] = setup.log_counts()
        if not setup.alive():
            return
        if self.wanted("jobs") and isinstance(setup, RedisMode) and self.a.watch_in_worker:
            log("  skipping jobs: it restarts the watcher, which runs inside a worker here")
        elif self.wanted("jobs") and isinstance(setup, Tenantsync):
            res["jobs"] = self.measure_jobs(setup, names)
            res["jobs"]["logs"] = setup.log_counts()

    def spy(self, setup: Setup, label: str, seconds: float) -> list:
        """With --profile: py-spy (raw stacks) on every Python process of the tool."""
        spies: list = []
        if not self.a.profile:
            return spies
        os.makedirs(self.a.profile, exist_ok=True)
        for pid in group_pids(setup.pgids()):
            if "python" in os.readlink(f"/proc/{pid}/exe") or "celery" in proc_status(pid).get("Name", ""):
                out = os.path.join(self.a.profile, f"{setup.kind}-{label}-{pid}.txt")
                spies.append(subprocess.Popen(
                    [shutil.which("py-spy") or os.path.join(BIN, "py-spy"), "record", "--nonblocking", "--idle",
                     "--threads", "-r", "50", "-d", str(int(seconds)), "--format", "raw", "-o", out,
                     "--pid", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return spies

    def measure_idle(self, setup: Setup, n: int) -> dict:
        pg = setup.pgids()
        load0 = load()
        spies = self.spy(setup, f"n{n}-idle", self.a.idle_window)
        c0, t = group_cpu(pg), time.monotonic()
        time.sleep(self.a.idle_window)
        c1, dt = group_cpu(pg), time.monotonic() - t
        for spy in spies:
            spy.wait(60)
        snap = group_snapshot(pg)
        return {"cpu_pct": 100 * cpu_delta(c0, c1) / dt, "window": dt, "load_start": load0, "load": load(), **snap}

    def measure_lag(self, setup: Setup, names: list[str]) -> dict:
        a = self.a
        mon = L0Monitor(setup.replica, names, keep_bodies=True)
        mon.start()
        names_file = os.path.join(setup.root, "names.json")
        with open(names_file, "w") as f:
            json.dump(names, f)
        commit_log = os.path.join(setup.root, "commits.json")
        log(f"  lag: {a.rate:.0f} writes/s at random over {len(names)} tenants for {a.lag_seconds:.0f} s "
            f"(inotify on {len(mon.wd)} dirs)")
        load0 = load()
        pg = setup.pgids()
        spies = self.spy(setup, f"n{len(names)}-lag", a.lag_seconds)
        c0, t = group_cpu(pg), time.monotonic()
        proc = subprocess.run([sys.executable, HERE, "_writer", setup.data, names_file, "--rate", str(a.rate),
                               "--seconds", str(a.lag_seconds), "--log", commit_log],
                              capture_output=True, text=True, env=child_env())
        if proc.returncode != 0:
            mon.finish()
            raise RuntimeError(f"writer failed: {proc.stderr[-2000:]}")
        writer = json.loads(proc.stdout.strip().splitlines()[-1])
        c1, dt = group_cpu(pg), time.monotonic() - t
        for spy in spies:
            spy.wait(60)
        with open(commit_log) as f:
            commits = json.load(f)
        holds = functools.lru_cache(maxsize=None)(mon.holds)
        # Drain: until every commit is visible or --drain s passed.
        deadline = time.monotonic() + a.drain
        while time.monotonic() < deadline:
            with mon._lock:
                arrivals = {k: list(v) for k, v in mon.arrivals.items()}
            if visibility(commits, arrivals, mon.dirs, holds=holds)["missing"] == 0:
                break
            time.sleep(0.5)
        mon.finish()
        with open(os.path.join(setup.root, "arrivals.json"), "w") as f:
            json.dump(mon.arrivals, f)
        vis = visibility(commits, {k: list(v) for k, v in mon.arrivals.items()}, mon.dirs, holds=holds)
        delays = sorted(mon.read_delays)
        vis.update(monitor_delay={"p50": percentile(delays, 50), "p99": percentile(delays, 99),
                                  "max": percentile(delays, 100)})
        vis.update(writer=writer, cpu_pct=100 * cpu_delta(c0, c1) / dt, l0_files=mon.count,
                   overflow=mon.overflow, load_start=load0, load=load())
        log(f"  lag p50 {fmt_s(vis['p50'])} p99 {fmt_s(vis['p99'])} max {fmt_s(vis['max'])}; "
            f"{vis['seen']}/{vis['commits']} seen ({vis['found_inside']} by content), {vis['missing']} missing, {vis['unwatched']} to never-replicated "
            f"tenants; writer late {writer['late']}; "
            f"cpu {vis['cpu_pct']:.0f} %; load {vis['load']}")
        return vis

    def measure_jobs(self, setup: Tenantsync, names: list[str]) -> dict:
        """Stop the watcher, commit one row per tenant, restart it: N sync jobs at once."""
        a = self.a
        res: dict = {}
        # Let any backlog of the lag test drain first: no new L0 for 3 s (at most 120 s).
        quiet = L0Monitor(setup.replica, names)
        quiet.start()
        t_q = time.monotonic()
        last = (quiet.count, t_q)
        while time.monotonic() - t_q < 120:
            time.sleep(0.5)
            if quiet.count != last[0]:
                last = (quiet.count, time.monotonic())
            elif time.monotonic() - last[1] >= 3:
                break
        quiet.finish()
        res["drain_seconds"] = time.monotonic() - t_q
        log(f"  jobs: backlog drained after {res['drain_seconds']:.1f} s ({quiet.count} L0 files); "
            "stopping the watcher (it ships and releases everything)")
        res["watcher_stop_seconds"] = setup.stop_watcher()
        log(f"  watcher stopped in {res['watcher_stop_seconds']:.1f} s; one row into each of {len(names)} tenants")
        # Watched from before the first write: in Redis mode the workers keep running, and a
        # sync still queued or retrying from the lag test may ship a write before the restart.
        mon = L0Monitor(setup.replica, names)
        mon.start()
        wall_touch = time.time()
        touchers = []
        per = max(1, (resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 100) // 3)
        for i in range(0, len(names), per):
            part = os.path.join(setup.root, f"touch{i}.json")
            with open(part, "w") as f:
                json.dump(names[i:i + per], f)
            touchers.append(subprocess.Popen([sys.executable, HERE, "_touch", setup.data, part],
                                             stdout=subprocess.PIPE, text=True, env=child_env(),
                                             start_new_session=True))
        try:
            for p in touchers:
                line = p.stdout.readline()
                if not line:
                    raise RuntimeError("touch writer failed")
            res["touch_seconds"] = time.time() - wall_touch
            res["before_restart"] = len(mon.tenants_since(wall_touch))
            res["load_start"] = wait_for_quiet_machine(a.max_load, a.max_wait)
            wall0 = time.time()
            t0 = setup.start_watcher()
            deadline = t0 + a.jobs_timeout
            while time.monotonic() < deadline:
                if len(mon.tenants_since(wall_touch)) >= len(names) or not setup.alive():
                    break
                time.sleep(0.1)
            got = mon.tenants_since(wall_touch)
            res["done"] = len(got)
            # Jobs the restart started: tenants whose first new L0 came after it (in Redis mode a
            # few may be shipped before, by syncs still retrying from the lag test).
            after = [at for at in got.values() if at >= wall0]
            res["after_restart"] = len(after)
            if len(after) > 1:
                res["jobs_per_s_restart"] = len(after) / max(max(after) - min(after), 1e-3)
            if got:
                first, last = min(got.values()), max(got.values())
                res["first_after_start"] = first - wall0
                res["last_after_start"] = last - wall0
                res["jobs_per_s"] = len(got) / max(last - first, 1e-3)
                res["jobs_per_s_from_start"] = len(got) / max(last - wall0, 1e-3)
            res["load"] = load()
            log(f"  jobs: {res['done']}/{len(names)} synced; {fmt(res.get('jobs_per_s'), '.0f')} jobs/s "
                f"(first L0 after {fmt_s(res.get('first_after_start'))}, last {fmt_s(res.get('last_after_start'))}); "
                f"load {res['load']}")
        finally:
            mon.finish()
            for p in touchers:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                p.wait(30)
        return res

    # -- S3 request counts ---------------------------------------------------------------

    def s3_requests(self, n: int, template: str) -> dict:
        from moto.server import ThreadedMotoServer

        import boto3
        from botocore.config import Config as BotoConfig

        a = self.a
        counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        counting = threading.Event()
        events: list[tuple[float, str, str]] = []

        class Count(logging.Handler):
            def emit(self, record):
                if not counting.is_set():
                    return
                try:
                    line = str(record.args[0]) if record.args else record.getMessage()
                except Exception:  # noqa: BLE001
                    return
                m = re.match(r'"?(\w+) /([^/?\s]+)/?(\S*)', line)
                if not m:
                    return
                method, bucket, rest = m.groups()
                if method == "GET" and ("list-type" in rest or rest.startswith("?") or rest == ""):
                    kind = "LIST"
                else:
                    kind = method
                counts[bucket][kind] += 1
                events.append((time.monotonic(), bucket, kind))

        wl = logging.getLogger("werkzeug")
        wl.setLevel(logging.INFO)
        wl.propagate = False
        wl.handlers[:] = [Count()]
        for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}.items():
            os.environ[k] = v
        for k in ("AWS_CA_BUNDLE", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
            os.environ.pop(k, None)
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        endpoint = f"http://127.0.0.1:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          config=BotoConfig(s3={"addressing_style": "path"}))
        names = tenant_names(n)
        # Side by side unless --tools leaves one out (a tool alone has the S3 server and the
        # cores to itself: its start-up is then not slowed by the other's requests).
        buckets = [(k, b) for k, b in (("ts-embedded", "ts-bucket"), ("litestream", "ls-bucket")) if k in a.tools]
        setups: dict[str, Setup] = {}
        out: dict = {"tenants": n}
        try:
            for kind, bucket in buckets:
                s3.create_bucket(Bucket=bucket)
                root = os.path.join(self.root, f"s3-n{n}", kind)
                shutil.rmtree(root, ignore_errors=True)
                if kind == "ts-embedded":
                    url = f"s3://{bucket}/r?endpoint={endpoint}&region=us-east-1&forcePathStyle=true"
                    setups[kind] = Embedded(root, names, template, a, replica_url=url)
                else:
                    setups[kind] = Litestream(root, names, template, a,
                                              s3={"bucket": bucket, "path": "r", "endpoint": endpoint})
            log(f"S3: {n} tenants each for tenantsync (embedded) and Litestream on moto {endpoint}; load {load()}")
            counting.set()
            starts = {k: s.start() for k, s in setups.items()}
            done: dict[str, float | None] = {k: None for k in setups}
            deadline = time.monotonic() + a.startup_timeout
            while time.monotonic() < deadline and any(v is None for v in done.values()):
                for kind, bucket in buckets:
                    if done[kind] is not None:
                        continue
                    seen = set()
                    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="r/"):
                        for obj in page.get("Contents", []):
                            parts = obj["Key"].split("/")
                            if len(parts) == 4 and parts[2] == "0000" and L0_NAME.match(parts[3]):
                                seen.add(parts[1])
                    if len(seen) >= n:
                        done[kind] = time.monotonic() - starts[kind]
                time.sleep(1.0)
            out["startup_seconds"] = done
            out["startup_requests"] = {b: dict(c) for b, c in counts.items()}
            log(f"  S3 startup: {done}; requests so far {out['startup_requests']}")
            log(f"  S3: idle {a.settle:.0f} s, then counting requests for {a.s3_window:.0f} s")
            time.sleep(a.settle)
            counts.clear()
            events.clear()
            load0 = load()
            t = time.monotonic()
            time.sleep(a.s3_window)
            window = time.monotonic() - t
            snap = {b: dict(c) for b, c in counts.items()}
            # Requests per 10 s of the window, to show when they happen (compaction boundaries).
            for kind, bucket in buckets:
                per = collections.Counter(int((at - t) // 10) * 10 for at, b, _k in list(events) if b == bucket)
                out.setdefault("per_10s", {})[kind] = [per.get(s, 0) for s in range(0, int(window), 10)]
            for kind, bucket in buckets:
                c = snap.get(bucket, {})
                total = sum(c.values())
                out[kind] = {"requests": c, "total": total, "window": window,
                             "per_tenant_hour": total / n / window * 3600, "alive": setups[kind].alive(),
                             "load_start": load0, "load": load()}
                log(f"  S3 idle {TOOL_LABEL[kind]}: {c} in {window:.0f} s = "
                    f"{out[kind]['per_tenant_hour']:.1f} requests per tenant per hour")
        finally:
            for s in setups.values():
                out.setdefault(s.kind, {})["errors"] = s.errors()
                s.stop()
                if not a.keep:
                    shutil.rmtree(s.root, ignore_errors=True)
            server.stop()
        return out

    # -- main ------------------------------------------------------------------------------

    def run(self) -> None:
        a = self.a
        kinds = [k for k in a.tools if k != "ts-redis" or a.mode in ("redis", "both")]
        kinds = [k for k in kinds if k != "ts-embedded" or a.mode in ("embedded", "both")]
        self.results["tools"] = kinds
        for n in a.tenants:
            if not ({"startup", "idle", "lag", "jobs"} & set(a.only)):
                break
            tdir = os.path.join(self.root, f"n{n}")
            os.makedirs(tdir, exist_ok=True)
            template = os.path.join(tdir, "template.db")
            make_template(template)
            self.results["runs"][str(n)] = runs = {}
            for kind in kinds:
                runs[kind] = self.run_tool(kind, n, template)
                self.save()
        if self.wanted("s3"):
            template = os.path.join(self.root, "s3-template.db")
            make_template(template)
            self.results["s3"] = self.s3_requests(a.s3_tenants, template)
        self.results["finished"] = time.time()
        self.save()

    def save(self) -> None:
        if self.a.json:
            with open(self.a.json, "w") as f:
                json.dump(self.results, f, indent=2, default=str)


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------

def fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def fmt_s(x) -> str:
    return "–" if x is None else f"{x:.2f} s"


def ld(x) -> str:
    """The 1-min load average recorded with a result."""
    return f" ⟨{x[0]:.1f}⟩" if x else ""


def ratio(a, b) -> str:
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}"


def report(results: dict) -> str:
    tools = results["tools"]
    lines = []
    for n, runs in results["runs"].items():
        lines.append(f"\n### N = {int(n):,} tenants\n")
        head = ["", *[TOOL_LABEL[k] for k in tools]]
        ratios = [k for k in tools if k in ("ts-embedded", "ts-redis")] if "litestream" in tools else []
        head += [f"{'emb' if k == 'ts-embedded' else 'redis'} / LS" for k in ratios]
        metrics_ratio = {"ts-embedded", "ts-embedded-nometrics"} <= set(tools)
        head += ["metrics on / off"] if metrics_ratio else []
        sealed_ratio = {"ts-embedded", "ts-embedded-encrypted"} <= set(tools)
        head += ["encrypted / plain"] if sealed_ratio else []
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))

        def row(label, getter, cell, better_ratio=True):
            vals = {k: getter(runs.get(k, {})) for k in tools}
            cells = [cell(runs.get(k, {}), vals[k]) for k in tools]
            rs = [ratio(vals[k], vals.get("litestream")) for k in ratios]
            if metrics_ratio:
                rs.append(ratio(vals["ts-embedded"], vals["ts-embedded-nometrics"]))
            if sealed_ratio:
                rs.append(ratio(vals["ts-embedded-encrypted"], vals["ts-embedded"]))
            lines.append("| " + " | ".join([label, *cells, *rs]) + " |")

        def startup_cell(r, v):
            st = r.get("startup")
            if not st:
                return r.get("failure", "–")
            if v is not None:
                return f"{v:.2f} s{ld(st.get('load'))}"
            why = "crashed" if st.get("crashed") else f"timeout {st.get('timeout', 0):.0f} s"
            return f"**{why}**: {st['replicated']:,}/{st['tenants']:,} replicated{ld(st.get('load'))}"

        row("1. time until all replicated", lambda r: (r.get("startup") or {}).get("seconds"), startup_cell)
        row("   … 90 % replicated", lambda r: (r.get("startup") or {}).get("t90"),
            lambda r, v: fmt_s(v))
        row("2. idle CPU (% of a core, 30 s)", lambda r: (r.get("idle") or {}).get("cpu_pct"),
            lambda r, v: "–" if v is None else f"{v:.1f} %{ld(r['idle'].get('load_start'))}")
        row("   idle RSS", lambda r: (r.get("idle") or {}).get("rss"),
            lambda r, v: "–" if v is None else f"{v / 2**20:.0f} MiB")
        row("   idle open fds", lambda r: (r.get("idle") or {}).get("fds"),
            lambda r, v: "–" if v is None else f"{v:,}")
        row("   idle threads / processes", lambda r: (r.get("idle") or {}).get("threads"),
            lambda r, v: "–" if v is None else f"{v:,} / {r['idle']['procs']}")
        row("3. lag p50", lambda r: (r.get("lag") or {}).get("p50"),
            lambda r, v: "–" if v is None else f"{v:.2f} s{ld(r['lag'].get('load_start'))}")
        row("   lag p99", lambda r: (r.get("lag") or {}).get("p99"),
            lambda r, v: "**unseen** (> drain)" if (r.get("lag") or {}).get("p99_unseen") else fmt_s(v))
        row("   lag max / missing", lambda r: (r.get("lag") or {}).get("max"),
            lambda r, v: "–" if v is None else f"{v:.2f} s / {r['lag']['missing']}"
            + (f" (+{r['lag']['unwatched']} to unreplicated tenants)" if r['lag'].get('unwatched') else ""))
        row("   CPU while writing", lambda r: (r.get("lag") or {}).get("cpu_pct"),
            lambda r, v: "–" if v is None else f"{v:.0f} %")
        row("5. sync jobs/s (one write per tenant)", lambda r: (r.get("jobs") or {}).get("jobs_per_s"),
            lambda r, v: "–" if v is None else
            f"{r['jobs'].get('jobs_per_s_restart', v):.0f}/s ({r['jobs']['done']:,} in {r['jobs']['last_after_start']:.1f} s "
            f"from restart){ld(r['jobs'].get('load_start'))}")
    s3 = results.get("s3")
    if s3:
        n = s3["tenants"]
        lines.append(f"\n### Idle object-storage requests (S3 on moto, {n} tenants each, "
                     f"{s3.get('ts-embedded', {}).get('window', 0):.0f} s window)\n")
        lines.append("| | tenantsync embedded | Litestream | ts / LS |")
        lines.append("|---|---|---|---|")
        t, l_ = s3.get("ts-embedded", {}), s3.get("litestream", {})
        lines.append(f"| 4. requests per idle tenant per hour | {fmt(t.get('per_tenant_hour'), '.1f')}"
                     f"{ld(t.get('load_start'))} | {fmt(l_.get('per_tenant_hour'), '.1f')} | "
                     f"{ratio(t.get('per_tenant_hour'), l_.get('per_tenant_hour'))} |")
        lines.append(f"|    requests in the window, by kind | {t.get('requests')} | {l_.get('requests')} | |")
        per = s3.get("per_10s") or {}
        lines.append(f"|    requests per 10 s through the window | {per.get('ts-embedded')} | {per.get('litestream')} | |")
        lines.append(f"|    time until all replicated (S3) | {fmt_s((s3.get('startup_seconds') or {}).get('ts-embedded'))}"
                     f" | {fmt_s((s3.get('startup_seconds') or {}).get('litestream'))} | |")
    g = results.get("git") or {}
    lines.append(f"\n⟨x⟩ = 1-minute load average when the measurement started (2-core machine). "
                 f"Code: {g.get('head')}{' + uncommitted: ' + g['dirty'].replace(chr(10), ', ') if g.get('dirty') else ''}; "
                 f"RLIMIT_NOFILE {results.get('nofile')}.")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_writer":
        return writer_main(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "_touch":
        return touch_main(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tenants", default=None, help="N, or a comma list (default 1000,10000; --quick: 200)")
    p.add_argument("--mode", choices=["embedded", "redis", "both"], default="both", help="tenantsync mode(s)")
    p.add_argument("--quick", action="store_true", help="N=200 and short windows, for debugging")
    p.add_argument("--tools", default=",".join(TOOLS), help=f"subset of {','.join(TOOLS)}")
    p.add_argument("--only", default="startup,idle,lag,jobs,s3", help="subset of startup,idle,lag,jobs,s3")
    p.add_argument("--startup-timeout", type=float, default=None, help="default 120 s (--quick 60)")
    p.add_argument("--settle", type=float, default=None, help="idle seconds before idle measurements (60)")
    p.add_argument("--idle-window", type=float, default=None, help="CPU window (30 s)")
    p.add_argument("--rate", type=float, default=200, help="writes/s in the lag test")
    p.add_argument("--lag-seconds", type=float, default=None, help="lag test length (30 s)")
    p.add_argument("--drain", type=float, default=15, help="seconds to wait for the last commits")
    p.add_argument("--jobs-timeout", type=float, default=120)
    p.add_argument("--always", action="store_true", help="run lag and jobs even if start-up did not finish")
    p.add_argument("--s3-tenants", type=int, default=None, help="tenants per tool on S3 (200; --quick 50)")
    p.add_argument("--s3-window", type=float, default=None, help="S3 counting window (60 s)")
    p.add_argument("--worker-threads", type=int, default=4, help="-c of each host-queue worker (Redis mode)")
    p.add_argument("--sync-threads", type=int, default=None, help="config `sync-threads`: sync threads per process "
                   "(embedded; default: the config's default)")
    p.add_argument("--storage-on-host-workers", action="store_true",
                   help="Redis mode: no storage worker; the host-queue workers run storage jobs too (--storage)")
    p.add_argument("--worker-command", choices=["module", "celery"], default="module",
                   help="Redis mode: start workers with python -m workers (README) or celery -A workers worker")
    p.add_argument("--watch-in-worker", action="store_true",
                   help="Redis mode: no watcher process; the first worker runs it (python -m workers --watch)")
    p.add_argument("--host-workers", type=int, default=2,
                   help="host-queue worker processes (Redis mode; config host-workers)")
    p.add_argument("--nofile", type=int, default=None,
                   help="RLIMIT_NOFILE for the tools (default: inherited; this machine's hard limit is "
                        f"{resource.getrlimit(resource.RLIMIT_NOFILE)[1]})")
    p.add_argument("--max-load", type=float, default=2.0, help="wait for a 1-min load below this …")
    p.add_argument("--max-wait", type=float, default=20, help="… for at most this many seconds")
    p.add_argument("--profile", metavar="DIR", help="py-spy (raw stacks) of tenantsync during the lag test")
    p.add_argument("--workdir")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", help="write the raw results here (updated after every tool)")
    p.add_argument("--report", metavar="JSON", help="only print the table of an earlier --json file")
    a = p.parse_args()
    import installed  # bench/installed.py
    installed.compile_sources()  # tenantsync's bytecode, as pip would have left it
    if a.report:
        with open(a.report) as f:
            print(report(json.load(f)))
        return
    q = a.quick
    a.tenants = [int(x) for x in (a.tenants or ("200" if q else "1000,10000")).split(",")]
    a.tools = [t for t in a.tools.split(",") if t]
    a.only = set(a.only.split(","))
    a.startup_timeout = a.startup_timeout or (60 if q else 120)
    a.settle = a.settle if a.settle is not None else (15 if q else 60)
    a.idle_window = a.idle_window or (10 if q else 30)
    a.lag_seconds = a.lag_seconds or (10 if q else 30)
    a.s3_tenants = a.s3_tenants or (50 if q else 200)
    a.s3_window = a.s3_window or (20 if q else 60)
    bench = Bench(a)
    t = time.monotonic()
    try:
        bench.run()
    finally:
        print(report(bench.results))
        print(f"\n(total {time.monotonic() - t:.0f} s; load at the end {load()})")
        if not a.keep and not a.workdir:
            shutil.rmtree(bench.root, ignore_errors=True)


if __name__ == "__main__":
    main()
