"""Two hosts, one replica: the lease keeps every tenant's replica to one writer.

Two real ``tenantsync watch GLOB --replica URL`` processes run as two hosts
(``TENANTSYNC_HOST=hostA`` / ``hostB``, each with its own SQLite catalogue, lease TTL 3 s)
on the same glob of ten tenant databases and the same replica root, while the test
commits to the tenants at random (a few hot tenants at a time, so others go idle and
are released). Each round, at a random moment, one of:

- kill: SIGKILL a watcher, start it again;
- pause: SIGSTOP a watcher for longer than the TTL (sometimes killing and restarting the
  other one meanwhile), then SIGCONT;
- pause-mid-sync: the same, the instant the watcher holding more leases logs a lease
  acquire or renew (a sync job between its lease check and its upload);
- restart: SIGTERM a watcher (a deploy: it ships, checkpoints and releases every tenant
  it has open, then exits) while the other is briefly frozen with unshipped commits,
  and start it again;
- pause-both: SIGSTOP a watcher past the TTL and its release sweep (RELEASE_EVERY), and
  SIGCONT it while the other is briefly frozen with unshipped commits.

(restart and pause-both pick the host holding fewer leases: it has tenants open whose
commits it must not ship.) Then every tenant must catch up, and for every tenant:

1. the L0 TXIDs are exactly 1..N, one TXID per file (no gap, no duplicate);
2. the database at *every* TXID passes ``integrity_check`` and holds the application's
   state after some prefix of its transactions, the prefix never shrinking as the TXID
   grows: no commit lost, reordered or applied twice anywhere in the chain. Every file's
   checksum is verified; ``tenantsync.restore.restore`` itself runs at a sample of TXIDs
   (first, last, full-page, flagged, every 16th; every 40th on S3) and must agree;
3. the latest TXID equals the source database;
4. every L0 file landed while its writer's host held the tenant's lease (see below);
5. a full-page L0 file (what a writer ships when it cannot prove continuity with the
   replica's last file) is never written by the process that wrote the file before it,
   unless another host held the lease in between;
6. no watcher died on its own, exited non-zero on SIGTERM or logged a traceback.

Writer identity. LTX headers have a ``node_id`` field but tenantsync writes 0 there, so a
file does not say who wrote it. Without changing tenantsync the test learns it from the
writers: each watcher runs with a ``sitecustomize`` (on PYTHONPATH; it only observes) that
appends every successful ``Replica.write`` and ``Leaser.acquire``/``renew``/``release`` to
a file of its own. So every L0 file maps to the process that created it, and every lease
version to its writer, with its exact ``expires_at`` (so its write time: expires - ttl).
A process SIGKILLed between a write and its log line leaves an unowned file or lease
version: accepted only when that host was killed within a second of it. A thread also
polls every ``lock.json``; every version it sees must be in some writer's log.

A file's landing time is its ctime on file:// (set when it is linked into place; the
mtime is the LTX timestamp) and on S3 its log line's time or LastModified + 1 s,
whichever is earlier. One exception: a sync job's file *built* (LTX timestamp) before a
SIGSTOP of its writer, after its lease check, that landed within a second of the SIGCONT
was in flight across the pause: that is the limit lease.py states (a pause longer than
the margin between the check and the write landing), which only fencing in the store
could close. It is reported, and fails only with TENANTSYNC_LEASE_STRICT=1. A file built
*after* the SIGCONT on an expired lease fails: a check right before the upload stops it.

Knobs (environment): TENANTSYNC_LEASE_ROUNDS (default 4 on file://, 3 on S3),
TENANTSYNC_LEASE_SEED (repeats the random choices, not the timing),
TENANTSYNC_LEASE_RESTORE_EVERY, TENANTSYNC_LEASE_STRICT. Each run leaves report.txt
(problems, events, every tenant's lease history) beside the watchers' logs in tmp_path.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
from bisect import bisect_right
from dataclasses import dataclass, field

import pytest

from tenantsync.process import RELEASE_EVERY
from tenantsync.errors import ObjectNotFound, RestoreError, StorageError
from tenantsync.layout import LEASE_KEY
from tenantsync.lease import decode_lease
from tenantsync.ltx import lock_pgno, read_page_index
from tenantsync.replica import Replica
from tenantsync.restore import restore
from tenantsync.storage import open_storage

TENANTS = 10
TTL = 3.0
IDLE_AFTER = 2.0
# Chaos rounds per backend: one pause-both, then restart, pause-mid-sync, kill, pause, ...
DEFAULT_ROUNDS = {"file": 4, "seaweed": 3}
ROUNDS = int(os.environ.get("TENANTSYNC_LEASE_ROUNDS", "0"))  # 0: DEFAULT_ROUNDS
# tenantsync.restore.restore runs at every TXID that is a multiple of this (and wherever
# something happens); every TXID is checked by an incremental apply regardless.
RESTORE_EVERY = int(os.environ.get("TENANTSYNC_LEASE_RESTORE_EVERY", "0"))  # 0: 16 on file://, 40 on S3
# Also fail on writes that were in flight across a SIGSTOP longer than the lease (the
# lease's documented limit: a holder paused between its check and its write).
STRICT = os.environ.get("TENANTSYNC_LEASE_STRICT") == "1"
SEED = int(os.environ.get("TENANTSYNC_LEASE_SEED", str(random.randrange(1 << 30))))
SETTLE_TIMEOUT = 45.0
# Slack for comparing clocks read by different processes on this machine (ctime is
# jiffy-granular and lags the real time by up to one tick).
CLOCK_SLACK = 0.05
JIFFY = 0.01  # the most a file's ctime lags the wall clock

# Runs first in every watcher (PYTHONPATH) and only observes: every successful
# Replica.write and Leaser.acquire/renew/release is appended to a file of the process's
# own, with the wall time it returned and the time it was called.
SITECUSTOMIZE = '''\
import os
_path = os.environ.get("TENANTSYNC_TEST_WRITE_LOG")
if _path:
    import threading
    import time

    from tenantsync import lease as _lease, replica as _replica

    _out = open(_path, "a", buffering=1)
    _lock = threading.Lock()

    def _note(line):
        with _lock:
            _out.write("%.6f %s\\n" % (time.time(), line))
            _out.flush()

    def _observe(cls, op):
        original = getattr(cls, op)

        def observed(self, *args, **kwargs):
            called = time.time()
            result = original(self, *args, **kwargs)
            if cls is _replica.Replica:
                level = args[0] if args else kwargs["level"]
                header = args[1] if len(args) > 1 else kwargs["header"]
                _note("wrote %s level %d %d %d %.6f" % (self.storage, level, header.min_txid, header.max_txid,
                                                        called))
            elif op != "release":
                _note("lease %s %s g%d %s %.6f %.6f" % (self.storage, op, result.generation, result.owner,
                                                        result.expires_at.timestamp(), called))
            elif result:
                held = args[0] if args else kwargs["lease"]
                _note("lease %s release g%d %s - %.6f" % (self.storage, held.generation, held.owner, called))
            return result

        setattr(cls, op, observed)

    _observe(_replica.Replica, "write")
    for _op in ("acquire", "renew", "release"):
        _observe(_lease.Leaser, _op)
'''

CONFIG = f"""\
lease-ttl: {TTL}s
idle-after: {IDLE_AFTER}s
debounce: 50ms
rescan-interval: 60s
# Compaction, snapshots and retention out of the way: only L0 files, all kept.
levels:
  - level: 1
    interval: 24h
