"""tenantsync.yml and its environment overrides."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest

from tenantsync.config import DEFAULT_STATE_DIR, Config, ConfigError, load


def test_file_keys_and_env_overrides(tmp_path):
    path = tmp_path / "tenantsync.yml"
    path.write_text(
        "replica: file:///r\nglobs: ['/data/*.db']\nidle-after: 2m\n"
        "levels:\n  - level: 1\n    interval: 10s\nsnapshot:\n  interval: 1h\n  retention: 48h\nl0-retention: 1m\npitr-seconds: false\n"
    )
    cfg = load(str(path), env={"TENANTSYNC_BROKER": "redis://127.0.0.1:1/0"})
    assert cfg.replica == "file:///r" and cfg.globs == ("/data/*.db",)
    assert cfg.broker == "redis://127.0.0.1:1/0"
    assert cfg.idle_after == timedelta(minutes=2)
    assert cfg.levels.intervals == {1: timedelta(seconds=10)}
    assert cfg.levels.snapshot_interval == timedelta(hours=1)
    assert cfg.levels.retention == timedelta(hours=48)
    assert cfg.levels.l0_retention == timedelta(minutes=1)
    assert cfg.levels.pitr_seconds is False


def test_defaults_are_the_embedded_mode():
    cfg = load(None, env={})
    assert cfg.broker is None and cfg.catalogue == ""
    assert cfg.with_overrides(replica="/srv/r").catalogue_url().startswith(f"sqlite:///{DEFAULT_STATE_DIR}/fleets/r-")
    assert cfg.levels.intervals[1] == timedelta(seconds=30)
    assert cfg.levels.pitr_seconds is True


@pytest.mark.parametrize("text, message", [
    ("idle-after: soon\n", "idle-after: 'soon' is not a duration"),
    ("colour: blue\n", "unknown config key"),
    ("- a\n", "expected a mapping"),
    ("host-workers: 0\n", "host-workers: expected a positive integer, got 0"),
    ("workers: many\n", "workers: expected a positive integer, got 'many'"),
    ("levels:\n  - {level: 8, interval: 1d}\n", "level 8 must be between 1 and 7 .level 8 holds the per-second"),
    ("pitr-seconds: sometimes\n", "pitr-seconds: expected true or false, got 'sometimes'"),
    ("levels: 5\n", "levels: expected a list of"),
    ("levels:\n  - {level: one, interval: 30s}\n", "levels: level 'one' is not a number"),
    ("levels:\n  - {level: 2}\n", "levels: level 2 has no interval"),
    ("replica: [1\n", r"^\S+: invalid YAML at line 2, column 1: expected ',' or '\]', but got '<stream end>'$"),
])
def test_bad_config_names_the_key(tmp_path, text, message):
    path = tmp_path / "tenantsync.yml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load(str(path), env={})


def test_levels_in_litestreams_form_take_their_level_from_their_position(tmp_path):
    path = tmp_path / "tenantsync.yml"
    path.write_text("levels:\n  - {interval: 10s}\n  - {interval: 1m}\n")
    assert load(str(path), env={}).levels.intervals == {1: timedelta(seconds=10), 2: timedelta(minutes=1)}


def test_host_workers_split_the_tenants_over_stable_queues():
    from workers.app import host_queue

    assert load(None, env={"TENANTSYNC_HOST_WORKERS": "3"}).host_workers == 3
    assert load(None, env={"TENANTSYNC_HOST_WORKERS": "3"}).host_processes(embedded=True) == 3
    unset = load(None, env={})
    assert unset.host_workers is None and unset.host_processes(embedded=False) == 1  # one queue host.<host>
    assert unset.host_processes(embedded=True) == min(os.cpu_count(), 4)  # tenantsync watch: one per CPU
    assert host_queue("h", "a.db") == host_queue("h", "a.db", 1) == "host.h"
    names = [f"t{i}.db" for i in range(300)]
    queues = [host_queue("h", n, 3) for n in names]
    assert set(queues) == {"host.h.0", "host.h.1", "host.h.2"}
    assert all(queues.count(q) > 60 for q in set(queues))  # roughly even
    # The same in every process: crc32, not Python's per-process salted hash.
    assert queues == [host_queue("h", n, 3) for n in names]
    assert host_queue("h", "t0.db", 3) == f"host.h.{__import__('zlib').crc32(b't0.db') % 3}"


def test_each_replica_root_has_its_own_default_catalogue_and_every_spelling_is_one_fleet(tmp_path):
    """Issue 19, finding 1: two apps on one machine, each with its own replica and no
    catalogue configured, must not share one."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    os.symlink(tmp_path / "a", tmp_path / "link")
    a = Config(replica=f"file://{tmp_path}/a")
    same = [Config(replica=r) for r in (f"{tmp_path}/a", f"file://{tmp_path}/a/", f"{tmp_path}/link", f"{tmp_path}/b/../a")]
    b = Config(replica=f"{tmp_path}/b")
    assert {c.fleet for c in same} == {a.fleet} and {c.catalogue_url() for c in same} == {a.catalogue_url()}
    assert b.fleet != a.fleet and b.catalogue_url() != a.catalogue_url()
    assert Config(replica="s3://bkt/p?endpoint=127.0.0.1:9000").fleet == Config(
        replica="s3://bkt//p/?region=x&endpoint=http://127.0.0.1:9000").fleet
    assert Config(replica="s3://bkt/p?endpoint=127.0.0.1:9000").fleet != Config(replica="s3://bkt/p").fleet
    assert Config(replica=f"{tmp_path}/b", catalogue="sqlite:////x.db").catalogue_url() == "sqlite:////x.db"
