"""Replication through object storage as it really is (issue 21): a blackhole, connection
resets and a 503 SlowDown storm, injected by tests/faultproxy.py between tenantsync and the
S3 server while applications write.

The commands users run are real subprocesses (``tenantsync watch``, ``replicate``,
``archive``, ``hydrate``); afterwards Litestream restores every replica, straight from the
server, to exactly its source. The bounds below follow from the storage defaults
(tenantsync.storage.options): a request lost in the blackhole is retried after the read
timeout (4 s), and one operation gives up after ``retry_time`` (30 s).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tenantsync.catalogue import Catalogue
from tenantsync.replica import Replica
from tenantsync.restore import restore
from tenantsync.storage import open_storage

from .dbutil import app_db, dump, wait_for, write_rows, written_tenants
from . import peer
from .peer import integrity, litestream
from .test_bad_input import _env, one_line_error, tenantsync
from .test_never_silent import Watch

_need_litestream = peer._need_litestream  # its autouse fixture: a missing binary fails every test here

#: Seconds each fault of the outage lasts at least: a blackhole, then resets, then a
#: SlowDown storm.
FAULT_SECONDS = 3.0

#: Requests each fault must have hit before the next begins: what the test claims to
#: show, it shows. One lost request is the blackhole's point (and all one database sends
#: until its client times out).
FAULT_HITS = {"blackhole": 1, "reset": 3, "error": 3}

#: Seconds a fault waits for its FAULT_HITS. Requests lost in the blackhole hold their
#: sync threads until the read timeout: until then a single database sends nothing.
REQUESTS_RESUME_WITHIN = 20.0

#: Share of the requests reset, then answered 503 SlowDown, during those faults.
RESET_SHARE, SLOWDOWN_SHARE = 0.5, 0.7

#: The round trip the proxy adds to every request, as from a nearby region.
RTT = 0.02

#: Seconds from heal until every replica restores to its source: a failed pass is retried
#: by the next, after at most one operation's retry_time.
CATCH_UP_WITHIN = 30.0

#: Seconds a hydration may take to fail while every connection is reset (the S3 client's
#: attempts with their backoff).
HYDRATE_FAILS_WITHIN = 30.0

#: Seconds a hydration may take to fail in a blackhole: each of the S3 client's attempts
#: waits out the read timeout, within one operation's retry_time.
HYDRATE_FAILS_IN_BLACKHOLE_WITHIN = 30.0

TENANTS = 20


# -- the parts -------------------------------------------------------------------------


class Writers:
    """A thread committing small transactions to ``paths`` at random, as applications do,
    until ``stop()``; each database gets its own connection, opened in that thread."""

    def __init__(self, paths: list[Path], pause: float = 0.01):
        self.paths, self.pause = paths, pause
        self.commits = 0
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="writers", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        rng = random.Random(21)
        conns = [app_db(p) for p in self.paths]
        try:
            for conn in conns:
                conn.execute("PRAGMA busy_timeout=10000")  # the replicator checkpoints meanwhile
            while not self._stop.is_set():
                write_rows(rng.choice(conns), rng.randint(1, 4), rng.randint(50, 2000))
                self.commits += 1
                time.sleep(self.pause)
        except BaseException as e:  # noqa: BLE001 - reported by stop(), in the test's thread
            self.failure = e
        finally:
            for conn in conns:
                conn.close()

    def stop(self) -> int:
        """Stop writing; returns how many transactions were committed."""
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the writers did not stop"
        if self.failure is not None:
            raise AssertionError(f"an application write failed: {self.failure!r}") from self.failure
        return self.commits


def outage(proxy, alive) -> None:
    """The faults in a row, each for ``FAULT_SECONDS`` and until it has hit its ``FAULT_HITS``
    requests, checking ``alive()`` throughout; healed after."""
    faults = [("blackhole", proxy.blackhole), ("reset", lambda: proxy.reset(RESET_SHARE)),
              ("error", lambda: proxy.error(503, "SlowDown", SLOWDOWN_SHARE))]
    try:
        for kind, fault in faults:
            hits = proxy.stats()["faults"].get(kind, 0) + FAULT_HITS[kind]
            began = time.monotonic()
            fault()
            while time.monotonic() - began < FAULT_SECONDS or proxy.stats()["faults"].get(kind, 0) < hits:
                alive()
                assert time.monotonic() - began < REQUESTS_RESUME_WITHIN, \
                    f"fewer than {FAULT_HITS[kind]} requests in {REQUESTS_RESUME_WITHIN} s of {kind}: {proxy.stats()}"
                time.sleep(0.2)
    finally:
        proxy.heal()


def direct(url: str, proxy, server: str) -> str:
    """The replica URL ``url`` with the server itself as endpoint, bypassing the proxy."""
    return url.replace(proxy.url, server)


def matches(url: str, source: Path, out: Path) -> bool:
    """The replica at ``url`` restores (by tenantsync, in-process) to ``source``'s content."""
    try:
        restore(Replica(open_storage(url)), str(out), force=True)
    except Exception:  # noqa: BLE001 - not there yet (e.g. nothing shipped): keep waiting
        return False
    return dump(str(out)) == dump(str(source))