snapshot:
  interval: 24h
  retention: 24h
l0-retention: 24h
"""

WROTE = re.compile(r"^(?P<t>\d+\.\d+) wrote (?P<url>\S+) level (?P<level>\d+) (?P<min>\d+) (?P<max>\d+) "
                   r"(?P<called>\d+\.\d+)$")
LEASED = re.compile(r"^(?P<t>\d+\.\d+) lease (?P<url>\S+) (?P<op>acquire|renew|release) g(?P<gen>\d+) "
                    r"(?P<owner>\S+) (?P<expires>[-\d.]+) (?P<called>\d+\.\d+)$")


# -- the application: deterministic transactions, replayable into a model ------------------


SCHEMA = [
    "CREATE TABLE t(id INTEGER PRIMARY KEY, txn INTEGER NOT NULL, v BLOB NOT NULL)",
    "CREATE TABLE meta(k INTEGER PRIMARY KEY, n INTEGER NOT NULL)",
    "INSERT INTO meta(k, n) VALUES (0, 0)",
]


@dataclass(frozen=True)
class Txn:
    rows: int
    size: int
    delete: int | None  # delete the rows transaction ``delete`` inserted


def payload(name: str, j: int, i: int, size: int) -> bytes:
    seed = hashlib.blake2b(f"{name}:{j}:{i}".encode(), digest_size=32).digest()
    return (seed * (size // 32 + 1))[:size]


def apply_txn(conn: sqlite3.Connection, name: str, j: int, txn: Txn) -> None:
    conn.executemany("INSERT INTO t(txn, v) VALUES (?, ?)",
                     [(j, payload(name, j, i, txn.size)) for i in range(txn.rows)])
    if txn.delete is not None:
        conn.execute("DELETE FROM t WHERE txn = ?", (txn.delete,))
    conn.execute("UPDATE meta SET n = ? WHERE k = 0", (j,))


def open_ro(path: str) -> sqlite3.Connection:
    return sqlite3.connect("file:" + urllib.parse.quote(path) + "?mode=ro", uri=True)


class App:
    """The tenants' application: one connection per tenant, every transaction recorded.

    Transaction 0 creates the schema and a few hundred rows, so that a database has
    enough pages that an ordinary commit never rewrites all of them (a file holding
    every page is then certainly a full-page L0)."""

    def __init__(self, data_dir, rng: random.Random):
        self.rng = rng
        self.paths: dict[str, str] = {}
        self.conns: dict[str, sqlite3.Connection] = {}
        self.history: dict[str, list[Txn]] = {}
        self.blocked: list[tuple[str, float]] = []  # (tenant, seconds) commits that waited > 1 s
        self.error: BaseException | None = None
        for i in range(TENANTS):
            name = f"tenant{i:02d}.db"
            path = str(data_dir / name)
            # A long busy timeout: a SIGSTOPped watcher may hold the write lock (its
            # checkpoint barrier) for the whole pause; the application then waits.
            conn = sqlite3.connect(path, isolation_level=None, timeout=60, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN")
            for sql in SCHEMA:
                conn.execute(sql)
            first = Txn(rows=400, size=200, delete=None)
            apply_txn(conn, name, 0, first)
            conn.execute("COMMIT")
            self.paths[name], self.conns[name], self.history[name] = path, conn, [first]

    def next_txn(self, name: str) -> Txn:
        j = len(self.history[name])
        r = self.rng.random()
        if r < 0.65:
            return Txn(self.rng.randint(1, 3), self.rng.randint(50, 400), None)
        if r < 0.9:
            return Txn(self.rng.randint(10, 40), self.rng.randint(300, 1200), None)
        return Txn(self.rng.randint(1, 5), 200, self.rng.randrange(1, j) if j > 1 else None)

    def commit(self, name: str, txn: Txn | None = None) -> None:
        txn = txn or self.next_txn(name)
        conn = self.conns[name]
        started = time.monotonic()
        conn.execute("BEGIN IMMEDIATE")
        apply_txn(conn, name, len(self.history[name]), txn)
        conn.execute("COMMIT")
        self.history[name].append(txn)
        waited = time.monotonic() - started
        if waited > 1.0:
            self.blocked.append((name, waited))

    def run(self, stop: threading.Event) -> None:
        """Commit at random, in bursts: a few hot tenants at a time, so that the others
        go idle (and are released by the watchers) and come back."""
        try:
            self._run(stop)
        except BaseException as e:  # the test fails on it
            self.error = e
            raise

    def _run(self, stop: threading.Event) -> None:
        names = sorted(self.paths)
        hot, switch = [], 0.0
        while not stop.is_set():
            if time.monotonic() > switch:
                hot = self.rng.sample(names, 3)
                switch = time.monotonic() + self.rng.uniform(1.0, 4.0)
            name = self.rng.choice(hot) if self.rng.random() < 0.85 else self.rng.choice(names)
            self.commit(name)
            stop.wait(self.rng.uniform(0.005, 0.04))

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()


class Model:
    """The expected state after each transaction prefix, replayed in memory, compared
    with a database file inside SQLite (ATTACH and EXCEPT both ways)."""

    def __init__(self, name: str, history: list[Txn]):
        self.name, self.history = name, history
        self.conn = sqlite3.connect("file::memory:", uri=True, isolation_level=None)
        for sql in SCHEMA:
            self.conn.execute(sql)
        self.n = 0
        self._apply(0)

    def _apply(self, j: int) -> None:
        self.conn.execute("BEGIN")
        apply_txn(self.conn, self.name, j, self.history[j])
        self.conn.execute("COMMIT")

    SUMMARY = "SELECT count(*), total(id), total(txn), total(length(v)), max(id) FROM {}.t"
    DIFF = ("SELECT (SELECT count(*) FROM (SELECT id, txn, v FROM main.t EXCEPT SELECT id, txn, v FROM r.t))"
            " + (SELECT count(*) FROM (SELECT id, txn, v FROM r.t EXCEPT SELECT id, txn, v FROM main.t))")

    def compare(self, path: str, immutable: bool = True, full: bool = True) -> tuple[int, str | None]:
        """(transaction the file holds, None if it holds exactly the rows of transactions
        0..that one, else what is wrong). The model only moves forward. Not ``full``: the
        rows' count and sums of ids, transaction numbers and lengths are compared instead
        of every byte (a commit lost, doubled or out of order changes them)."""
        query = "immutable=1" if immutable else "mode=ro"
        self.conn.execute("ATTACH DATABASE ? AS r", ("file:" + urllib.parse.quote(path) + "?" + query,))
        try:
            (n,) = self.conn.execute("SELECT n FROM r.meta WHERE k = 0").fetchone()
            if n < self.n:
                return n, f"holds transaction {n}, an earlier TXID held {self.n}"
            if n >= len(self.history):
                return n, f"holds transaction {n}, never committed"
            while self.n < n:
                self.n += 1
                self._apply(self.n)
            if not full:
                have, want = (self.conn.execute(self.SUMMARY.format(db)).fetchone() for db in ("r", "main"))
                return n, None if have == want else f"has rows {have}, transactions 0..{n} make {want}"
            (diff,) = self.conn.execute(self.DIFF).fetchone()
            return n, None if diff == 0 else f"{diff} rows differ from those of transactions 0..{n}"
        finally:
            self.conn.execute("DETACH DATABASE r")


# -- the watchers ----------------------------------------------------------------------------


def tenantsync_binary() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "tenantsync")
    found = beside if os.access(beside, os.X_OK) else shutil.which("tenantsync")
    if found is None:
        pytest.fail("no tenantsync console script: pip install -e '.[test]'", pytrace=False)
    return found


@dataclass
class Instance:
    """One process of one host, from start to SIGKILL or SIGTERM."""

    host: str
    index: int
    proc: subprocess.Popen
    write_log: str
    stdout: str
    stderr: str
    started: float
    ended: float | None = None
    killed: bool = False
    died_on_its_own: int | None = None  # exit status, if it exited before we stopped it
    pauses: list = field(default_factory=list)  # [SIGSTOP time, SIGCONT time (None: never resumed)]

    @property
    def label(self) -> str:
        return f"{self.host}#{self.index}(pid {self.proc.pid})"

    def tail(self, lines: int = 4) -> str:
        """The last lines of its stderr, without alembic's chatter."""
        with open(self.stderr, errors="replace") as f:
            keep = [line.rstrip() for line in f if "alembic" not in line]
        return "\n".join("    " + line for line in keep[-lines:])

    def synced(self) -> set[tuple[str, int]]:
        """(tenant, txid) of every L0 file a sync job of this process reported."""
        out = set()
        with open(self.stdout, errors="replace") as f:
            for line in f:
                m = re.match(r"synced (\S+) txid=([0-9a-f]{16}) ", line)
                if m:
                    out.add((m.group(1), int(m.group(2), 16)))
        return out


