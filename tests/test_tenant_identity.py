"""Issue 19: never act on the wrong database, through the entry points users call.

Each test drives the real command line or the real HTTP API of `tenantsync serve` (a
subprocess) over real SQLite files and file:// replicas, and checks the files on disk,
the replicas' content (restored) and the catalogue afterwards. Findings 1-4.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tenantsync.catalogue import Catalogue, TenantState
from tenantsync.config import Config
from tenantsync.replica import Replica
from tenantsync.restore import restore
from tenantsync.storage import open_storage

from .dbutil import app_db, dump, wait_for, write_rows
from .test_bad_input import _env, one_line_error, tenantsync
from .test_server import _up, call, free_port


def cli_env(home: Path) -> dict:
    """The CLI's environment with its own HOME: the default catalogue lives under it."""
    return _env() | {"HOME": str(home)}


def l0_files(replica_dir: Path, name: str) -> list[str]:
    level = replica_dir / name / "ltx" / "0"
    return sorted(os.listdir(level)) if level.is_dir() else []


def watch_until_shipped(app: Path, env: dict, extra: list[str], name: str = "app.db") -> None:
    """`tenantsync watch` (the README's first command) until NAME's newest commit is in
    the replica, then a clean stop."""
    before = len(l0_files(app / "replica", name))
    proc = subprocess.Popen([sys.executable, "-m", "tenantsync", "watch", f"{app}/data/*.db",
                             "--replica", f"file://{app}/replica", *extra],
                            env=env, cwd=app, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: len(l0_files(app / "replica", name)) > before, 60), proc.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stderr.read()


def replica_state(replica_dir: Path, name: str, tmp: Path) -> list:
    out = tmp / f"restored-{os.urandom(4).hex()}.db"
    restore(Replica(open_storage(f"file://{replica_dir}/{name}")), str(out))
    return dump(str(out))


@pytest.fixture(params=["default", "shared-sqlite", "shared-postgresql"])
def catalogue_args(request, tmp_path) -> list[str]:
    """How the two apps find their catalogue: each its default, or one given to both."""
    if request.param == "default":
        return []
    if request.param == "shared-sqlite":
        return ["--catalogue", f"sqlite:///{tmp_path}/shared-catalogue.db"]
    return ["--catalogue", request.getfixturevalue("pg_database")]


def test_1_archiving_one_apps_tenant_never_touches_another_apps_database(tmp_path, catalogue_args):
    """Two apps, each run with the README's first command, both with a tenant app.db.
    B's app writes once more after the watchers stopped (its WAL checkpointed away); then
    `tenantsync archive app.db --replica <A's replica>` archives A's app.db: B's file
    stays, with its data, and A's replica holds A's data, not B's."""
    env = cli_env(tmp_path / "home")
    apps = {}
    for app in ("a", "b"):
        (tmp_path / app / "data").mkdir(parents=True)
        conn = app_db(tmp_path / app / "data" / "app.db")
        write_rows(conn, 10 if app == "a" else 30)
        conn.close()
        watch_until_shipped(tmp_path / app, env, catalogue_args)
        apps[app] = tmp_path / app
    b_db = apps["b"] / "data" / "app.db"
    conn = sqlite3.connect(b_db)
    conn.execute("INSERT INTO t(v) VALUES (randomblob(100))")
    conn.commit()
    conn.close()  # the last connection: SQLite checkpoints and removes the WAL
    a_state, b_state = dump(str(apps["a"] / "data" / "app.db")), dump(str(b_db))
    b_files = l0_files(apps["b"] / "replica", "app.db")

    listed = tenantsync("tenants", "--replica", f"file://{apps['a']}/replica", "--json", *catalogue_args,
                        cwd=apps["a"], env=env)
    assert listed.returncode == 0, listed.stderr
    assert [(r["name"], r["path"]) for r in json.loads(listed.stdout)] == [("app.db", str(apps["a"] / "data/app.db"))]

    proc = tenantsync("archive", "app.db", "--replica", f"file://{apps['a']}/replica", *catalogue_args,
                      cwd=apps["a"], env=env)
    assert proc.returncode == 0, proc.stderr
    assert b_db.exists() and dump(str(b_db)) == b_state
    assert l0_files(apps["b"] / "replica", "app.db") == b_files
    assert not (apps["a"] / "data" / "app.db").exists()
    assert replica_state(apps["a"] / "replica", "app.db", tmp_path) == a_state


