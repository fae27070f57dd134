"""Bad configuration and flag values through the real command line.

A value of the wrong type, out of bounds or not understood must stop the command with
one line naming the key (or flag, or environment variable) and the value, before
anything starts or is written: no catalogue, no replica, no child process, nothing
beside the tenants. (tests/test_config.py checks each key's rules on ``from_dict``.)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from .dbutil import app_db, write_rows
from .test_bad_input import one_line_error, tenantsync

# One more process than host-workers may ask for: the error must come before any starts.
OVER_CPU_CAP = (os.cpu_count() or 1) * 2 + 1
# A value wrongly accepted lets ``watch`` run on: it is killed after this long, and the
# test fails (subprocess.TimeoutExpired) instead of hanging.
TIMEOUT = 20


def write_config(directory: Path, **keys) -> None:
    """tenantsync.yml keeping everything the fleet would write inside ``directory``."""
    config = {
        "replica": (directory / "replica").as_uri(),
        "globs": [f"{directory}/data/*.db"],
        "catalogue": f"sqlite:///{directory}/state/catalogue.db",
    }
    (directory / "tenantsync.yml").write_text(yaml.safe_dump(config | keys))


@pytest.fixture
def fleet(tmp_path) -> Path:
    """A directory with a tenantsync.yml and one tenant database for it to watch."""
    (tmp_path / "data").mkdir()
    conn = app_db(tmp_path / "data" / "a.db")
    write_rows(conn, 3)
    conn.close()
    write_config(tmp_path)
    return tmp_path


def files_in(directory: Path) -> dict:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


def refused(directory: Path, *names, env: dict | None = None, args=("watch",)) -> str:
    """Run the CLI in ``directory``; assert the one-line failure naming ``names`` and that
    nothing was written there (the config and the tenant as they were). The fleet creates
    its catalogue before it starts any child process, so no catalogue: no child either."""
    before = files_in(directory)
    proc = tenantsync(*args, cwd=directory, timeout=TIMEOUT, env=env)
    line = one_line_error(proc, *names)
    assert line.startswith("tenantsync: error: "), line
    assert files_in(directory) == before, "written before the error"
    return line


# -- config keys ----------------------------------------------------------------------


@pytest.mark.parametrize("key, value, named", [
    # issue 19 finding 7
    ("globs", 5, ("globs", "5")),
    ("replica", 42, ("replica", "42")),
    ("max-local-bytes", "lots", ("max-local-bytes", "lots")),
    ("snapshot", "daily", ("snapshot", "daily")),
    ("host-workers", OVER_CPU_CAP, ("host-workers", str(OVER_CPU_CAP))),
    # and the other keys
    ("sync-threads", 65, ("sync-threads", "65")),
    ("host", 42, ("host", "42")),
    ("broker", ["redis://127.0.0.1:1/0"], ("broker", "redis://127.0.0.1:1/0")),
    ("catalogue", 7, ("catalogue", "7")),
    ("debounce", -1, ("debounce", "-1")),
    ("idle-after", "0s", ("idle-after", "0s")),
    ("rescan-interval", 0, ("rescan-interval", "0")),
    ("lease-ttl", -30, ("lease-ttl", "-30")),
    ("retention", "0s", ("retention", "0s")),
    ("archive-after", 0, ("archive-after", "0")),
    ("max-local-bytes", -5, ("max-local-bytes", "-5")),
    ("snapshot", {"interval": "24h", "every": "1h"}, ("snapshot", "every")),
    ("snapshot", {"retention": "0s"}, ("snapshot", "0s")),
    ("levels", [{"interval": "30s", "every": "1m"}], ("levels", "every")),
    ("levels", [{"interval": "0s"}], ("levels", "0s")),
    ("levels", [], ("levels", "[]")),
    ("levels", [{"level": 2, "interval": "5m"}], ("levels", "level 1")),
    ("globs", [{"path": "/srv/*.db", "archive-after": 0}], ("archive-after of /srv/*.db", "0")),
    ("globs", [{"path": "/srv/*.db", "archive": "7d"}], ("globs", "archive")),
    ("globs", [7], ("globs", "7")),
])
def test_a_bad_config_value_is_one_line_naming_it_and_nothing_starts(fleet, key, value, named):
    write_config(fleet, **{key: value})
    refused(fleet, *named)


@pytest.mark.parametrize("var, value, shown", [
    ("TENANTSYNC_HOST_WORKERS", str(OVER_CPU_CAP), str(OVER_CPU_CAP)),
    ("TENANTSYNC_SYNC_THREADS", "1000", "1000"),
    ("TENANTSYNC_IDLE_AFTER", "0", "0"),
    ("TENANTSYNC_DEBOUNCE", "999999999999d", "999999999999d"),
    ("TENANTSYNC_HOST", "", "''"),
    ("TENANTSYNC_CATALOGUE", "", "''"),
    ("TENANTSYNC_GLOBS", "/srv/a/*.db,,/srv/b/*.db", "''"),
])
def test_a_bad_environment_override_names_the_variable(fleet, var, value, shown):
    refused(fleet, var, shown, env={var: value})


def test_the_old_key_workers_works_with_one_warning_line_naming_the_new_key(fleet):
    write_config(fleet, workers=4)
    proc = tenantsync("tenants", cwd=fleet, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "WARNING" in lines[0] and "name it sync-threads" in lines[0], proc.stderr


# -- flags -----------------------------------------------------------------------------


@pytest.mark.parametrize("listen", [
    "127.0.0.1:notaport", "127.0.0.1:99999", "127.0.0.1:0", "127.0.0.1:-1", "127.0.0.1:", "127.0.0.1",
])
def test_serve_with_a_bad_listen_address_is_a_usage_error(fleet, listen):
    line = refused(fleet, "--listen", listen, args=("serve", "--listen", listen))
    assert "serve" in line


TARGETS = [
    ("--timestamp", "0001-01-01T00:00:00+14:00"),  # year 0 in UTC
    ("--timestamp", "9999-12-31T23:59:59-14:00"),  # year 10000 in UTC
    ("--timestamp", "9999-12-31T23:59:59Z"),  # the restore's slack would overflow
    ("--txid", str(2**64)),
    ("--txid", "0x10000000000000000"),
]
TAKES = {"restore": ("--txid", "--timestamp"), "fork": ("--txid", "--timestamp"), "hydrate": ("--txid",)}


@pytest.mark.parametrize("command, option, value",
                         [(command, *target) for command in TAKES for target in TARGETS if target[0] in TAKES[command]])
def test_a_target_beyond_range_is_one_line_for_every_command(fleet, command, option, value):
    args = {
        "restore": ["restore", "--replica", (fleet / "replica").as_uri(), "-o", fleet / "restored.db"],
        "fork": ["fork", "a.db", "b.db"],
        "hydrate": ["hydrate", "a.db"],
    }[command]
    refused(fleet, option, value, args=(*args, option, value))


@pytest.mark.parametrize("option, value", [("--interval", "0"), ("--interval", "-1"), ("--debounce", "-0.5")])
def test_replicate_refuses_no_interval_or_a_negative_debounce(fleet, option, value):
    refused(fleet, option, value,
            args=("replicate", fleet / "data" / "a.db", "--replica", (fleet / "replica").as_uri(), option, value))
