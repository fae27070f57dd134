"""Host failover with real processes: two hosts on one machine, one SeaweedFS store.

Hosts ``a`` and ``b`` each run ``tenantsync serve`` (the embedded fleet and its HTTP API)
with a data directory and a SQLite catalogue of their own, the same replica root on
SeaweedFS (atomic conditional writes) and a 2-s lease TTL. Host a replicates five tenants,
one of them 1 MB, and is killed whole (SIGKILL of its process group) after its catalogue
says every commit is shipped. Host b's API is asked to hydrate the 1 MB tenant until it
answers: refused while host a's lease is live, then answered with exactly what host a had
shipped. Host b's application writes on. Host a is started again and its application
writes its stale copy: host a must fence that tenant (its files aside with those commits,
nothing uploaded, `tenantsync tenants` says fenced) while it replicates its other tenants as before, and Litestream must restore the
fenced tenant's replica to host b's database. The time from the kill to host b's answer is
a benchmark figure (bench/failover.py), not asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tenantsync.catalogue import open_catalogue
from tenantsync.config import load as load_config

from .dbutil import app_db, dump, wait_for, write_rows
from .peer import litestream
from .test_fleet_celery import child_env, children, free_port  # noqa: F401 - fixture
from .test_ondemand_celery import call, serve_args

TENANTS = [f"t{i}.db" for i in range(5)]
BIG = TENANTS[0]


def host_config(tmp_path, name: str, replica: str) -> str:
    root = tmp_path / name
    (root / "data").mkdir(parents=True)
    raw = {"replica": replica, "catalogue": f"sqlite:///{root}/catalogue.db", "globs": [f"{root}/data/*.db"],
           "host": name, "lease-ttl": "2s", "idle-after": "1s"}
    path = root / "tenantsync.yml"
    path.write_text(json.dumps(raw))
    return str(path)


def data_path(tmp_path, host: str, name: str) -> str:
    return str(tmp_path / host / "data" / name)


def shipped_everything(catalogue) -> bool:
    records = {r.name: r for r in catalogue.records()}
    return all(n in records and records[n].txid > 0 and records[n].pending_since is None for n in TENANTS)


def start_serving(spawn, name: str, config: str):
    port = free_port()
    child = spawn(name, serve_args(config, port), child_env(config) | {
        "TENANTSYNC_API_TOKEN": os.environ["TENANTSYNC_API_TOKEN"]})
    base = f"http://127.0.0.1:{port}"
    assert wait_for(lambda: call(base + "/healthz", timeout=2)[0] == 200 or not child.alive(), 30), child.tail()
    return child, base


def test_a_dead_hosts_tenant_fails_over_and_the_host_coming_back_is_fenced(tmp_path, seaweed_url, children):
    config_a, config_b = (host_config(tmp_path, h, seaweed_url) for h in ("a", "b"))
    for name in TENANTS:
        conn = app_db(data_path(tmp_path, "a", name))
        write_rows(conn, 400 if name == BIG else 10, 2500 if name == BIG else 100)  # t0: ~1 MB
        conn.close()
    host_a, _ = start_serving(children, "a", config_a)
    catalogue_a = open_catalogue(load_config(config_a, env={}))
    assert wait_for(lambda: shipped_everything(catalogue_a) or not host_a.alive(), 60), host_a.tail()
    first = catalogue_a.get(BIG).txid
    conn = app_db(data_path(tmp_path, "a", BIG))  # the application goes on writing on host a
    write_rows(conn, 5)
    conn.close()
    # Acknowledged: shipped by a pass after that write (a TXID past the first, nothing pending).
    assert wait_for(lambda: (catalogue_a.get(BIG).txid > first and shipped_everything(catalogue_a))
                    or not host_a.alive(), 60), host_a.tail()
    acknowledged = dump(data_path(tmp_path, "a", BIG))
    shipped_txid = catalogue_a.get(BIG).txid

    host_b, base_b = start_serving(children, "b", config_b)
    host_a.kill()  # the whole host: every process of it, at once

    answers = []

    def hydrated() -> bool:
        status, body = call(f"{base_b}/tenants/{BIG}/hydrate", method="POST", body={}, timeout=30)
        answers.append((status, body.get("error") or body.get("path")))
        return status == 200

    assert wait_for(hydrated, 30, 0.1), answers[-3:]
    refused = [a for a in answers if a[0] != 200]
    assert all(status == 409 and "lease" in str(error) for status, error in refused), refused
    path_b = data_path(tmp_path, "b", BIG)
    assert dump(path_b) == acknowledged  # every commit host a had shipped, nothing else
    catalogue_b = open_catalogue(load_config(config_b, env={}))
    assert catalogue_b.get(BIG).txid == shipped_txid

    conn = app_db(path_b)  # the application now runs against host b
    write_rows(conn, 6)
    conn.close()
    assert wait_for(lambda: (r := catalogue_b.get(BIG)).txid > shipped_txid and r.pending_since is None, 30), \
        host_b.tail()
    moved_on = dump(path_b)

    host_a.start()  # host a comes back, and its application with it, writing its stale copy
    conn = app_db(data_path(tmp_path, "a", BIG))
    write_rows(conn, 2)
    conn.close()
    stale = dump(data_path(tmp_path, "a", BIG))
    assert wait_for(lambda: catalogue_a.fenced("a") or not host_a.alive(), 60), host_a.tail()
    (copy,) = catalogue_a.fenced("a")
    assert copy.name == BIG and not os.path.exists(data_path(tmp_path, "a", BIG))
    assert dump(copy.aside) == stale  # kept, with the commits the replica never got
    conn = app_db(data_path(tmp_path, "a", "t1.db"))  # its other tenants replicate on
    write_rows(conn, 3)
    conn.close()
    before = catalogue_a.get("t1.db").txid
    assert wait_for(lambda: catalogue_a.get("t1.db").txid > before, 30), host_a.tail()

    base, _, query = seaweed_url.partition("?")
    out = tmp_path / "litestream.db"
    litestream("restore", "-o", str(out), f"{base}/{BIG}?{query}")
    assert dump(str(out)) == moved_on  # host b's database, not a byte of host a's stale copy
    listed = subprocess.run([sys.executable, "-m", "tenantsync", "tenants", "--config", config_a, "--state", "fenced"],
                            capture_output=True, text=True, env=child_env(config_a), check=True).stdout
    assert BIG in listed and "fenced" in listed, listed
    for child in (host_a, host_b):
        assert "Traceback" not in child.log(), child.tail()