class Host:
    """A host's ``tenantsync watch``: started, killed, paused and resumed by PID."""

    def __init__(self, host: str, workdir, glob: str, url: str, config: str, site_dir: str, events: list):
        self.host, self.workdir, self.glob, self.url, self.config = host, workdir, glob, url, config
        self.site_dir = site_dir
        self.catalogue = f"sqlite:///{workdir}/catalogue-{host}.db"
        self.instances: list[Instance] = []
        self.events = events
        self.paused = False

    @property
    def current(self) -> Instance | None:
        inst = self.instances[-1] if self.instances else None
        return inst if inst is not None and inst.ended is None else None

    def start(self) -> Instance:
        assert self.current is None
        index = len(self.instances)
        base = f"{self.workdir}/{self.host}-{index}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTSYNC_")}
        env.update(
            TENANTSYNC_HOST=self.host,
            TENANTSYNC_TEST_WRITE_LOG=f"{base}.writes",
            PYTHONPATH=os.pathsep.join(filter(None, [self.site_dir, os.environ.get("PYTHONPATH")])),
            PYTHONUNBUFFERED="1",
        )
        args = [tenantsync_binary(), "-v", "watch", self.glob, "--replica", self.url,
                "--config", self.config, "--catalogue", self.catalogue]
        with open(f"{base}.out", "wb") as out, open(f"{base}.err", "wb") as err:
            # Its own session: signals aimed at pytest do not reach it; we signal it by PID.
            proc = subprocess.Popen(args, cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, start_new_session=True)
        inst = Instance(self.host, index, proc, f"{base}.writes", f"{base}.out", f"{base}.err", time.time())
        self.instances.append(inst)
        self.paused = False
        self.events.append((inst.started, "start", inst.label))
        return inst

    def check_alive(self) -> None:
        inst = self.current
        if inst is not None and inst.died_on_its_own is None and inst.proc.poll() is not None:
            inst.died_on_its_own = inst.proc.returncode
            inst.ended = time.time()
            self.events.append((inst.ended, f"DIED ({inst.proc.returncode})", inst.label))

    def kill(self) -> None:
        self.check_alive()
        inst = self.current
        if inst is None:
            return
        inst.proc.send_signal(signal.SIGKILL)
        inst.proc.wait()
        inst.ended, inst.killed, self.paused = time.time(), True, False
        self.events.append((inst.ended, "SIGKILL", inst.label))

    def pause(self, why: str = "") -> None:
        self.check_alive()
        if self.current is not None:
            self.current.proc.send_signal(signal.SIGSTOP)
            self.current.pauses.append([time.time(), None])
            self.paused = True
            self.events.append((time.time(), "SIGSTOP" + why, self.current.label))

    def pause_mid_sync(self, timeout: float = 3.0) -> bool:
        """SIGSTOP as soon as the watcher logs a lease acquire or renew: a sync job has just
        passed its lease check and is about to read the WAL and upload. False (and no
        pause) if none comes within ``timeout``."""
        inst = self.current
        if inst is None:
            return False
        with open(inst.write_log, "a+") as f:
            f.seek(0, os.SEEK_END)
            deadline = time.monotonic() + timeout
            buffered = ""
            while time.monotonic() < deadline:
                buffered += f.read()
                if re.search(r" lease \S+ (acquire|renew) ", buffered):
                    self.pause(" (just after a lease check)")
                    return True
                buffered = buffered[buffered.rfind("\n") + 1:]
                time.sleep(0.001)
        return False

    def resume(self) -> None:
        if self.current is not None and self.paused:
            self.current.proc.send_signal(signal.SIGCONT)
            self.current.pauses[-1][1] = time.time()
            self.paused = False
            self.events.append((time.time(), "SIGCONT", self.current.label))

    def terminate(self, timeout: float = 60.0) -> int | None:
        """SIGTERM: the watcher ships and releases everything, then exits."""
        self.resume()
        self.check_alive()
        inst = self.current
        if inst is None:
            return None
        inst.proc.send_signal(signal.SIGTERM)
        try:
            code = inst.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            inst.proc.kill()
            code = inst.proc.wait()
            self.events.append((time.time(), "did not stop on SIGTERM; SIGKILL", inst.label))
        inst.ended = time.time()
        self.events.append((inst.ended, f"SIGTERM -> exit {code}", inst.label))
        return code

    def cleanup(self) -> None:
        for inst in self.instances:
            if inst.proc.poll() is None:
                try:
                    inst.proc.send_signal(signal.SIGCONT)
                    inst.proc.kill()
                except ProcessLookupError:
                    pass
                inst.proc.wait()