def test_1_a_row_at_another_path_is_refused_naming_row_path_and_replica(tmp_path):
    """The catalogue row, the path the fleet's globs give and the replica must belong
    together before anything is written or deleted."""
    data, replica = tmp_path / "data", tmp_path / "replica"
    data.mkdir()
    (tmp_path / "elsewhere").mkdir()
    conn = app_db(tmp_path / "elsewhere" / "app.db")
    write_rows(conn, 5)
    conn.close()
    app_db(data / "app.db").close()
    cfg = Config(replica=f"file://{replica}", globs=(f"{data}/*.db",), catalogue=f"sqlite:///{tmp_path}/cat.db")
    Catalogue(cfg.catalogue, fleet=cfg.fleet).discover("app.db", str(tmp_path / "elsewhere" / "app.db"), "h")
    (tmp_path / "tenantsync.yml").write_text(
        f"replica: file://{replica}\ncatalogue: sqlite:///{tmp_path}/cat.db\nglobs: ['{data}/*.db']\nhost: h\n")
    for args in (("archive", "app.db"), ("hydrate", "app.db")):
        proc = tenantsync(*args, "--config", tmp_path / "tenantsync.yml", cwd=tmp_path)
        one_line_error(proc, str(tmp_path / "elsewhere" / "app.db"), str(data / "app.db"), str(replica))
    assert (tmp_path / "elsewhere" / "app.db").exists() and (data / "app.db").exists()
    assert not replica.exists()

    # Under another host name the row is that host's tenant: archiving it here is refused,
    # naming the host (a hydration here would move it here, from its replica).
    (tmp_path / "other.yml").write_text(
        f"replica: file://{replica}\ncatalogue: sqlite:///{tmp_path}/cat.db\nglobs: ['{data}/*.db']\nhost: other\n")
    proc = tenantsync("archive", "app.db", "--config", tmp_path / "other.yml", cwd=tmp_path)
    one_line_error(proc, "host h", "not this host (other)", str(replica))
    assert (tmp_path / "elsewhere" / "app.db").exists() and (data / "app.db").exists()
    assert not replica.exists()


