"""Progress bars of long CLI work: drawn on a terminal only, never in a pipe or a log.

The commands run as a user runs them, with stderr on a pseudo-terminal (pty) or a pipe.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from datetime import timedelta

import pytest

from tenantsync.catalogue import TenantState, open_catalogue
from tenantsync.config import Config
from tenantsync.fleet import Fleet

from .dbutil import app_db, dump, write_rows
from .test_server import ROOT

NAMES = ("a.db", "b.db", "c.db")


@pytest.fixture
def config(tmp_path, file_url):
    """Three replicated tenants, their connections closed; the path of their tenantsync.yml."""
    data = tmp_path / "data"
    data.mkdir()
    cfg = Config(replica=file_url, globs=(f"{data}/*.db",), catalogue=f"sqlite:///{tmp_path}/cat.db", host="h1",
                 idle_after=timedelta(seconds=1))
    fleet = Fleet(cfg, open_catalogue(cfg))
    for name in NAMES:
        conn = app_db(str(data / name))
        write_rows(conn, 200)
        conn.close()
        fleet.catalogue.discover(name, str(data / name), "h1")
        fleet.sync(name)
    fleet.close()
    path = tmp_path / "tenantsync.yml"
    path.write_text(json.dumps({"replica": file_url, "globs": [f"{data}/*.db"], "host": "h1",
                                "catalogue": cfg.catalogue}))
    return path


def run(args: list[str], terminal: bool) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``tenantsync ARGS``, stderr on a pty if ``terminal``."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "tenantsync", *args]
    if not terminal:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        return proc.returncode, proc.stdout, proc.stderr
    main, child = pty.openpty()
    # A fresh pty is 0 columns wide, where tqdm draws nothing: size it as a terminal window.
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=child, text=True)
    os.close(child)
    drawn = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the child's end is closed
            break
        if not chunk:
            break
        drawn += chunk
    os.close(main)
    out = proc.stdout.read()
    return proc.wait(120), out, drawn.decode(errors="replace")


def test_archive_of_many_and_hydrate_draw_bars_on_a_terminal(config, tmp_path):
    status, out, err = run(["archive", *NAMES, "--config", str(config)], terminal=True)
    assert status == 0, err
    assert out.splitlines() == [line for line in out.splitlines() if line.startswith("archived ")]
    assert len(out.splitlines()) == 3
    assert "archive 3 tenants" in err and "3/3" in err, err

    status, out, err = run(["hydrate", "b.db", "--config", str(config)], terminal=True)
    assert status == 0, err
    assert out.strip() == str(tmp_path / "data" / "b.db")
    assert "hydrate b.db" in err and "100%" in err, err

    status, out, err = run(["fork", "b.db", "d.db", "--config", str(config)], terminal=True)
    assert status == 0, err
    assert "fork b.db as d.db" in err and "100%" in err, err
    assert dump(str(tmp_path / "data" / "d.db")) == dump(str(tmp_path / "data" / "b.db"))


def test_no_bar_in_a_pipe_and_one_failing_tenant_does_not_stop_the_others(config, tmp_path):
    status, out, err = run(["archive", "a.db", "nobody.db", "c.db", "--config", str(config)], terminal=False)
    assert status == 1
    assert [line.split()[1] for line in out.splitlines()] == ["a.db", "c.db"]
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tenantsync: error: ") and "nobody.db" in lines[0], err
    raw = json.loads(config.read_text())
    catalogue = open_catalogue(Config(replica=raw["replica"], catalogue=raw["catalogue"], host="h1"))
    assert {n: catalogue.get(n).state for n in ("a.db", "b.db", "c.db")} == {
        "a.db": TenantState.archived, "b.db": TenantState.active, "c.db": TenantState.archived}

    status, out, err = run(["hydrate", "a.db", "--config", str(config)], terminal=False)
    assert status == 0 and err == "", err