# -- the lease history -------------------------------------------------------------------------


@dataclass(frozen=True)
class Version:
    """One version of a tenant's lock.json, as its writer logged it or the poller saw it."""

    seen: float  # when it was logged (after the write returned) or first seen by the poller
    generation: int
    owner: str
    expires: float | None  # expires_at as a wall-clock timestamp (None: a logged release)
    released: bool  # a release writes an already expired copy
    called: float | None = None  # logged: when the writer called acquire/renew/release
    source: str = "poll"

    @property
    def written(self) -> float:
        """The writer's clock just before it wrote (acquire/renew: expires = that + ttl;
        release: expires = that - ttl)."""
        if self.expires is None:
            return self.called
        return self.expires + TTL if self.released else self.expires - TTL


class LeasePoller:
    def __init__(self, storage, names: list[str], interval: float):
        self.storage, self.names, self.interval = storage, names, interval
        self.versions: dict[str, list[Version]] = {n: [] for n in names}
        self.errors: list[str] = []
        self.max_gap = 0.0
        self._last: dict[str, bytes] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-poller", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def holders(self) -> dict[str, str]:
        """tenant -> owner of its lease as last seen, if unexpired."""
        now, out = time.time(), {}
        for name, versions in list(self.versions.items()):
            if versions and not versions[-1].released and versions[-1].expires > now:
                out[name] = versions[-1].owner
        return out

    def _run(self) -> None:
        children = {n: self.storage.child(n) for n in self.names}
        last_round = time.time()
        while not self._stop.is_set():
            for name in self.names:
                try:
                    data = children[name].read(LEASE_KEY)
                except ObjectNotFound:
                    continue
                except StorageError as e:
                    self.errors.append(f"{name}: {e}")
                    continue
                now = time.time()
                if data == self._last.get(name):
                    continue
                self._last[name] = data
                generation, expires_at, owner = decode_lease(data)
                expires = expires_at.timestamp()
                # Acquire/renew: expires = write + ttl, seen (well) before it; release:
                # expires = write - ttl, so it is seen at least a ttl after it.
                released = now >= expires + TTL - CLOCK_SLACK
                self.versions[name].append(Version(now, generation, owner, expires, released,
                                                   source="poll: release" if released else "poll"))
            now = time.time()
            self.max_gap = max(self.max_gap, now - last_round)
            last_round = now
            self._stop.wait(self.interval)


# -- reading the replica ----------------------------------------------------------------------


