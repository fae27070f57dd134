#!/usr/bin/env python3
"""Cold bundles: bytes stored per tenant and bundle write/restore times, on a fleet of small
SaaS databases of one schema (issue 23's target: a bundle with a dictionary stores at most
half the bytes of the LZ4 LTX snapshot of the same database).

    python bench/bundles.py --out bundles.json                  # 1,000 tenants, ~1 minute
    python bench/bundles.py --tenants 200 --train 50 --levels 19 --dict-sizes 112
    python bench/bundles.py --tenants 300 --levels 19 --dict-sizes 112 --hydrate 200 --replica s3://…

The corpus: ``--tenants`` databases of one app (users, projects, tasks, comments: names,
emails, sentences, ISO timestamps, statuses), sized by a seeded RNG (log-uniform number of
tasks) to ~37-230 KB, median ~70 KB: the schema's nine b-trees of 4 KiB pages make 36 KB the
smallest, so the issue's 20 KB floor is not reachable with a realistic schema. The first ``--train`` tenants train the dictionaries; every measurement is
over the others, which the dictionary never saw. Per tenant:

- plain: the SQLite file;
- LTX snapshot: the level-9 file Litestream would store for it (tenantsync's LTX encoder,
  LZ4 page frames, the header ``compactor.merge`` writes for a snapshot);
- bundle: ``bundle.write_bundle`` at each ``--levels`` zstd level, without a dictionary and
  with one trained on the training tenants at each ``--dict-sizes`` (KiB).

Times are per tenant on file:// in a temporary directory: bundle write (compress + durable
write), bundle restore (``restore_bundle``: read, decompress, verify, fsync, rename), and for
comparison the restore of the LTX snapshot alone (``restore.restore``). Then ``--hydrate``
of the measured tenants go through a real fleet (sync, archive, every other one frozen with a
published dictionary): hydration p50/p99 from the LTX snapshot vs from the bundle (the thaw
included), and the objects a frozen tenant's replica holds. Prints markdown tables; ``--out``
writes everything as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone

HERE = os.path.abspath(__file__)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from tenantsync import dictionary, layout  # noqa: E402
from tenantsync.bundle import restore_bundle, write_bundle  # noqa: E402
from tenantsync.dictionary import Dictionaries  # noqa: E402
from tenantsync.ltx import HEADER_FLAG_NO_CHECKSUM, Encoder, Header, lock_pgno  # noqa: E402
from tenantsync.replica import Replica  # noqa: E402
from tenantsync.restore import restore  # noqa: E402
from tenantsync.storage import open_storage  # noqa: E402

KB = 1000
TXID = 0x3E8

WORDS = """the a to and of in for on with is it this that be we can you will please our as at by
from an not are was have has but or if all new when need update review customer team design
release bug fix feature request meeting notes follow up deadline sprint backlog invoice report
dashboard login page email onboarding migration database server deploy staging production
client feedback draft final budget quarter plan roadmap marketing campaign launch analytics
metrics chart export import settings permissions account billing payment subscription trial
support ticket issue question answer doc documentation api endpoint mobile app web browser
performance slow fast error crash timeout retry cache search filter sort list table column row
user admin owner member guest invite share comment mention attach file image upload download
priority high low medium blocked done open closed in progress waiting approved rejected today
tomorrow next week friday monday thanks great looks good agreed let me know asap sounds
checked tested merged pushed shipped scheduled moved renamed added removed changed""".split()
FIRST = """james mary john patricia robert jennifer michael linda william elizabeth david barbara
richard susan joseph jessica thomas sarah charles karen chris nancy daniel lisa matthew betty
anthony sandra mark ashley paul emily steven donna andrew michelle joshua carol kevin amanda
brian melissa george deborah timothy stephanie ronald rebecca jason laura ryan sharon""".split()
LAST = """smith johnson williams brown jones garcia miller davis rodriguez martinez hernandez lopez
gonzalez wilson anderson thomas taylor moore jackson martin lee perez thompson white harris
sanchez clark ramirez lewis robinson walker young allen king wright scott torres nguyen hill
flores green adams nelson baker hall rivera campbell mitchell carter roberts""".split()
STATUSES = ("todo", "in_progress", "review", "done", "blocked")
SCHEMA = """
CREATE TABLE users(id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
                   role TEXT NOT NULL, created_at TEXT NOT NULL, last_login_at TEXT);
CREATE TABLE projects(id INTEGER PRIMARY KEY, name TEXT NOT NULL, description TEXT,
                      owner_id INTEGER NOT NULL REFERENCES users(id), created_at TEXT NOT NULL,
                      archived INTEGER NOT NULL DEFAULT 0);
