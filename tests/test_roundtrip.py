"""Property: whatever an application does to its database, every TXID shipped restores
to exactly the content the database had when that TXID was shipped.

Hypothesis draws a random schema (1-4 tables of random column types, some indexes), a
page size, and a random workload: insert batches (BLOBs and TEXT of random sizes, up to
overflow chains), updates, range deletes, CREATE/DROP TABLE/INDEX, VACUUM (the page
count shrinks), the application's own ``wal_checkpoint(PASSIVE|TRUNCATE)``, reconnects
of the application (closing the last connection checkpoints and deletes the WAL), our
``checkpoint()``/``checkpoint(truncate=True)``, ``release()`` or an abandoned Capture
followed by a fresh one with the saved position or none, and sync passes in between.
After every pass that ships a TXID the database's logical content is recorded; at the
end a restore at every recorded TXID must give that content and pass integrity_check.

The default runs are sized to keep this module well under a minute; the ``soak``
variants (``pytest -m soak tests/test_roundtrip.py``) run many more examples.
"""

from __future__ import annotations

import os
import random
import sqlite3
import tempfile
import uuid
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from tenantsync.capture import Capture
from tenantsync.replica import Replica
from tenantsync.restore import restore
from tenantsync.storage import open_storage

from .dbutil import app_db, dump

PAGE_SIZES = (512, 1024, 4096, 65536)
COLUMN_TYPES = ("INTEGER", "REAL", "TEXT", "BLOB", "NUMERIC", "")
ALPHABET = "abcdefghijklmnopqrstuvwxyz ÄÖÜßéλ€😀0123456789"
# Rows of one insert step together stay below this, so big BLOBs come in small batches.
MAX_BATCH_BYTES = 400_000