@dataclass
class L0:
    txid: int
    info: object  # the LTXInfo
    header: object
    pages: list  # [(pgno, bytes)], checksum verified
    landed: float | None = None  # wall time the file appeared in the replica (at the latest)
    called: float | None = None  # when its writer called Replica.write (it landed after)
    writer: Instance | None = None

    @property
    def full(self) -> bool:
        """Holds every page of the database (less SQLite's lock page): a full-page L0."""
        commit = self.header.commit
        lock = lock_pgno(self.header.page_size)
        return len(self.pages) == commit - (1 if commit >= lock else 0)


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    paused_in_flight: list[str] = field(default_factory=list)
    timelines: dict = field(default_factory=dict)  # tenant -> [Version], for the report

    def fail(self, line: str) -> None:
        self.problems.append(line)


def read_logs(instances: list[Instance]):
    """From every process's write log: (tenant, txid) -> [(returned, called, writer)] of
    the L0 files, and tenant -> [Version] of the lease writes."""
    writes: dict[tuple[str, int], list[tuple[float, float, Instance]]] = {}
    leases: dict[str, list[Version]] = {}
    for inst in instances:
        if not os.path.exists(inst.write_log):
            continue
        with open(inst.write_log) as f:
            for line in f:
                line = line.strip()
                if m := WROTE.match(line):
                    name = re.search(r"/replica/([^/?]+)", m.group("url")).group(1)
                    if m.group("level") == "0":
                        entry = (float(m.group("t")), float(m.group("called")), inst)
                        writes.setdefault((name, int(m.group("min"))), []).append(entry)
                elif m := LEASED.match(line):
                    name = re.search(r"/replica/([^/?]+)", m.group("url")).group(1)
                    release = m.group("op") == "release"
                    leases.setdefault(name, []).append(Version(
                        float(m.group("t")), int(m.group("gen")), m.group("owner"),
                        None if release else float(m.group("expires")), release,
                        float(m.group("called")), f"{m.group('op')} by {inst.label}",
                    ))
    return writes, leases


def collect_l0(storage, name: str, writes, kind: str, findings: Findings) -> tuple[list[L0], list]:
    """Every L0 file of a tenant, decoded (checksums verified), with writer and landing time."""
    replica = Replica(storage.child(name))
    files = replica.all_files()
    others = [i for level, infos in files.items() if level != 0 for i in infos]
    out = []
    for info in files[0]:
        data = replica.read(info)
        dec = replica.decoder(info, data)  # refuses a header that disagrees with the name
        pages = [(pgno, bytes(page)) for pgno, page in dec.pages()]
        dec.close()  # verifies the file checksum
        assert len(pages) == len(read_page_index(data))
        f = L0(info.min_txid if info.min_txid == info.max_txid else -info.min_txid, info, dec.header, pages)
        logged = writes.get((name, info.min_txid), [])
        if len(logged) > 1:
            findings.fail(f"{name}: txid {info.min_txid} logged as written by {[e[-1].label for e in logged]}")
        if logged:
            f.landed, f.called, f.writer = logged[0]
        if kind == "s3":
            # The log line comes after the response (a writer frozen after the PUT landed
            # logs it late); LastModified, to the second, bounds the landing too.
            modified = info.created_at.timestamp() + 1.0
            f.landed = modified if f.landed is None else min(f.landed, modified)
        if kind == "file":
            # The kernel sets the ctime when the file is linked into place (the mtime is
            # set to the LTX timestamp instead).
            f.landed = os.stat(os.path.join(storage.child(name).root, *info.key.split("/"))).st_ctime
        out.append(f)
    return out, others


def holder_at(versions: list[Version], t: float) -> Version | None:
    """The lease version in force at wall time ``t``: the last written at or before ``t``,
    if it is an unexpired acquire/renew (after a release, or expiry, nobody holds it)."""
    ordered = sorted(versions, key=lambda v: v.written)
    i = bisect_right([v.written for v in ordered], t) - 1
    if i < 0:
        return None
    v = ordered[i]
    return None if v.released or t > v.expires else v


def lease_timeline(logged: list[Version], polled: list[Version], instances, findings: Findings,
                   name: str) -> list[Version]:
    """Every version of a tenant's lease: the writers' logs, plus any version the poller
    saw that no log explains (its writer killed before logging it). A polled version no
    log explains, without a kill of that host just after it, is an unknown lock.json writer."""
    timeline = list(logged)
    for v in polled:
        if v.released:
            explained = any(w.released and (w.generation, w.owner) == (v.generation, v.owner)
                            and -CLOCK_SLACK <= v.written - w.called <= 1.0 for w in logged)
        else:
            explained = any(not w.released and (w.generation, w.owner) == (v.generation, v.owner)
                            and abs(w.expires - v.expires) < 1e-5 for w in logged)
        if explained:
            continue
        timeline.append(v)
        if not any(i.host == v.owner and i.killed and 0 <= i.ended - v.written <= 1.0 for i in instances):
            findings.fail(f"{name}: lock.json version g{v.generation} {v.owner} "
                          f"{'release' if v.released else 'expires ' + str(v.expires)} is in no watcher's log")
    return timeline


def describe(versions: list[Version], t: float, around: float = 6.0) -> str:
    """The lease versions written within ``around`` seconds of ``t``, for a message."""
    near = [v for v in sorted(versions, key=lambda v: v.written) if abs(v.written - t) <= around]
    return "; ".join(
        f"{v.source} g{v.generation} {v.owner} written {v.written - t:+.2f}s"
        + ("" if v.expires is None else f" expires {v.expires - t:+.2f}s") for v in near
    )


def paused_in_flight(f: L0, versions: list[Version]) -> tuple[float, float] | None:
    """The pause of ``f``'s writer that the write was in flight across, if any: SIGSTOP
    after the writer's last lease write before it landed, SIGCONT at most 1 s before it
    landed. Such a write passed its lease check before the pause and landed after it;
    the caller then looks at when the file was built (its LTX timestamp)."""
    own = [v.written for v in versions if v.owner == f.writer.host and v.written <= f.called]
    last_lease = max(own, default=f.writer.started)
    for stop, cont in f.writer.pauses:
        if cont is not None and stop >= last_lease - CLOCK_SLACK and 0 <= f.landed - cont <= 1.0 + CLOCK_SLACK:
            return stop, cont
    return None


