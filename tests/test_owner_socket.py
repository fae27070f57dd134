"""Every entry point reaches the tenant's owner: real ``tenantsync watch`` processes, and the
CLI and ``Client(config)`` of other processes calling through the fleet's control socket.

What shows a call went through the owner: the watch process logs each control-socket request
with the pid of the process that sent it (the kernel's peer credentials), so a line naming
the CLI's own pid can only come from that CLI talking to that watcher.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest

from tenantsync import config as configmod
from tenantsync.catalogue import TenantState, open_catalogue
from tenantsync.client import Client
from tenantsync.control import SUN_PATH_MAX, socket_path
from tenantsync.errors import InvalidArgument, NotATenant, StorageUnavailable, TenantSyncError
from tenantsync.ondemand import HOLDERS_WAIT, Busy
from tenantsync.server import error_body, error_from, status_of

from .dbutil import app_db, dump, wait_for, write_rows
from .test_fleet_celery import (
    children,  # noqa: F401 - fixture
    child_env,
    wait_worker_ready,
    worker_args,
    write_config,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Watch:
    """One ``tenantsync -v watch`` process, its stderr in a file of its own."""

    def __init__(self, tmp_path, config: str, env: dict, index: int):
        self.log = tmp_path / f"watch-{index}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "tenantsync", "-v", "watch", "--config", config],
                                         env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def served(self, pid: int, action: str, name: str) -> bool:
        """Whether this watcher answered ``POST /tenants/NAME/ACTION`` sent by process ``pid``."""
        return f'pid {pid} "POST /tenants/{name}/{action} HTTP/1.1" 200' in self.text()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)  # its own session: the group is the watcher and its children
        self.proc.wait(60)


@pytest.fixture
def fleet(tmp_path, file_url):
    """A fleet config (host-workers 1: the watcher is one process; idle-after long, so a
    tenant written during the test stays open in it), ``start()`` for watchers and ``cli``."""
    data = tmp_path / "data"
    data.mkdir()
    config = tmp_path / "tenantsync.yml"
    config.write_text(json.dumps({"replica": file_url, "globs": [f"{data}/*.db"], "host": "h1",
                                  "catalogue": f"sqlite:///{tmp_path}/cat.db", "idle-after": "10m",
                                  "host-workers": 1}))
    cfg = configmod.load(str(config), env={})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    watches: list[Watch] = []

    def start() -> Watch:
        watch = Watch(tmp_path, str(config), env, len(watches))
        watches.append(watch)
        return watch

    def cli(*args: str) -> tuple[subprocess.CompletedProcess, int, float]:
        """Run ``tenantsync -v ARGS --config FILE``: (its result, its pid, seconds it took)."""
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "tenantsync", "-v", *args, "--config", str(config)], env=env,
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=120)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid, time.monotonic() - t0

    yield cfg, data, start, cli
    for watch in watches:
        watch.stop()


def open_tenant(cfg, path, watch: Watch) -> list:
    """Write ``path`` until the watcher has shipped it and has it open; returns its rows."""
    conn = app_db(path)
    write_rows(conn, 10)
    conn.close()
    catalogue = open_catalogue(cfg)
    name = os.path.basename(path)
    assert wait_for(lambda: (t := catalogue.get(name)) is not None and (t.txid or 0) > 0
                    or watch.proc.poll() is not None, 30), watch.text()
    return dump(path)


def listening(cfg) -> bool:
    return os.path.exists(socket_path(cfg))


def test_cli_archive_hydrate_and_fork_go_to_the_running_watch(fleet):
    """With ``tenantsync watch`` running, ``tenantsync archive`` is answered by the watcher
    (its log names the CLI's pid), well within HOLDERS_WAIT (it holds the tenant open
    itself, so nothing waits for a release tick), with the same output as in-process;
    ``hydrate`` and ``fork`` likewise. stdout carries only the answer."""
    cfg, data, start, cli = fleet
    watch = start()
    path = str(data / "a.db")
    rows = open_tenant(cfg, path, watch)
    assert wait_for(lambda: listening(cfg), 30), watch.text()

    proc, pid, took = cli("archive", "a.db")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("archived a.db txid=0000000000000001 freed=") and proc.stdout.count("\n") == 1
    assert watch.served(pid, "archive", "a.db"), watch.text()
    assert "answered by the fleet's owner" in proc.stderr
    assert took < HOLDERS_WAIT
    assert not os.path.exists(path) and open_catalogue(cfg).get("a.db").state == TenantState.archived

    proc, pid, _ = cli("archive", "a.db")  # archived already: not an error, as in-process
    assert proc.returncode == 0 and proc.stdout == "tenant a.db: already archived\n", proc.stderr

    proc, pid, took = cli("hydrate", "a.db")
    assert proc.returncode == 0 and proc.stdout == f"{path}\n", proc.stderr
    assert watch.served(pid, "hydrate", "a.db") and took < HOLDERS_WAIT
    assert dump(path) == rows

    proc, pid, _ = cli("fork", "a.db", "b.db")
    assert proc.returncode == 0 and proc.stdout == f"{data / 'b.db'}\n", proc.stderr
    assert watch.served(pid, "fork", "b.db") and dump(str(data / "b.db")) == rows

    proc, pid, _ = cli("hydrate", "../x.db")  # refused by the owner: the same one line and status
    assert proc.returncode == 1 and proc.stdout == "" and "tenantsync: error:" in proc.stderr, proc.stderr
    assert f"pid {pid} " in watch.text()


def test_a_stale_socket_is_passed_over_and_replaced_and_a_live_one_kept(fleet):
    """A SIGKILLed watcher leaves its socket file: the CLI finds nobody listening and archives
    in its own process; the next watcher replaces the file and answers. A second watcher
    of the same fleet, started while that one lives, says so and leaves its socket alone."""
    cfg, data, start, cli = fleet
    first = start()
    path = str(data / "a.db")
    rows = open_tenant(cfg, path, first)
    assert wait_for(lambda: listening(cfg), 30), first.text()
    first.stop(signal.SIGKILL)
    assert listening(cfg)  # left behind

    proc, pid, _ = cli("archive", "a.db")
    assert proc.returncode == 0 and proc.stdout.startswith("archived a.db "), proc.stderr
    assert "no owner listens" in proc.stderr and "in this process" in proc.stderr

    second = start()
    assert wait_for(lambda: "control socket at" in second.text() or second.proc.poll() is not None, 30), second.text()
    held = os.stat(socket_path(cfg)).st_ino
    third = start()
    assert wait_for(lambda: "another live owner" in third.text() or third.proc.poll() is not None, 30), third.text()
    assert third.proc.poll() is None and os.stat(socket_path(cfg)).st_ino == held
    third.stop()
    assert os.stat(socket_path(cfg)).st_ino == held  # the one that did not own it leaves it

    proc, pid, _ = cli("hydrate", "a.db")
    assert proc.returncode == 0 and second.served(pid, "hydrate", "a.db"), (proc.stderr, second.text())
    assert dump(path) == rows
    second.stop()
    assert not listening(cfg)  # a clean stop takes its socket with it


def test_client_config_reaches_the_watch_or_runs_in_process(fleet):
    """``Client(config)`` in this process: through the running watcher (its log names this
    pid), and in-process once it has stopped; errors keep their type either way."""
    cfg, data, start, _ = fleet
    watch = start()
    path = str(data / "a.db")
    rows = open_tenant(cfg, path, watch)
    assert wait_for(lambda: listening(cfg), 30), watch.text()
    client = Client(cfg)
    answer = client.archive("a.db")
    assert answer["archived"] and answer["name"] == "a.db" and not os.path.exists(path)
    assert watch.served(os.getpid(), "archive", "a.db")
    assert client.hydrate("a.db") == path and watch.served(os.getpid(), "hydrate", "a.db")
    assert dump(path) == rows
    with pytest.raises(NotATenant):
        client.hydrate("sub/x.db")
    watch.stop()

    assert client.archive("a.db")["archived"] and not os.path.exists(path)  # no owner: in this process
    assert client.hydrate("a.db") == path and dump(path) == rows
    with pytest.raises(NotATenant):
        client.hydrate("sub/x.db")


def test_an_archival_by_a_process_that_does_not_reach_the_owner_waits_for_its_release_tick(fleet):
    """A process archiving without the socket (a watcher that found another owner holding
    it runs its own OnDemand) marks the tenant archiving; the watcher holding it open lets
    go at its next release tick (Fleet.release_archiving), within HOLDERS_WAIT, and the
    archival goes on instead of refusing with the watcher's pid."""
    from tenantsync.fleet import Fleet
    from tenantsync.ondemand import OnDemand, open_by_others
    from tenantsync.outcome import Archived

    cfg, data, start, _ = fleet
    watch = start()
    path = str(data / "a.db")
    open_tenant(cfg, path, watch)
    conn = app_db(path)
    write_rows(conn, 1)  # a write within idle-after: the watcher has it open
    conn.close()
    assert wait_for(lambda: watch.proc.pid in open_by_others([path]), 30), watch.text()
    fleet_here = Fleet(cfg)
    try:
        t0 = time.monotonic()
        outcome = OnDemand(fleet_here).archive("a.db")
        assert isinstance(outcome, Archived) and time.monotonic() - t0 < HOLDERS_WAIT, outcome
    finally:
        fleet_here.shutdown()
    assert not os.path.exists(path) and 'POST /tenants/a.db/archive' not in watch.text()


