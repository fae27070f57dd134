"""``--log-format json``: every line a fleet writes is one JSON object, and lines logged by a
tenant's job name the tenant and the job, in the watcher and in its shard children."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from .dbutil import app_db, wait_for, write_rows
from .test_server import ROOT


def test_json_logs_name_the_tenant_and_the_job_on_every_line_of_a_job(tmp_path, file_url):
    data = tmp_path / "data"
    data.mkdir()
    names = [f"t{i}.db" for i in range(6)]
    env = dict(os.environ, PYTHONPATH=ROOT)
    with open(tmp_path / "watch.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tenantsync", "--log-format", "json", "-v", "watch",
                                 f"{data}/*.db", "--replica", file_url, "--catalogue", f"sqlite:///{tmp_path}/cat.db"],
                                env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=log,
                                start_new_session=True)
    try:
        time.sleep(1)
        for name in names:
            write_rows(conn := app_db(data / name), 3)
            conn.close()
        assert wait_for(lambda: (tmp_path / "watch.log").read_text().count("writing full-page L0") >= len(names), 60)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    lines = [json.loads(line) for line in (tmp_path / "watch.log").read_text().splitlines() if line.strip()]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    first_l0 = [line for line in lines if "writing full-page L0" in line["message"]]
    assert {line["tenant"] for line in first_l0} == set(names)
    assert all(line["job"] == "sync" for line in first_l0)
    assert any(line.get("process", "").startswith("tenantsync-shard-") for line in first_l0)  # a child's too


def test_restore_draws_a_progress_bar_on_a_terminal_only(tmp_path, file_url):
    import fcntl
    import pty
    import struct
    import termios

    from tenantsync.catalogue import open_catalogue
    from tenantsync.fleet import Fleet

    from .test_fleet_embedded import fleet_config, tenant_dbs

    (tmp_path / "data").mkdir()
    cfg = fleet_config(tmp_path, file_url)
    fleet = Fleet(cfg, open_catalogue(cfg))
    paths, conns = tenant_dbs(tmp_path, ["a.db"], rows=2000)
    fleet.catalogue.discover("a.db", paths["a.db"], cfg.host)
    assert fleet.sync("a.db").txid == 1
    fleet.close()
    conns["a.db"].close()
    command = [sys.executable, "-m", "tenantsync", "restore", "--replica", f"{file_url}/a.db"]
    env = dict(os.environ, PYTHONPATH=ROOT)

    piped = subprocess.run([*command, "-o", str(tmp_path / "piped.db")], env=env, capture_output=True, text=True,
                           timeout=60)
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr

    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal has a width
    proc = subprocess.Popen([*command, "-o", str(tmp_path / "tty.db")], env=env, stdout=subprocess.DEVNULL,
                            stderr=secondary)
    os.close(secondary)
    drawn = b""
    try:
        while chunk := os.read(primary, 65536):  # read as it is drawn
            drawn += chunk
    except OSError:  # EIO: the terminal's other end closed
        pass
    os.close(primary)
    assert proc.wait(60) == 0
    assert b"restore tty.db" in drawn and b"100%" in drawn, drawn