def check_leases(name: str, files: list[L0], versions: list[Version], instances, kind: str,
                 findings: Findings) -> None:
    """4: every L0 file landed while its writer's host held the tenant's lease."""
    killed = [i for i in instances if i.killed]
    synced = {i.label: i.synced() for i in instances}
    for f in files:
        if f.writer is None:
            # Killed between the write and the log line; on S3 the landing time is
            # LastModified (whole seconds), hence the wider window.
            if not any(-1.0 <= i.ended - f.landed <= 2.0 for i in killed):
                findings.fail(f"{name}: txid {f.txid} is in no write log (landed {f.landed:.3f}), "
                              f"and no watcher was killed just then")
            continue
        # It landed between the call and ``landed`` (file://: the ctime, which lags the
        # clock by up to a tick). The writer's host must hold the lease at some moment of
        # that interval; the holder changes only at a version's write or expiry.
        lo = f.called
        hi = max(lo, f.landed + (JIFFY if kind == "file" else 0.0))
        moments = {lo, hi} | {t for v in versions for t in (v.written, v.expires) if t is not None and lo < t < hi}
        in_force = [holder_at(versions, t) for t in sorted(moments)]
        if any(v is not None and v.owner == f.writer.host for v in in_force):
            continue
        other = next((v for v in in_force if v is not None), None)
        what = "WHILE THE LEASE WAS HELD BY " + other.owner if other is not None else "while nobody held the lease"
        line = (f"{name}: txid {f.txid}{' (full-page)' if f.full else ''} by {f.writer.label} "
                f"landed {what} (its LTX timestamp: {f.header.timestamp / 1000 - f.landed:+.2f}s) "
                f"[{describe(versions, f.landed)}]")
        from_sync = (name, f.txid) in synced[f.writer.label]
        line += (" -- from a sync job" if from_sync else
                 " -- NOT from a sync job (no 'synced' line: Fleet.release -> Capture.release -> checkpoint -> _ship)")
        pause = paused_in_flight(f, versions) if from_sync else None
        no_fence = ("Fleet.sync checks the lease before Capture.sync_once (renewing only when less than ttl/2"
                    " is left) and never checks Leaser.held right before the upload")
        if from_sync and pause is None:
            line += f" and not paused: the sync outlived its lease ({no_fence})"
        elif pause is not None:
            line += f" -- SIGSTOP {pause[0] - f.landed:+.2f}s .. SIGCONT {pause[1] - f.landed:+.2f}s"
            if f.header.timestamp / 1000 > (pause[0] + pause[1]) / 2:  # (nothing is built while stopped)
                # Built after the SIGCONT, with an expired lease: a check right before the
                # upload would have stopped it.
                line += f"; the file was built after the SIGCONT ({no_fence})"
                pause = None
        if pause is not None and not STRICT:
            findings.paused_in_flight.append(line + " -- built before the SIGSTOP, in flight across it")
        else:
            findings.fail(line)


def check_full_pages(name: str, files: list[L0], versions: list[Version], findings: Findings) -> int:
    """5: a full-page file is the first its process wrote after another process did, or
    after the lease passed through another host (which may have checkpointed the WAL)."""
    count = 0
    for prev, f in zip([None, *files], files):
        if not f.full:
            continue
        count += 1
        if prev is None or f.writer is None or prev.writer is None or prev.writer is not f.writer:
            continue
        lo, hi = min(prev.landed, f.landed), max(prev.landed, f.landed)
        if any(lo - CLOCK_SLACK <= v.written <= hi + CLOCK_SLACK and v.owner != f.writer.host for v in versions):
            continue
        findings.fail(f"{name}: txid {f.txid} is a full-page file by {f.writer.label}, which also wrote txid "
                      f"{prev.txid}, with no other host's lease in between [{describe(versions, f.landed)}]")
    return count