def test_cli_archive_in_fleet_mode_reaches_the_host_queue_worker(tmp_path, redis_server, children):  # noqa: F811
    """Celery mode: ``tenantsync watch`` listens on the socket too and sends the call to the
    tenant's host queue, whose worker archives it and answers."""
    config = write_config(tmp_path, redis_server.url, **{"idle-after": "10m"})
    cfg = configmod.load(config, env={})
    env = child_env(config)
    worker = children("w1", worker_args("w1"), env)
    wait_worker_ready(worker)
    watch = children("watch", [sys.executable, "-m", "tenantsync", "-v", "watch", "--config", config], env)
    path = str(tmp_path / "data" / "a.db")
    conn = app_db(path)
    write_rows(conn, 10)
    conn.close()
    rows = dump(path)
    catalogue = open_catalogue(cfg)
    assert wait_for(lambda: (t := catalogue.get("a.db")) is not None and (t.txid or 0) > 0, 60), worker.tail()
    assert wait_for(lambda: listening(cfg), 30), watch.tail()

    proc = subprocess.Popen([sys.executable, "-m", "tenantsync", "-v", "archive", "a.db", "--config", config],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.startswith("archived a.db "), err
    assert f'pid {proc.pid} "POST /tenants/a.db/archive HTTP/1.1" 200' in watch.log(), watch.tail()
    assert wait_for(lambda: "tenantsync.archive[" in worker.log() and "succeeded" in worker.log(), 10), worker.tail()
    assert not os.path.exists(path) and catalogue.get("a.db").state == TenantState.archived

    proc = subprocess.run([sys.executable, "-m", "tenantsync", "hydrate", "a.db", "--config", config], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == f"{path}\n" and dump(path) == rows, proc.stderr

    # A fork at a time: the time crosses the broker as text, and the worker restores at it.
    now = datetime.now(timezone.utc).isoformat()
    proc = subprocess.Popen([sys.executable, "-m", "tenantsync", "fork", "a.db", "b.db", "--timestamp", now,
                             "--config", config], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    fork = str(tmp_path / "data" / "b.db")
    assert proc.returncode == 0 and out == f"{fork}\n" and dump(fork) == rows, err
    assert f'pid {proc.pid} "POST /tenants/b.db/fork HTTP/1.1" 200' in watch.log(), watch.tail()


# -- the pieces -----------------------------------------------------------------------------


@pytest.mark.parametrize("error", [NotATenant("tenant x: unknown"), StorageUnavailable("s3: timed out"),
                                   InvalidArgument("not a number", argument="txid"), Busy("tenant x: busy"),
                                   TenantSyncError("something")])
def test_an_error_answer_comes_back_as_its_type(error):
    back = error_from(status_of(error), error_body(error))
    assert type(back) is type(error) and str(back) == str(error)


def test_an_error_of_a_type_not_loaded_here_comes_back_by_its_status():
    assert type(error_from(404, {"error": "gone", "type": "SomethingNew"})) is NotATenant
    assert type(error_from(409, {"error": "no"})) is TenantSyncError


def test_the_socket_path_fits_a_socket_address_and_differs_by_fleet_and_host(tmp_path):
    base = configmod.Config(replica=(tmp_path / ("r" * 200)).as_uri())
    paths = {socket_path(base), socket_path(base.with_overrides(host="other")),
             socket_path(base.with_overrides(replica=(tmp_path / "s").as_uri()))}
    assert len(paths) == 3 and all(len(os.fsencode(p)) <= SUN_PATH_MAX for p in paths)


def test_a_state_directory_that_cannot_hold_the_socket_leaves_the_fleet_running(tmp_path, monkeypatch):
    """A read-only or foreign state directory (here a file where it should be): the owner
    says so and runs without a socket, and a caller finds no owner and runs in-process."""
    from tenantsync import control

    (tmp_path / "state").write_text("not a directory")
    monkeypatch.setattr(control, "FLEETS_DIR", str(tmp_path / "state" / "fleets"))
    cfg = configmod.Config(replica=(tmp_path / "replica").as_uri())
    said = []
    assert control.listen(lambda path: pytest.fail("bound a socket"), cfg, said.append) is None
    assert len(said) == 1 and said[0].startswith(f"no control socket at {socket_path(cfg)}: "), said
    with pytest.raises(control.NoOwner):
        control.connect(socket_path(cfg), 1.0)
