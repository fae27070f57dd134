"""Tenants on demand in fleet mode, with real processes: redis-server, two Celery workers,
Celery beat and ``tenantsync serve`` (the watcher plus the HTTP API), replica on moto S3.

The config has ``archive-after: 3s`` and ``idle-after: 1s``. A quarter of the tenants
keep being written by a writer thread (its own connections); the rest go idle and must be
archived by the host's "archive" plan (run by `tenantsync serve`'s watcher) (catalogue state archived, local files gone). Then 50
concurrent ``POST /tenants/NAME/hydrate`` calls for random tenants (archived ones, active
ones, some the same tenant at once): every answer must be 200 with a path that exists and
holds a complete database. At the end every tenant's content must equal what the test
wrote (kept in memory): the local file of local tenants, a restore of the replica for the
archived ones; and no temporary file may be left in the data directory.

Size: ``TENANTSYNC_ONDEMAND_TENANTS`` tenants (default 100: 300 take over 2 minutes on a
loaded 2-core machine, archival being the slow part); the soak variant (``-m soak``) runs 300.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from tenantsync.catalogue import TenantState, open_catalogue
from tenantsync.config import load as load_config
from tenantsync.replica import Replica
from tenantsync.restore import restore
from tenantsync.storage import open_storage

from .dbutil import app_db, dump, wait_for
from .test_fleet_celery import (
    BIN,
    HOST,
    child_env,
    children,  # noqa: F401 - fixture
    free_port,
    unexpected_errors,
    wait_worker_ready,
    worker_args,
    write_config,
)

HYDRATIONS = 50
HOST_QUEUE = f"host.{HOST}"
ARCHIVE_TIMEOUT = float(os.environ.get("TENANTSYNC_ONDEMAND_ARCHIVE_TIMEOUT", "120"))
SQLITE_SIDE = ("-wal", "-shm", "-journal")
#: ERRORs that are the designed outcome, not bugs: archiving a tenant the writer holds open.
EXPECTED_ERRORS = ("ArchiveAborted",)


def value(name: str, seq: int) -> bytes:
    """The row the test writes as ``name``'s ``seq``-th: known, so kept in memory cheaply."""
    return f"{name}:{seq}:".encode() + bytes([seq % 251]) * (40 + seq % 300)


def put(conn, name: str, rows: list, n: int) -> None:
    """One transaction of ``n`` rows; ``rows`` (the expected values) grows only on commit."""
    new = [value(name, len(rows) + i) for i in range(n)]
    conn.execute("BEGIN")
    try:
        conn.executemany("INSERT INTO t(v) VALUES (?)", [(v,) for v in new])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    rows.extend(new)


def expected_dump(rows: list) -> list:
    return [("t", [(i, v) for i, v in enumerate(rows, 1)])]


def call(url, method="GET", body=None, timeout=120):
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {os.environ['TENANTSYNC_API_TOKEN']}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read())
        except ValueError:
            return e.code, {"error": "no JSON body"}
    except OSError as e:
        return None, {"error": repr(e)}


def jobs_counted(base: str) -> dict[tuple[str, str], float]:
    """(job, outcome) -> count, from the API's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    req = urllib.request.Request(base + "/metrics", headers={"Authorization": f"Bearer {os.environ['TENANTSYNC_API_TOKEN']}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        text = resp.read().decode()
    return {(s.labels["job"], s.labels["outcome"]): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "tenantsync_jobs_total"}


def serve_args(config_path, port: int) -> list[str]:
    script = os.path.join(BIN, "tenantsync")
    command = [script] if os.access(script, os.X_OK) else [os.path.join(BIN, "python"), "-m", "tenantsync"]
    return [*command, "-v", "serve", "--config", str(config_path), "--listen", f"127.0.0.1:{port}"]


class HotWriter(threading.Thread):
    """Keeps writing the hot tenants, through connections of its own, until stopped."""

    def __init__(self, paths: dict, expected: dict):
        super().__init__(name="hot-writer", daemon=True)
        self.paths, self.expected = paths, expected
        self.stop_event = threading.Event()
        self.errors: list[str] = []
        self.transactions = 0

    def run(self) -> None:
        rng = random.Random(5)
        conns = {name: app_db(path) for name, path in self.paths.items()}
        names = sorted(conns)
        try:
            while not self.stop_event.is_set():
                name = rng.choice(names)
                try:
                    put(conns[name], name, self.expected[name], rng.randint(1, 3))
                    self.transactions += 1
                except Exception as e:  # noqa: BLE001 - reported by the test
                    self.errors.append(f"{name}: {e!r}")
                time.sleep(0.005)
        finally:
            for conn in conns.values():
                conn.close()


def stray_files(data_dir) -> list[str]:
    """Anything in the data directory that is not a database or SQLite's own side file."""
    return sorted(f for f in os.listdir(data_dir)
                  if not (f.endswith(".db") and not f.startswith(".")) and not f.endswith(SQLITE_SIDE))