def check_chain(tmp_path, storage, name: str, files: list[L0], app: App, findings: Findings) -> int:
    """2 + 3: the database at every TXID is sound and holds a prefix of the application's
    transactions, never shrinking; the last one equals the source database.

    Every TXID is applied incrementally here as restore does it (each file's pages in
    order, then truncated to its commit) and checked with ``integrity_check`` and against
    the model (row count and sums; every byte where restore runs);
    ``tenantsync.restore.restore`` itself runs at the first and last TXID, at
    each full-page file and each flagged file, and at every RESTORE_EVERY-th (16 on
    file://, 40 on S3 where a restore reads every file over HTTP), and must give the same
    database. Returns the number of restores."""
    model = Model(name, app.history[name])
    work = str(tmp_path / "chain" / name)
    os.makedirs(os.path.dirname(work), exist_ok=True)
    interesting = {1, len(files)} | {f.txid for f in files if f.full}
    flagged = {int(m.group(1)) for m in (re.match(rf"{re.escape(name)}: txid (\d+) ", p) for p in
                                             findings.problems + findings.paused_in_flight) if m}
    interesting |= flagged
    every = RESTORE_EVERY or (16 if storage.kind == "file" else 40)
    restores = 0
    fd = os.open(work, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for f in files:
            page_size = f.header.page_size
            for pgno, page in f.pages:
                os.pwrite(fd, page, (pgno - 1) * page_size)
            os.ftruncate(fd, f.header.commit * page_size)
            conn = sqlite3.connect("file:" + urllib.parse.quote(work) + "?immutable=1", uri=True)
            try:
                check = conn.execute("PRAGMA integrity_check").fetchall()
            finally:
                conn.close()
            if check != [("ok",)]:
                findings.fail(f"{name}: the database at txid {f.txid} fails integrity_check: {check[:3]}")
                return restores
            restoring = f.txid in interesting or f.txid % every == 0
            n, wrong = model.compare(work, full=restoring)
            if wrong:
                findings.fail(f"{name}: the database at txid {f.txid} {wrong}")
                return restores
            if restoring:
                out = str(tmp_path / "restored" / name)
                try:
                    result = restore(Replica(storage.child(name)), out, txid=f.txid, force=True)
                except RestoreError as e:
                    findings.fail(f"{name}: restore at txid {f.txid} failed: {e}")
                    return restores
                restores += 1
                if result.txid != f.txid or model.compare(out) != (n, None):
                    findings.fail(f"{name}: restore at txid {f.txid} differs from applying L0 files 1..{f.txid}")
    finally:
        os.close(fd)
    last = model.n
    source, wrong = model.compare(app.paths[name], immutable=False)
    if source != last or wrong:
        findings.fail(f"{name}: the latest txid holds transaction {last}, the source {source}"
                      + (f" ({wrong})" if wrong else ""))
    return restores


def verify(tmp_path, storage, kind, app, names, poller, instances, findings: Findings) -> None:
    writes, leases = read_logs(instances)
    totals = {"files": 0, "full": 0, "restores": 0, "read": 0.0, "chain": 0.0}
    for name in names:
        started = time.monotonic()
        files, others = collect_l0(storage, name, writes, kind, findings)
        totals["read"] += time.monotonic() - started
        totals["files"] += len(files)
        if others:
            findings.notes.append(f"{name}: {len(others)} files above L0 (compaction ran)")
        # 1. TXIDs 1..N, one per file.
        txids = [f.txid for f in files]
        if txids != list(range(1, len(files) + 1)):
            findings.fail(f"{name}: L0 TXIDs are not 1..{len(files)} (negative: a file of several): {txids}")
            continue
        versions = lease_timeline(leases.get(name, []), poller.versions[name], instances, findings, name)
        findings.timelines[name] = versions
        check_leases(name, files, versions, instances, kind, findings)
        totals["full"] += check_full_pages(name, files, versions, findings)
        started = time.monotonic()
        totals["restores"] += check_chain(tmp_path, storage, name, files, app, findings)
        totals["chain"] += time.monotonic() - started
    print(f"verified {totals['files']} L0 files ({totals['full']} full-page) at every TXID, "
          f"with {totals['restores']} restores (reading {totals['read']:.1f} s, chain {totals['chain']:.1f} s)")


# -- the test ----------------------------------------------------------------------------------


@pytest.fixture(params=["file", "seaweed"])
def replica_url(request):
    """The replica root: file://, or S3 on SeaweedFS (atomic conditional writes; moto's
    are not, and the lease's takeover race depends on them)."""
    return request.param, request.getfixturevalue(f"{request.param}_url")


def test_two_watchers_never_both_write_a_replica(tmp_path, replica_url):
    backend, url = replica_url
    kind = "file" if backend == "file" else "s3"
    rounds = ROUNDS or DEFAULT_ROUNDS[backend]
    rng = random.Random(SEED)
    print(f"\nseed {SEED} (TENANTSYNC_LEASE_SEED={SEED} repeats the choices, not the timing), "
          f"{rounds} rounds, backend {backend}, files in {tmp_path}")
    (tmp_path / "data").mkdir()
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    config = tmp_path / "tenantsync.yml"
    config.write_text(CONFIG)
    glob = f"{tmp_path}/data/*.db"

    app = App(tmp_path / "data", random.Random(SEED + 1))
    names = sorted(app.paths)
    storage = open_storage(url)
    events: list = []
    hosts = [Host(h, tmp_path, glob, url, str(config), str(site), events) for h in ("hostA", "hostB")]
    poller = LeasePoller(storage, names, 0.1 if kind == "file" else 0.2)
    stop_app = threading.Event()
    app_thread = threading.Thread(target=app.run, args=(stop_app,), name="app", daemon=True)
    findings = Findings()
    t0 = time.monotonic()
    try:
        poller.start()
        for h in hosts:
            h.start()
        app_thread.start()
        time.sleep(2.0)

        # -- chaos: SIGKILL, SIGTERM, SIGSTOP past the TTL (see the module doc) -------------------
        kinds = ["restart", "pause-mid-sync", "kill", "pause"]
        actions = ["pause-both"] + [kinds[i % len(kinds)] for i in range(rounds - 1)]
        rng.shuffle(actions)
        for action in actions:
            victim = rng.choice(hosts)
            if action in ("restart", "pause-both"):
                # The host holding fewer leases: it has tenants open that it may not ship.
                held = poller.holders()
                victim = min(hosts, key=lambda h: (sum(o == h.host for o in held.values()), rng.random()))
            other = hosts[1] if victim is hosts[0] else hosts[0]
            if action == "kill":
                time.sleep(rng.uniform(0.0, 1.0))
                victim.kill()
                time.sleep(rng.uniform(0.0, 1.5))
                victim.start()
            elif action == "restart":
                # A deploy: SIGTERM (the watcher ships, checkpoints and releases every tenant
                # it has open, then exits) and start again, while the other host is briefly
                # frozen (well within its lease) with commits it has not shipped yet.
                for h in hosts:
                    time.sleep(max(0.0, h.current.started + 3.0 - time.time()) if h.current else 0.0)
                other.pause()
                time.sleep(rng.uniform(0.2, 0.4))
                code = victim.terminate()
                other.resume()
                if code not in (0, None):
                    findings.fail(f"{victim.instances[-1].label}: exited with status {code} on SIGTERM "
                                  f"(graceful restart):\n{victim.instances[-1].tail()}")
                victim.start()
            elif action == "pause-mid-sync":
                # Frozen between a lease check and the upload it guards, past the TTL.
                held = poller.holders()
                victim = max(hosts, key=lambda h: (sum(o == h.host for o in held.values()), rng.random()))
                if victim.pause_mid_sync():
                    time.sleep(TTL + rng.uniform(0.5, 1.5))
                    victim.resume()
            elif action == "pause-both":
                # The victim sleeps through the TTL and a release sweep, and wakes while the
                # other host is frozen too, briefly (well within its lease), with commits it
                # has not shipped yet: only the lease holder may ship them. (Both must be up
                # for a while first, past their imports and first syncs.)
                for h in hosts:
                    time.sleep(max(0.0, h.current.started + 3.0 - time.time()) if h.current else 0.0)
                victim.pause()
                time.sleep(max(TTL, RELEASE_EVERY) + rng.uniform(0.2, 0.8))
                other.pause()
                time.sleep(rng.uniform(0.3, 0.6))
                victim.resume()
                time.sleep(rng.uniform(0.3, 0.6))
                other.resume()
            else:
                victim.pause()
                pause = rng.uniform(TTL + 0.5, TTL + 2.5)
                if rng.random() < 0.3:  # meanwhile the other host crashes and comes back
                    time.sleep(pause / 2)
                    other.kill()
                    other.start()
                    time.sleep(pause / 2)
                else:
                    time.sleep(pause)
                victim.resume()
            for h in hosts:
                h.check_alive()
            time.sleep(rng.uniform(0.3, 1.5))
        chaos_done = time.monotonic()

        # -- settle: every committed transaction reaches the replica ----------------------------
        stop_app.set()
        app_thread.join(120)
        assert app.error is None, f"the application failed: {app.error!r}"
        commits = sum(len(h) - 1 for h in app.history.values())
        for h in hosts:
            h.check_alive()
            if h.current is None:
                h.start()
        lagging = set(names)
        deadline = time.monotonic() + SETTLE_TIMEOUT
        nudged = time.monotonic()
        while lagging and time.monotonic() < deadline:
            time.sleep(0.5)
            for name in sorted(lagging):
                out = tmp_path / "settle" / name
                try:
                    restore(Replica(storage.child(name)), str(out), force=True)
                except RestoreError:
                    continue
                conn = open_ro(str(out))
                try:
                    (n,) = conn.execute("SELECT n FROM meta WHERE k = 0").fetchone()
                finally:
                    conn.close()
                if n == len(app.history[name]) - 1:
                    lagging.discard(name)
            if lagging and time.monotonic() - nudged > 3 * TTL:
                # A sync skipped for a lease or a conflict waits for the next write or the
                # 15 s catch-up; a write to each lagging tenant asks again sooner.
                nudged = time.monotonic()
                for name in lagging:
                    app.commit(name, Txn(1, 10, None))
        settled = time.monotonic()
        if lagging:
            findings.fail(f"not caught up {SETTLE_TIMEOUT:.0f} s after the chaos ended: {sorted(lagging)}")
        for h in hosts:
            h.check_alive()
        for h in hosts:
            code = h.terminate()
            if code not in (0, None):
                findings.fail(f"{h.instances[-1].label}: exited with status {code} on SIGTERM (final stop):\n"
                              f"{h.instances[-1].tail()}")
        poller.stop()
        app.close()

        # -- verify ------------------------------------------------------------------------------
        instances = [i for h in hosts for i in h.instances]
        verify(tmp_path, storage, kind, app, names, poller, instances, findings)
        verified = time.monotonic()
    finally:
        stop_app.set()
        poller.stop()
        for h in hosts:
            h.cleanup()

    # -- report ----------------------------------------------------------------------------------
    for inst in instances:
        if inst.died_on_its_own is not None:
            findings.fail(f"{inst.label} died on its own with status {inst.died_on_its_own}:\n{inst.tail()}")
        with open(inst.stderr, errors="replace") as f:
            err = f.read()
        if "Traceback" in err:
            findings.fail(f"{inst.label} logged a traceback:\n{err[err.index('Traceback'):][:3000]}")
        failed = [line for line in err.splitlines() if " failed: " in line]
        if failed:
            findings.notes.append(f"{inst.label}: {len(failed)} failed jobs, e.g. {failed[0]}")
    if poller.errors:
        findings.notes.append(f"lease poller errors: {poller.errors[:3]}")
    if poller.max_gap > TTL / 2:
        findings.notes.append(f"the lease poller stalled for {poller.max_gap:.2f} s: lease versions may be missing")
    if app.blocked:
        findings.notes.append(f"commits that waited > 1 s for the write lock (a paused watcher's checkpoint): "
                              f"{[(n, round(s, 1)) for n, s in app.blocked]}")
    print(f"{commits} transactions; timing: chaos {chaos_done - t0:.1f} s, settle {settled - chaos_done:.1f} s, "
          f"verify {verified - settled:.1f} s")
    for line in findings.paused_in_flight:
        print("paused in flight (the lease's stated limit: a pause longer than its margin):", line)
    for note in findings.notes:
        print("note:", note)
    with open(tmp_path / "report.txt", "w") as f:  # for a post-mortem beside the watchers' logs
        f.write("\n".join(["PROBLEMS", *findings.problems, "PAUSED IN FLIGHT", *findings.paused_in_flight,
                           "NOTES", *findings.notes, "EVENTS",
                           *(f"{t:.3f} {what} {who}" for t, what, who in sorted(events)), "LEASES"]))
        for name, versions in findings.timelines.items():
            for v in sorted(versions, key=lambda v: v.written):
                expires = "" if v.expires is None else f" expires {v.expires:.3f}"
                f.write(f"\n{name} written {v.written:.3f} g{v.generation} {v.owner}{expires} {v.source}")
    if findings.problems:
        print("events:")
        for t, what, who in sorted(events):
            print(f"  {t:.3f} {what} {who}")
    assert not findings.problems, (
        f"seed {SEED}: {len(findings.problems)} problem(s) (report and logs in {tmp_path}):\n"
        + "\n".join(findings.problems[:30])
    )