# -- the HTTP API -------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path):
    """`tenantsync serve` over data/*.db and data/*/*.db, with c.db replicated; a SQLite
    file in data/private/ the globs do not match; data/lnk -> ../outside with o.db."""
    d = tmp_path
    for sub in ("data/private", "outside"):
        (d / sub).mkdir(parents=True)
    for path in (d / "data" / "c.db", d / "data" / "private" / "secret.sqlite", d / "outside" / "o.db"):
        conn = app_db(path)
        write_rows(conn, 5)
        conn.close()
    os.symlink("../outside", d / "data" / "lnk")
    port = free_port()
    cfg = Config(replica=f"file://{d}/replica", globs=(f"{d}/data/*.db", f"{d}/data/*/*.db"),
                 catalogue=f"sqlite:///{d}/cat.db")
    proc = subprocess.Popen([sys.executable, "-m", "tenantsync", "serve", *cfg.globs, "--replica", cfg.replica,
                             "--catalogue", cfg.catalogue, "--listen", f"127.0.0.1:{port}"],
                            env=_env(), cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    catalogue = Catalogue(cfg.catalogue, fleet=cfg.fleet)
    try:
        assert wait_for(lambda: (t := catalogue.get("c.db")) is not None and t.txid >= 1, 60)
        yield d, base, catalogue, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_2_only_tenants_of_the_globs_are_hydrated_or_archived(served):
    d, base, catalogue, _ = served
    contents = {p: p.read_bytes() for p in (d / "data/private/secret.sqlite", d / "outside/o.db")}
    for name, status in (("private/secret.sqlite", 404), ("lnk/o.db", 404), ("..%2Foutside%2Fo.db", 400),
                         ("%2E%2E/outside/o.db", 400)):
        for action in ("hydrate", "archive"):
            code, body = call(base + f"/tenants/{name}/{action}", "POST", b"{}")
            assert code == status and "error" in body, (name, action, code, body)
    assert {p: p.read_bytes() for p in contents} == contents
    assert [t.name for t in catalogue.records()] == ["c.db"]
    assert not (d / "replica" / "private").exists() and not (d / "replica" / "lnk").exists()


def test_3_a_bad_hydrate_body_is_a_400_and_leaves_the_tenant_as_it_was(served):
    d, base, catalogue, _ = served
    assert call(base + "/tenants/c.db/archive", "POST")[0] == 200
    for body in (b'{"txid": 1.5}', b'{"timestamp": "2030-01-01T00:00:00"}', b'{"timestamp": 12345}',
                 b'{"txid": "zz"}', b'{"txid": true}', b'{"txid": 18446744073709551616}', b'[1]', b'{"tx": 1}',
                 b'not json'):
        code, answer = call(base + "/tenants/c.db/hydrate", "POST", body)
        assert code == 400 and "error" in answer, (body, code, answer)
        assert catalogue.get("c.db").state is TenantState.archived
    code, answer = call(base + "/tenants/c.db/hydrate", "POST", b'{"txid": "1"}')  # the CLI's spelling
    assert code == 200 and answer["restored"] is True and answer["state"] == "active"
    assert call(base + "/tenants/c.db/archive", "POST")[0] == 200


def test_3_a_mark_left_by_a_dead_process_is_undone_at_start_up(tmp_path):
    """A tenant left `hydrating` (as a process killed mid-hydration, or a failed request of
    an older version, left it) is back to `archived` when `serve` starts, and hydrates at
    once instead of answering 409 after two minutes."""
    d = tmp_path
    (d / "data").mkdir()
    conn = app_db(d / "data" / "c.db")
    write_rows(conn, 5)
    conn.close()
    cfg = Config(replica=f"file://{d}/replica", globs=(f"{d}/data/*.db",), catalogue=f"sqlite:///{d}/cat.db")
    proc = tenantsync("archive", "c.db", "--replica", cfg.replica, "--catalogue", cfg.catalogue, cwd=d)
    assert proc.returncode == 1  # not discovered yet: refused, nothing touched
    watch_until_shipped(d, _env(), ["--catalogue", cfg.catalogue], name="c.db")
    assert tenantsync("archive", "c.db", "--replica", cfg.replica, "--catalogue", cfg.catalogue,
                      cwd=d).returncode == 0
    catalogue = Catalogue(cfg.catalogue, fleet=cfg.fleet)
    assert catalogue.transition("c.db", TenantState.hydrating, expected={TenantState.archived})
    port = free_port()
    serve = subprocess.Popen([sys.executable, "-m", "tenantsync", "serve", *cfg.globs, "--replica", cfg.replica,
                              "--catalogue", cfg.catalogue, "--listen", f"127.0.0.1:{port}"],
                             env=_env(), cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: catalogue.get("c.db").state is TenantState.archived, 30)
        # The mark is undone before the API listens: wait for it to answer.
        assert wait_for(lambda: _up(base), 30)
        code, answer = call(base + "/tenants/c.db/hydrate", "POST", b"{}")
        assert code == 200 and answer["restored"] is True
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)


def test_4_unknown_names_leave_no_rows(served):
    d, base, catalogue, _ = served
    for i in range(50):
        code, body = call(base + f"/tenants/nobody{i}.db/hydrate", "POST", b"{}")
        assert code == 404 and "no LTX files" in body["error"], body
    assert call(base + "/tenants/c.db%0A/hydrate", "POST", b"{}")[0] == 400
    assert call(base + "/tenants/c.db%0A", "GET")[0] == 400
    assert [t.name for t in catalogue.records()] == ["c.db"]
    assert sorted(os.listdir(d / "data")) == ["c.db", "c.db-shm", "c.db-wal", "lnk", "private"]