COMMON = dict(
    deadline=None,
    database=None,  # no .hypothesis/ directory in the work tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- strategies ------------------------------------------------------------------------

table_strategy = st.lists(st.sampled_from(COLUMN_TYPES), min_size=1, max_size=5)
blob_size = st.one_of(
    st.integers(0, 64),
    st.integers(0, 4_000),
    st.integers(0, 100_000),  # overflow chains even with 64 KiB pages
)
seed = st.integers(0, 2**32 - 1)
pick = st.integers(0, 1_000)

_WEIGHTED_STEPS = [
    (6, st.tuples(st.just("insert"), seed, st.integers(1, 80), blob_size)),
    (2, st.tuples(st.just("update"), seed, blob_size)),
    (2, st.tuples(st.just("delete"), seed)),
    (1, st.tuples(st.just("create_table"), table_strategy)),
    (1, st.tuples(st.just("drop_table"), pick)),
    (1, st.tuples(st.just("create_index"), pick, pick, st.booleans())),
    (1, st.tuples(st.just("drop_index"), pick)),
    (1, st.tuples(st.just("vacuum"))),
    (1, st.tuples(st.just("app_checkpoint"), st.sampled_from(["PASSIVE", "TRUNCATE"]))),
    (1, st.tuples(st.just("app_reconnect"))),
    (2, st.tuples(st.just("checkpoint"), st.booleans())),
    (1, st.tuples(st.just("release"), st.booleans())),
    (1, st.tuples(st.just("abandon"), st.booleans())),
    (6, st.tuples(st.just("sync"))),
]
step_strategy = st.one_of([s for weight, s in _WEIGHTED_STEPS for _ in range(weight)])


@st.composite
def scenarios(draw, max_steps: int = 40, page_sizes=PAGE_SIZES):
    page_size = draw(st.sampled_from(page_sizes))
    schema = draw(st.lists(table_strategy, min_size=1, max_size=4))
    indexes = draw(st.lists(st.tuples(pick, pick, st.booleans()), max_size=3))
    # Small thresholds make sync_once checkpoint (and truncate) on its own as well.
    checkpoint_pages = draw(st.sampled_from([1000, 40, 8]))
    truncate_pages = draw(st.sampled_from([121359, 200, 30]))
    steps = draw(st.lists(step_strategy, min_size=max(1, max_steps // 3), max_size=max_steps))
    return Scenario(page_size, schema, indexes, checkpoint_pages, truncate_pages, steps)


@dataclass
class Scenario:
    page_size: int
    schema: list
    indexes: list
    checkpoint_pages: int
    truncate_pages: int
    steps: list


# -- the application model ----------------------------------------------------------------


@dataclass
class Table:
    name: str
    columns: list  # [(name, type)]


@dataclass
class App:
    """The application: one connection, and what it created (to aim steps at)."""

    path: str
    page_size: int
    conn: sqlite3.Connection = None
    tables: list = field(default_factory=list)
    indexes: list = field(default_factory=list)
    counter: int = 0

    def connect(self) -> None:
        self.conn = sqlite3.connect(self.path, isolation_level=None)
        # Our capture holds a read mark: an app TRUNCATE checkpoint would wait the whole
        # busy timeout for it, then report busy. Keep that wait short.
        self.conn.execute("PRAGMA busy_timeout=20")

    def fresh_name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def create_table(self, types: list) -> None:
        name = self.fresh_name("tbl")
        columns = [(f"c{i}", t) for i, t in enumerate(types)]
        cols = ", ".join(f"{c} {t}".strip() for c, t in columns)
        self.conn.execute(f'CREATE TABLE "{name}" (id INTEGER PRIMARY KEY, {cols})')
        self.tables.append(Table(name, columns))

    def create_index(self, table_pick: int, column_pick: int, unique: bool) -> None:
        if not self.tables:
            return
        table = self.tables[table_pick % len(self.tables)]
        column = table.columns[column_pick % len(table.columns)][0]
        name = self.fresh_name("idx")
        # A UNIQUE index over the rowid and a column can always be built.
        what = f"{column}, id" if unique else column
        self.conn.execute(
            f'CREATE {"UNIQUE " if unique else ""}INDEX "{name}" ON "{table.name}"({what})'
        )
        self.indexes.append((name, table.name))

    def drop_index(self, index_pick: int) -> None:
        if self.indexes:
            name, _ = self.indexes.pop(index_pick % len(self.indexes))
            self.conn.execute(f'DROP INDEX "{name}"')

    def drop_table(self, table_pick: int) -> None:
        if self.tables:
            table = self.tables.pop(table_pick % len(self.tables))
            self.conn.execute(f'DROP TABLE "{table.name}"')
            self.indexes = [ix for ix in self.indexes if ix[1] != table.name]

    def insert(self, seed: int, n: int, max_size: int) -> None:
        if not self.tables:
            return
        rng = random.Random(seed)
        table = rng.choice(self.tables)
        n = max(1, min(n, MAX_BATCH_BYTES // max(1, max_size)))
        rows = [tuple(value(rng, t, max_size) for _, t in table.columns) for _ in range(n)]
        marks = ", ".join("?" for _ in table.columns)
        names = ", ".join(c for c, _ in table.columns)
        self.conn.execute("BEGIN")
        self.conn.executemany(f'INSERT INTO "{table.name}" ({names}) VALUES ({marks})', rows)
        self.conn.execute("COMMIT")

    def update(self, seed: int, max_size: int) -> None:
        if not self.tables:
            return
        rng = random.Random(seed)
        table = rng.choice(self.tables)
        column, coltype = rng.choice(table.columns)
        modulus = rng.randint(1, 5)
        rows = self.conn.execute(
            f'SELECT id FROM "{table.name}" WHERE id % ? = 0', (modulus,)
        ).fetchall()
        rows = rows[: max(1, MAX_BATCH_BYTES // max(1, max_size))]
        self.conn.execute("BEGIN")
        self.conn.executemany(
            f'UPDATE "{table.name}" SET {column} = ? WHERE id = ?',
            [(value(rng, coltype, max_size), rowid) for (rowid,) in rows],
        )
        self.conn.execute("COMMIT")

    def delete(self, seed: int) -> None:
        if not self.tables:
            return
        rng = random.Random(seed)
        table = rng.choice(self.tables)
        hi = self.conn.execute(f'SELECT max(id) FROM "{table.name}"').fetchone()[0] or 0
        lo = rng.randint(0, hi)
        self.conn.execute(
            f'DELETE FROM "{table.name}" WHERE id BETWEEN ? AND ?', (lo, lo + rng.randint(0, hi))
        )


def value(rng: random.Random, coltype: str, max_size: int):
    if rng.random() < 0.05:
        return None
    kind = coltype or rng.choice(("INTEGER", "REAL", "TEXT", "BLOB"))
    if kind == "NUMERIC":
        kind = rng.choice(("INTEGER", "REAL", "TEXT"))
    size = rng.randint(0, max_size)
    if kind == "INTEGER":
        return rng.choice((rng.randint(-1000, 1000), rng.randint(-(2**63), 2**63 - 1)))
    if kind == "REAL":
        return rng.uniform(-1e12, 1e12)
    if kind == "TEXT":
        return "".join(rng.choices(ALPHABET, k=min(size, 20_000)))
    return rng.randbytes(size)


# -- the property ---------------------------------------------------------------------------


def integrity(path: str) -> list:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()


def run_scenario(sc: Scenario, workdir: str, replica_url: str) -> None:
    note(f"page_size={sc.page_size} checkpoint_pages={sc.checkpoint_pages} truncate_pages={sc.truncate_pages}")
    db = os.path.join(workdir, "app.db")
    app = App(db, sc.page_size)
    app_db(db, page_size=sc.page_size).close()  # page size and WAL mode set before any table
    app.connect()
    app.conn.execute('DROP TABLE "t"')  # app_db's own table: the schema here is drawn
    for types in sc.schema:
        app.create_table(types)
    for table_pick, column_pick, unique in sc.indexes:
        app.create_index(table_pick, column_pick, unique)
    assert app.conn.execute("PRAGMA page_size").fetchone()[0] == sc.page_size

    replica = Replica(open_storage(replica_url))
    positions: list = []
    recorded: dict[int, list] = {}

    def new_capture(position=None) -> Capture:
        return Capture(
            db,
            replica,
            position=position,
            checkpoint_pages=sc.checkpoint_pages,
            truncate_pages=sc.truncate_pages,
            checkpoint_gap=0,  # every pass past the threshold checkpoints, whatever the timing
            on_position=positions.append,
        )

    def record(result, step) -> None:
        if result.txid is None:
            return
        note(f"{step!r} -> txid {result.txid} pages={result.pages} full={result.full!r}")
        if result.full and result.txid > 1:
            event(f"full-page L0: {result.full}")
        assert result.txid not in recorded, f"txid {result.txid} shipped twice"
        assert result.txid == max(recorded, default=0) + 1, "TXIDs must be consecutive"
        recorded[result.txid] = dump(db)

    cap = new_capture()
    record(cap.sync_once(), ("initial sync",))
    try:
        for step in sc.steps:
            kind, *args = step
            if kind == "insert":
                app.insert(*args)
            elif kind == "update":
                app.update(*args)
            elif kind == "delete":
                app.delete(*args)
            elif kind == "create_table":
                app.create_table(*args)
            elif kind == "drop_table":
                app.drop_table(*args)
            elif kind == "create_index":
                app.create_index(*args)
            elif kind == "drop_index":
                app.drop_index(*args)
            elif kind == "vacuum":
                app.conn.execute("VACUUM")
            elif kind == "app_checkpoint":
                app.conn.execute(f"PRAGMA wal_checkpoint({args[0]})").fetchall()
            elif kind == "app_reconnect":
                app.conn.close()
                app.connect()
            elif kind == "checkpoint":
                record(cap.checkpoint(truncate=args[0]), step)
            elif kind == "release":
                record(cap.release(), step)
                cap = new_capture(positions[-1] if args[0] and positions else None)
            elif kind == "abandon":  # the process died: no release, just its handles gone
                cap.close()
                cap = new_capture(positions[-1] if args[0] and positions else None)
            elif kind == "sync":
                record(cap.sync_once(), step)
            else:  # pragma: no cover
                raise AssertionError(kind)
        record(cap.sync_once(), ("final sync",))
        final = dump(db)
    finally:
        cap.close()
        app.conn.close()

    assert recorded, "nothing was ever shipped"
    event(f"TXIDs shipped: {'1' if len(recorded) == 1 else '2-5' if len(recorded) <= 5 else '6-15' if len(recorded) <= 15 else '16+'}")
    assert recorded[max(recorded)] == final
    assert [f.max_txid for f in replica.files(0)] == sorted(recorded)
    outdir = os.path.join(workdir, "restored")
    for txid, expected in recorded.items():
        out = os.path.join(outdir, f"{txid}.db")
        result = restore(replica, out, txid=txid)
        assert result.txid == txid
        assert integrity(out) == [("ok",)], f"txid {txid}"
        assert dump(out) == expected, f"txid {txid}: restored content differs"
    latest = os.path.join(outdir, "latest.db")
    assert restore(replica, latest).txid == max(recorded)
    assert dump(latest) == final


def check_on_file(sc: Scenario) -> None:
    with tempfile.TemporaryDirectory(prefix="tenantsync-roundtrip-") as d:
        run_scenario(sc, d, f"file://{d}/replica")


def check_on_s3(sc: Scenario, s3_server: str, s3_client) -> None:
    bucket = f"roundtrip-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/db?endpoint={s3_server}&region=us-east-1&forcePathStyle=true"
    with tempfile.TemporaryDirectory(prefix="tenantsync-roundtrip-") as d:
        run_scenario(sc, d, url)


@settings(max_examples=80, **COMMON)
@given(scenarios())
def test_every_shipped_txid_restores_to_its_content_on_file(sc):
    check_on_file(sc)


@settings(max_examples=10, **COMMON)
@given(scenarios(max_steps=12, page_sizes=(512, 4096)))
def test_every_shipped_txid_restores_to_its_content_on_s3(s3_server, s3_client, sc):
    check_on_s3(sc, s3_server, s3_client)


@pytest.mark.soak
@settings(max_examples=1500, **COMMON)
@given(scenarios(max_steps=60))
def test_soak_every_shipped_txid_restores_to_its_content_on_file(sc):
    check_on_file(sc)


@pytest.mark.soak
@settings(max_examples=150, **COMMON)
@given(scenarios(max_steps=40))
def test_soak_every_shipped_txid_restores_to_its_content_on_s3(s3_server, s3_client, sc):
    check_on_s3(sc, s3_server, s3_client)
