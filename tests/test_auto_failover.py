"""Automatic failover with real processes: two `tenantsync watch` hosts sharing one catalogue.

Hosts ``a`` and ``b`` on one machine, each with its own data directory, one catalogue file
and one replica root, a 2-s lease TTL and ``failover-after: 4s``. Host b replicates an active
tenant and an idle one and is killed whole (SIGKILL of its process group). Host a, seeing
b's heartbeat go stale, hydrates the active tenant by itself (nobody calls `hydrate`) to
exactly what b had shipped, and replicates it on; the idle one stays b's, for a hydration on
demand. Host b, started again, finds its old copy is host a's tenant now: fenced where it
is, nothing of it uploaded.
"""

from __future__ import annotations

import json
import time

from tenantsync.catalogue import TenantState, open_catalogue
from tenantsync.config import load as load_config
from tenantsync.replica import Replica
from tenantsync.storage import open_storage

from .dbutil import app_db, dump, wait_for, write_rows
from .test_fleet_celery import child_env, children, watcher_args  # noqa: F401 - fixture


def host_config(tmp_path, name: str) -> str:
    root = tmp_path / name
    (root / "data").mkdir(parents=True)
    raw = {"replica": (tmp_path / "replica").as_uri(), "catalogue": f"sqlite:///{tmp_path}/catalogue.db",
           "globs": [f"{root}/data/*.db"], "host": name, "lease-ttl": "2s", "failover-after": "4s",
           "idle-after": "60s"}
    path = root / "tenantsync.yml"
    path.write_text(json.dumps(raw))
    return str(path)


def test_a_dead_hosts_active_tenants_are_hydrated_on_a_live_host_without_being_asked(tmp_path, children):
    config_a, config_b = host_config(tmp_path, "a"), host_config(tmp_path, "b")
    path_b = str(tmp_path / "b" / "data" / "busy.db")
    for name, rows in (("busy.db", 50), ("quiet.db", 5)):
        conn = app_db(str(tmp_path / "b" / "data" / name))
        write_rows(conn, rows)
        conn.close()
    host_b = children("b", watcher_args(config_b), child_env(config_b))
    host_a = children("a", watcher_args(config_a), child_env(config_a))
    catalogue = open_catalogue(load_config(config_a, env={}))

    def shipped(name: str) -> bool:
        row = catalogue.get(name)
        return row is not None and row.txid > 0 and row.pending_since is None

    assert wait_for(lambda: shipped("busy.db") and shipped("quiet.db") or not host_b.alive(), 30), host_b.tail()
    catalogue.transition("quiet.db", TenantState.idle)  # as an idle release leaves it
    assert wait_for(lambda: set(catalogue.hosts_seen()) == {"a", "b"}, 15)
    conn = app_db(path_b)
    write_rows(conn, 3)  # the application goes on; acknowledged once shipped
    conn.close()
    first = catalogue.get("busy.db").txid
    assert wait_for(lambda: catalogue.get("busy.db").txid > first and shipped("busy.db"), 30), host_b.tail()
    acknowledged, shipped_txid = dump(path_b), catalogue.get("busy.db").txid

    host_b.kill()
    killed = time.monotonic()
    path_a = str(tmp_path / "a" / "data" / "busy.db")
    assert wait_for(lambda: catalogue.get("busy.db").host == "a" and catalogue.get("busy.db").state
                    == TenantState.active, 60), host_a.tail()
    took = time.monotonic() - killed
    assert dump(path_a) == acknowledged and catalogue.get("busy.db").path == path_a
    assert catalogue.get("quiet.db").host == "b"  # idle: hydrated on demand, not moved
    assert took < 4 + 30, took

    conn = app_db(path_a)
    write_rows(conn, 2)  # host a's application writes on; host a ships it
    conn.close()
    assert wait_for(lambda: catalogue.get("busy.db").txid > shipped_txid and shipped("busy.db"), 30), host_a.tail()
    moved_to = catalogue.get("busy.db").txid

    host_b.start()  # back: its old copy is host a's tenant now
    assert wait_for(lambda: [c.name for c in catalogue.fenced("b")] == ["busy.db"], 30), host_b.tail()
    assert dump(path_b) == acknowledged  # kept where it is
    replica = Replica(open_storage((tmp_path / "replica").as_uri()).child("busy.db"))
    assert replica.max_txid() == moved_to and catalogue.get("busy.db").host == "a"