def assert_litestream_restores(url: str, source: Path, out: Path) -> None:
    """The oracle: ``litestream restore`` of the replica at ``url`` is ``source`` exactly."""
    litestream("restore", "-o", str(out), url)
    assert integrity(out) == "ok"
    assert dump(str(out)) == dump(str(source)), f"{url} does not restore to {source}"


# -- watch: 20 tenants -------------------------------------------------------------------


def test_watch_rides_out_an_outage_and_catches_up_by_itself(tmp_path, s3_server, s3_proxy, proxied_s3_url):
    """20 tenants written throughout a blackhole, resets and a SlowDown storm: the watcher
    stays up, and within CATCH_UP_WITHIN of heal, without a restart, every replica is its
    source exactly."""
    s3_proxy.set_rtt(RTT)
    paths = written_tenants(tmp_path / "data", TENANTS, 5)
    watch = Watch(tmp_path, proxied_s3_url)
    try:
        catalogue = Catalogue(watch.catalogue_url, fleet=watch.fleet)

        def alive() -> None:
            assert watch.proc.poll() is None, f"tenantsync watch exited:\n{watch.stderr_path.read_text()}"

        assert wait_for(lambda: len([t for t in catalogue.records() if t.txid]) == TENANTS, 60, 0.2), \
            watch.stderr_path.read_text()
        writers = Writers(paths)
        outage(s3_proxy, alive)
        healed = time.monotonic()
        time.sleep(1)  # writes after heal too
        writers.stop()

        replica_root = open_storage(direct(proxied_s3_url, s3_proxy, s3_server))
        restored = tmp_path / "restored.db"
        for path in paths:
            url = replica_root.child(path.name).url
            left = CATCH_UP_WITHIN - (time.monotonic() - healed)
            assert wait_for(lambda: matches(url, path, restored), max(left, 0), 0.5), \
                f"{path.name} not caught up {CATCH_UP_WITHIN} s after heal:\n{watch.stderr_path.read_text()}"
            alive()
        for path in paths:
            assert_litestream_restores(replica_root.child(path.name).url, path, tmp_path / f"ls-{path.name}")
        alive()
    finally:
        code, err = watch.stop()
    assert code == 0 and "Traceback" not in err, err


# -- replicate: one database -----------------------------------------------------------