CREATE TABLE tasks(id INTEGER PRIMARY KEY, project_id INTEGER NOT NULL REFERENCES projects(id),
                   title TEXT NOT NULL, status TEXT NOT NULL, priority INTEGER NOT NULL,
                   assignee_id INTEGER REFERENCES users(id), due_date TEXT,
                   created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE TABLE comments(id INTEGER PRIMARY KEY, task_id INTEGER NOT NULL REFERENCES tasks(id),
                      author_id INTEGER NOT NULL REFERENCES users(id), body TEXT NOT NULL,
                      created_at TEXT NOT NULL);
CREATE INDEX tasks_project ON tasks(project_id, status);
CREATE INDEX tasks_assignee ON tasks(assignee_id);
CREATE INDEX comments_task ON comments(task_id, created_at);
"""


# -- the corpus ----------------------------------------------------------------------------


def make_tenant(path: str, rng: random.Random) -> None:
    """One tenant's database, sized through its number of tasks (log-uniform)."""
    tasks = int(math.exp(rng.uniform(math.log(12), math.log(300))))
    users = max(2, tasks // rng.randint(8, 20))
    projects = max(1, tasks // rng.randint(15, 40))
    company = rng.choice(WORDS).capitalize() + rng.choice(("ly", "io", "hub", "works", "labs", ""))
    domain = company.lower() + rng.choice((".com", ".io", ".co", ".app"))
    start = datetime(2024, 1, 1, tzinfo=timezone.utc) + timedelta(days=rng.randint(0, 600))

    def when(after: datetime, days: float = 90) -> str:
        return (after + timedelta(seconds=rng.uniform(0, days * 86400))).isoformat(timespec="seconds")

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA)
    people = [(rng.choice(FIRST), rng.choice(LAST)) for _ in range(users)]
    conn.executemany("INSERT INTO users VALUES (?, ?, ?, ?, ?, ?)", [
        (i + 1, f"{f}.{l}{i}@{domain}", f"{f.capitalize()} {l.capitalize()}",
         rng.choice(("admin", "member", "member", "guest")), when(start, 30), when(start, 400) if rng.random() < .8 else None)
        for i, (f, l) in enumerate(people)])
    conn.executemany("INSERT INTO projects VALUES (?, ?, ?, ?, ?, ?)", [
        (i + 1, text(1, 3)[:-1], text(6, 25), rng.randint(1, users), when(start, 60), int(rng.random() < .2))
        for i in range(projects)])
    conn.executemany("INSERT INTO tasks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", [
        (i + 1, rng.randint(1, projects), text(3, 9)[:-1], rng.choice(STATUSES), rng.randint(0, 3),
         rng.randint(1, users) if rng.random() < .85 else None,
         when(start, 300)[:10] if rng.random() < .6 else None, when(start, 200), when(start, 300))
        for i in range(tasks)])
    conn.executemany("INSERT INTO comments(task_id, author_id, body, created_at) VALUES (?, ?, ?, ?)", [
        (rng.randint(1, tasks), rng.randint(1, users), text(4, 40), when(start, 300))
        for _ in range(int(tasks * rng.uniform(0.8, 2.5)))])
    conn.commit()
    conn.close()


def ltx_snapshot(path: str) -> tuple[Header, bytes]:
    """The level-9 file Litestream would store for the database at ``path``."""
    data = open(path, "rb").read()
    page_size = int.from_bytes(data[16:18], "big")
    header = Header(flags=HEADER_FLAG_NO_CHECKSUM, page_size=page_size, commit=len(data) // page_size,
                    min_txid=1, max_txid=TXID, timestamp=int(time.time() * 1000))
    buf = io.BytesIO()
    enc = Encoder(buf, header)
    for i in range(0, len(data), page_size):
        if i // page_size + 1 != lock_pgno(page_size):
            enc.add_page(i // page_size + 1, data[i:i + page_size])
    enc.close()
    return header, buf.getvalue()


# -- measurements --------------------------------------------------------------------------


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def summary(sizes: list[int], snapshot: list[int], write_s: list[float] | None = None,
            restore_s: list[float] | None = None) -> dict:
    out = {"bytes_mean": statistics.fmean(sizes), "bytes_median": statistics.median(sizes),
           "vs_snapshot": sum(sizes) / sum(snapshot),
           "vs_snapshot_median": statistics.median(s / n for s, n in zip(sizes, snapshot))}
    for name, xs in (("write", write_s), ("restore", restore_s)):
        if xs:
            out[f"{name}_p50_ms"], out[f"{name}_p99_ms"] = 1000 * pct(xs, .5), 1000 * pct(xs, .99)
    return out


def bundle_config(paths: list[str], training: list[str], work: str, level: int, dict_kib: int | None) -> dict:
    root = os.path.join(work, f"fleet-{level}-{dict_kib}")
    fleet = open_storage(root)
    zdict, train_s = None, 0.0
    if dict_kib:
        t = time.perf_counter()
        zdict = dictionary.train(training, size=dict_kib << 10, level=level)
        train_s = time.perf_counter() - t
        dictionary.store(fleet, zdict)
    dictionaries = Dictionaries(fleet)
    sizes, writes, restores = [], [], []
    out = os.path.join(work, "restored.db")
    for i, path in enumerate(paths):
        tenant = fleet.child(f"t{i}.db")
        t = time.perf_counter()
        info = write_bundle(tenant, path, TXID, dictionary=zdict, level=level)
        writes.append(time.perf_counter() - t)
        sizes.append(info.size)
        t = time.perf_counter()
        restore_bundle(tenant, info.key, out, dictionaries=dictionaries, force=True)
        restores.append(time.perf_counter() - t)
    shutil.rmtree(root)
    return {"level": level, "dict_kib": dict_kib, "train_s": train_s,
            "dict_bytes": len(zdict.as_bytes()) if zdict else 0, "sizes": sizes, "write_s": writes,
            "restore_s": restores}


def snapshot_restores(paths: list[str], snapshots: list[tuple[Header, bytes]], work: str) -> list[float]:
    """``restore.restore`` of each tenant from its LTX snapshot alone, file://."""
    store = open_storage(os.path.join(work, "snapshots"))
    out, times = os.path.join(work, "restored-ltx.db"), []
    for i, (header, data) in enumerate(snapshots):
        replica = Replica(store.child(f"t{i}.db"))
        replica.write(layout.SNAPSHOT_LEVEL, header, data, len(data))
        t = time.perf_counter()
        restore(replica, out, force=True)
        times.append(time.perf_counter() - t)
    return times


def fleet_hydrations(paths: list[str], training: list[str], work: str, replica: str | None) -> dict:
    """Hydration through a real fleet (``OnDemand.hydrate``) of archived tenants, every other
    one frozen first (``freeze_tenant`` with a published dictionary): p50/p99 from the LTX
    snapshot vs from the bundle (its thaw included), and the objects a frozen tenant leaves."""
    from tenantsync.catalogue import open_catalogue
    from tenantsync.cold import freeze_tenant
    from tenantsync.config import Config
    from tenantsync.fleet import Fleet
    from tenantsync.ondemand import OnDemand
    from tenantsync.outcome import Archived, Frozen

    data = os.path.join(work, "hydrate-data")
    os.makedirs(data)
    cfg = Config(replica=replica or open_storage(os.path.join(work, "hydrate-replica")).url,
                 globs=(os.path.join(data, "*.db"),), catalogue=f"sqlite:///{work}/hydrate-catalogue.db",
                 host="bench", idle_after=timedelta(seconds=1))
    fleet = Fleet(cfg, open_catalogue(cfg))
    ondemand = OnDemand(fleet)
    dictionary.publish(fleet.storage, dictionary.train(training), databases=len(training))
    frozen, objects, rows = [], [], {}
    try:
        for i, source in enumerate(paths):
            name = f"h{i:04d}.db"
            path = os.path.join(data, name)
            shutil.copyfile(source, path)
            conn = sqlite3.connect(path)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.close()
            fleet.catalogue.discover(name, path, cfg.host)
            fleet.sync(name)
            archived = ondemand.archive(name)
            if not isinstance(archived, Archived):
                raise SystemExit(f"bench: {name} was not archived: {archived}")
            if i % 2:
                outcome = freeze_tenant(fleet, name)
                if not isinstance(outcome, Frozen):
                    raise SystemExit(f"bench: {name} was not frozen: {outcome}")
                frozen.append(name)
                objects.append(sorted(info.key for info in fleet.storage.child(name).list("")))
        times: dict[str, list[float]] = {"snapshot": [], "bundle": []}
        for i in range(len(paths)):
            name = f"h{i:04d}.db"
            t = time.perf_counter()
            hydrated = ondemand.hydrate(name)
            times["bundle" if name in frozen else "snapshot"].append(time.perf_counter() - t)
            if not hydrated.restored:
                raise SystemExit(f"bench: {name} was not restored: {hydrated}")
        for kind, xs in times.items():
            rows[kind] = {"tenants": len(xs), "p50_ms": 1000 * pct(xs, .5), "p99_ms": 1000 * pct(xs, .99),
                          "max_ms": 1000 * max(xs)}
    finally:
        fleet.close()
    kinds = sorted({key.split("/")[0] for keys in objects for key in keys})
    return {"replica": cfg.replica, "hydrate": rows, "objects_per_frozen_mean": statistics.fmean(map(len, objects)),
            "object_kinds": kinds, "example": objects[0] if objects else []}


def report(res: dict) -> str:
    c = res["corpus"]
    rows = res["rows"]
    lines = [
        f"Corpus: {c['tenants']} tenants ({c['train']} train the dictionaries, {c['measured']} measured), "
        f"SQLite files {c['size_min'] / KB:.0f}-{c['size_max'] / KB:.0f} KB, median {c['size_median'] / KB:.0f} KB.",
        "",
        "| stored as | bytes/tenant mean | median | ÷ LZ4 snapshot (total) | ÷ snapshot (median tenant) "
        "| write p50 / p99 ms | restore p50 / p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        times = [f"{r[k + '_p50_ms']:.1f} / {r[k + '_p99_ms']:.1f}" if k + "_p50_ms" in r else "–"
                 for k in ("write", "restore")]
        lines.append(f"| {name} | {r['bytes_mean']:,.0f} | {r['bytes_median']:,.0f} | {r['vs_snapshot']:.3f} "
                     f"| {r['vs_snapshot_median']:.3f} | {times[0]} | {times[1]} |")
    lines += ["", "Dictionaries: " + "; ".join(
        f"{d['dict_kib']} KiB at level {d['level']}: {d['dict_bytes']:,} bytes, trained in {d['train_s']:.1f} s"
        for d in res["dictionaries"]) + " (one object for the whole fleet)."]
    if "fleet" in res:
        f = res["fleet"]
        lines += ["", f"Hydration through a fleet ({f['replica'].split('?')[0]}), archived tenants, every other one frozen:",
                  "", "| hydrated from | tenants | p50 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {kind} | {r['tenants']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} |"
                  for kind, r in f["hydrate"].items()]
        lines += ["", f"Objects per frozen tenant: {f['objects_per_frozen_mean']:.2f} (e.g. {', '.join(f['example'])})."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tenants", type=int, default=1000)
    p.add_argument("--train", type=int, default=100, help="tenants the dictionaries are trained on")
    p.add_argument("--levels", default="3,19", help="zstd levels of the bundles, comma-separated")
    p.add_argument("--dict-sizes", default="64,112", help="dictionary sizes in KiB, comma-separated")
    p.add_argument("--seed", type=int, default=23)
    p.add_argument("--hydrate", type=int, default=200,
                   help="measured tenants also archived in a fleet and hydrated, half of them frozen first (0: none)")
    p.add_argument("--replica", help="the hydration fleet's replica URL (default: file:// in the work directory)")
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    dict_sizes = [int(x) for x in a.dict_sizes.split(",")]
    work = tempfile.mkdtemp(prefix="tenantsync-bundles-")
    try:
        rng = random.Random(a.seed)
        t = time.perf_counter()
        paths = [os.path.join(work, f"tenant{i:04d}.db") for i in range(a.tenants)]
        for path in paths:
            make_tenant(path, rng)
        print(f"corpus of {a.tenants} tenants made in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        training, measured = paths[:a.train], paths[a.train:]
        plain = [os.path.getsize(x) for x in measured]
        snapshots = [ltx_snapshot(x) for x in measured]
        snap = [len(s[1]) for s in snapshots]
        res: dict = {"args": vars(a), "corpus": {
            "tenants": a.tenants, "train": a.train, "measured": len(measured),
            "size_min": min(plain), "size_max": max(plain), "size_median": statistics.median(plain)}}
        rows = {"SQLite file": summary(plain, snap),
                "LTX snapshot (LZ4)": summary(snap, snap, restore_s=snapshot_restores(measured, snapshots, work))}
        res["dictionaries"] = []
        for level in levels:
            for dict_kib in [None, *dict_sizes]:
                t = time.perf_counter()
                r = bundle_config(measured, training, work, level, dict_kib)
                name = f"bundle zstd-{level}" + (f" + {dict_kib} KiB dictionary" if dict_kib else "")
                print(f"{name}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
                rows[name] = summary(r["sizes"], snap, r["write_s"], r["restore_s"])
                if dict_kib:
                    res["dictionaries"].append({k: r[k] for k in ("level", "dict_kib", "dict_bytes", "train_s")})
        res["rows"] = rows
        if a.hydrate:
            t = time.perf_counter()
            res["fleet"] = fleet_hydrations(measured[:a.hydrate], training, work, a.replica)
            print(f"fleet hydrations: {time.perf_counter() - t:.1f} s", file=sys.stderr)
        text = report(res)
        print(text)
        res["report"] = text
        if a.out:
            with open(a.out, "w") as f:
                json.dump(res, f, indent=2)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