def run_ondemand(tmp_path, redis_server, s3_url, spawn, tenants: int,
                 archive_timeout: float = ARCHIVE_TIMEOUT) -> None:
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    config_path = write_config(tmp_path, redis_server.url, replica=s3_url, **{"idle-after": "1s",
                                                                               "archive-after": "3s"})
    cfg = load_config(config_path, env={})
    assert cfg.archive_after and cfg.archive_after[0][1].total_seconds() == 3
    env = child_env(config_path) | {
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "TENANTSYNC_API_TOKEN": os.environ["TENANTSYNC_API_TOKEN"],  # the token call() sends
    }
    data = tmp_path / "data"

    # Every tenant starts with known rows; a quarter of them ("hot") keep being written.
    expected: dict[str, list] = {}
    paths = {}
    for i in range(tenants):
        name = f"t{i:04d}.db"
        paths[name] = str(data / name)
        expected[name] = []
        conn = app_db(paths[name])
        put(conn, name, expected[name], 5)
        put(conn, name, expected[name], 3)
        conn.close()
    hot = {f"t{i:04d}.db" for i in range(0, tenants, 4)}
    cold = sorted(set(paths) - hot)

    workers = {n: spawn(n, worker_args(n), env) for n in ("w1", "w2")}
    for w in workers.values():
        wait_worker_ready(w)
    port = free_port()
    server = spawn("serve", serve_args(config_path, port), env)
    base = f"http://127.0.0.1:{port}"
    assert wait_for(lambda: call(base + "/healthz", timeout=2)[0] == 200 or not server.alive(), 30), server.tail()
    catalogue = open_catalogue(cfg)
    assert wait_for(lambda: len(catalogue.records()) == tenants or not server.alive(), 30), server.tail()
    writer = HotWriter({n: paths[n] for n in hot}, expected)
    writer.start()
    beat = spawn("beat", [os.path.join(BIN, "celery"), "-A", "scheduler.beat", "beat", "--loglevel", "INFO",
                          "-s", str(tmp_path / "celerybeat-schedule")], env)
    procs = (*workers.values(), server, beat)
    timings["start"] = time.monotonic() - t0

    def states(names):
        out = {}
        for n in names:
            t = catalogue.get(n)
            out[n] = t.state if t is not None else None
        return out

    answers, problems = [], []
    checked: dict[str, str] = {}
    try:
        # The schedule archives every cold tenant (and no hot one).
        t_arch = time.monotonic()
        archived = wait_for(lambda: all(s == TenantState.archived for s in states(cold).values())
                            or not all(p.alive() for p in procs), archive_timeout, 0.5)
        timings["archive"] = time.monotonic() - t_arch
        if not archived:
            left = {n: s.value if s else None for n, s in states(cold).items() if s != TenantState.archived}
            pytest.fail(f"{len(left)} of {len(cold)} idle tenants not archived after {archive_timeout:.0f} s: "
                        f"{dict(list(left.items())[:10])}\n" + "\n".join(p.tail() for p in procs))
        still_there = [n for n in cold if any(os.path.exists(paths[n] + s) for s in ("", *SQLITE_SIDE))]
        assert not still_there, f"archived tenants with local files left: {still_there[:10]}"
        hot_archived = [n for n, s in states(hot).items() if s == TenantState.archived]
        assert not hot_archived, f"tenants being written were archived: {hot_archived[:10]}"

        # 50 concurrent hydrations: archived and active tenants, some the same one at once.
        rng = random.Random(7)
        names = [rng.choice(cold) for _ in range(30)] + [rng.choice(sorted(hot)) for _ in range(15)]
        names += [names[0]] * 3 + [names[1]] * 2  # guaranteed duplicates of archived tenants
        rng.shuffle(names)
        assert len(names) == HYDRATIONS

        def hydrate(name):
            status, body = call(f"{base}/tenants/{name}/hydrate", "POST", {})
            note = ""
            if status == 200:  # checked at once: the schedule may archive it again 3 s later
                path = body.get("path")
                if body.get("name") != name or not path or not os.path.exists(path):
                    note = f"answer names {body.get('name')!r}, path {path!r} missing"
                else:
                    try:
                        got = dump(path)
                        if name in cold and got != expected_dump(expected[name]):
                            note = (f"hydrated content differs: {sum(len(r) for _, r in got)} rows, "
                                    f"wrote {len(expected[name])}")
                    except Exception as e:  # noqa: BLE001
                        note = f"not a complete database: {e!r}"
            return name, status, body, note

        t_hyd = time.monotonic()
        barrier = threading.Barrier(HYDRATIONS)

        def hydrate_together(name):
            barrier.wait(30)
            return hydrate(name)

        with ThreadPoolExecutor(HYDRATIONS) as pool:
            answers = list(pool.map(hydrate_together, names))
        timings["hydrate"] = time.monotonic() - t_hyd
        # The watcher's /metrics counts what the worker processes did (the host's metrics directory).
        counted = jobs_counted(base)
    finally:
        writer.stop_event.set()
        writer.join(30)
    assert writer.errors == [], writer.errors[:10]

    bad_answers = [(n, s, b) for n, s, b, _ in answers if s != 200]
    if bad_answers:
        problems.append(f"{len(bad_answers)} of {HYDRATIONS} hydrations did not answer 200: {bad_answers[:10]}")
    notes = [(n, note) for n, s, _, note in answers if s == 200 and note]
    if notes:
        problems.append(f"{len(notes)} hydration answers were wrong: {notes[:10]}")

    # Quiesce: no more plans (storage plans run in beat, the archive plan in the watcher
    # of `serve`), then let queued and running archivals and hydrations end.
    beat.stop()
    server.stop()
    broker = redis.Redis.from_url(redis_server.url)

    def quiet():
        return (not any(s in (TenantState.archiving, TenantState.hydrating) for s in states(paths).values())
                and not any(broker.llen(q) for q in (HOST_QUEUE, "storage")) and not broker.hlen("unacked")
                and not stray_files(data))

    try:
        wait_for(quiet, 60, 0.5)
    finally:
        broker.close()

    # Every tenant's content equals what was written: local file, else the replica.
    t_check = time.monotonic()
    storage = open_storage(cfg.replica)
    for name in sorted(paths):
        want = expected_dump(expected[name])
        record = catalogue.get(name)
        try:
            if os.path.exists(paths[name]):
                got, where = dump(paths[name]), "local file"
            else:
                out = tmp_path / "restored" / name
                restore(Replica(storage.child(name)), str(out), force=True)
                got, where = dump(str(out)), f"replica (state {record.state.value})"
        except Exception as e:  # noqa: BLE001 - collected
            checked[name] = f"unreadable: {e!r}"
            continue
        if got != want:
            checked[name] = (f"{where} has {sum(len(r) for _, r in got)} rows, wrote {len(expected[name])} "
                             f"(state {record.state.value}, txid {record.txid})")
    timings["verify"] = time.monotonic() - t_check
    if checked:
        problems.append(f"{len(checked)} of {tenants} tenants differ from what was written: "
                        f"{dict(list(checked.items())[:10])}")
    strays = stray_files(data)
    if strays:
        problems.append(f"temporary/partial files left in the data directory: {strays[:20]}")
    if counted.get(("archive", "archived"), 0) < len(cold) or counted.get(("sync", "shipped"), 0) < tenants:
        problems.append(f"/metrics counted fewer jobs than the workers did: {counted}")
    died = [p.name for p in procs if p not in (beat, server) and not p.alive()]
    if died:
        problems.append(f"died: {died}")
    errors = [e for p in procs for e in unexpected_errors(p) if not any(x in e for x in EXPECTED_ERRORS)]
    if errors:
        problems.append(f"{len(errors)} unexpected errors logged:\n" + "\n".join(errors[:15]))

    timings["total"] = time.monotonic() - t0
    restored = sum(1 for _, s, b, _ in answers if s == 200 and b.get("restored"))
    report = (f"tenants={tenants} hot={len(hot)} writes={writer.transactions} hydrations={HYDRATIONS} "
              f"timings={ {k: round(v, 1) for k, v in timings.items()} } restored_answers={restored}")
    print(report)
    assert not problems, "\n\n".join(f"PROBLEM {i}: {p}" for i, p in enumerate(problems, 1)) + f"\n\n{report}\n" \
        + "\n".join(p.tail() for p in procs)


def test_idle_tenants_archived_by_beat_and_hydrated_over_http(tmp_path, redis_server, s3_url, children):  # noqa: F811
    run_ondemand(tmp_path, redis_server, s3_url, children, int(os.environ.get("TENANTSYNC_ONDEMAND_TENANTS", "100")))


@pytest.mark.soak
def test_idle_tenants_archived_by_beat_and_hydrated_over_http_soak(tmp_path, redis_server, s3_url,
                                                                   children):  # noqa: F811
    run_ondemand(tmp_path, redis_server, s3_url, children, 300, archive_timeout=max(ARCHIVE_TIMEOUT, 400))