def test_replicate_rides_out_an_outage_and_catches_up_by_itself(tmp_path, s3_server, s3_proxy, proxied_s3_url):
    s3_proxy.set_rtt(RTT)
    db = tmp_path / "app.db"
    conn = app_db(db)
    write_rows(conn, 5)
    conn.close()
    log = tmp_path / "replicate.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tenantsync", "replicate", str(db), "--replica", proxied_s3_url],
                                stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path)
    try:
        def alive() -> None:
            assert proc.poll() is None, f"tenantsync replicate exited:\n{log.read_text()}"

        assert wait_for(lambda: "shipped" in log.read_text(), 30, 0.1), log.read_text()
        writers = Writers([db])
        outage(s3_proxy, alive)
        healed = time.monotonic()
        time.sleep(1)
        writers.stop()

        url = direct(proxied_s3_url, s3_proxy, s3_server)
        assert wait_for(lambda: matches(url, db, tmp_path / "restored.db"), CATCH_UP_WITHIN - (time.monotonic() - healed),
                        0.5), f"not caught up {CATCH_UP_WITHIN} s after heal:\n{log.read_text()}"
        alive()
        assert_litestream_restores(url, db, tmp_path / "litestream.db")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0 and "Traceback" not in log.read_text(), log.read_text()


# -- hydrate ---------------------------------------------------------------------------


def archived_tenant(tmp_path: Path, url: str) -> tuple[Path, Path, list]:
    """Tenant acme.db written, shipped by ``tenantsync watch`` and archived, through the
    proxy while it is healthy: (its path, the tenantsync.yml, the content it must come back
    with)."""
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "acme.db"
    conn = app_db(path)
    for _ in range(20):
        write_rows(conn, 50, 500)
    conn.close()
    expected = dump(str(path))
    watch = Watch(tmp_path, url)
    catalogue = Catalogue(watch.catalogue_url, fleet=watch.fleet)
    shipped = wait_for(lambda: (record := catalogue.get("acme.db")) is not None and record.txid, 30, 0.1)
    code, err = watch.stop()
    assert shipped and code == 0, err
    config = tmp_path / "tenantsync.yml"  # the watch's
    archived = tenantsync("archive", "acme.db", "--config", config, cwd=tmp_path)
    assert archived.returncode == 0, archived.stderr
    assert os.listdir(path.parent) == []
    return path, config, expected


def assert_hydration_fails_cleanly_then_succeeds(tmp_path, proxy, url, fault, within: float) -> None:
    """Tenant acme.db archived, then ``fault()`` on: its hydration fails with one error line
    naming it, exit status 3 (storage unreachable: worth retrying), within ``within`` s,
    leaving nothing in the data directory. After heal it hydrates to exactly the archived
    content."""
    path, config, expected = archived_tenant(tmp_path, url)
    fault()
    began = time.monotonic()
    failed = tenantsync("hydrate", "acme.db", "--config", config, cwd=tmp_path, timeout=within + 60)
    took = time.monotonic() - began
    one_line_error(failed, "acme.db", code=3)
    assert took <= within, f"the hydration took {took:.1f} s to fail"
    assert os.listdir(path.parent) == [], "a partial or temporary file was left"
    proxy.heal()
    hydrated = tenantsync("hydrate", "acme.db", "--config", config, cwd=tmp_path)
    assert hydrated.returncode == 0, hydrated.stderr
    assert hydrated.stdout.strip() == str(path)
    assert integrity(path) == "ok" and dump(str(path)) == expected


def test_a_hydration_while_connections_are_reset_fails_cleanly_then_succeeds(tmp_path, s3_proxy, proxied_s3_url):
    s3_proxy.set_rtt(RTT)
    assert_hydration_fails_cleanly_then_succeeds(tmp_path, s3_proxy, proxied_s3_url, lambda: s3_proxy.reset(1.0),
                                                 HYDRATE_FAILS_WITHIN)


def test_a_hydration_in_a_blackhole_fails_cleanly_then_succeeds(tmp_path, s3_proxy, proxied_s3_url):
    s3_proxy.set_rtt(RTT)
    assert_hydration_fails_cleanly_then_succeeds(tmp_path, s3_proxy, proxied_s3_url, s3_proxy.blackhole,
                                                 HYDRATE_FAILS_IN_BLACKHOLE_WITHIN)
