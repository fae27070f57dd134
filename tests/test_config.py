"""tenantsync.yml and its environment overrides."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import yaml

from tenantsync.config import DEFAULT_STATE_DIR, Config, ConfigError, from_dict, load, parse_listen


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
    ("sync-threads: many\n", "sync-threads: expected a positive integer, got 'many'"),
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


def test_flags_from_the_environment_are_text():
    assert load(None, env={"TENANTSYNC_ENCRYPT": "true"}).encrypt is True
    assert load(None, env={"TENANTSYNC_ENCRYPT": "False"}).encrypt is False


def test_host_workers_split_the_tenants_over_stable_queues():
    from scheduler.routing import host_queue

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


def test_no_keys_is_every_default():
    assert from_dict({}) == Config()


CPU_CAP = 2 * (os.cpu_count() or 1)


@pytest.mark.parametrize("raw, message", [
    # issue 19 finding 7
    ({"globs": 5}, r"^globs: expected a glob or a list of globs, got 5$"),
    ({"replica": 42}, r"^replica: expected a string, got 42$"),
    ({"max-local-bytes": "lots"}, r"^max-local-bytes: 'lots' is not a size"),
    ({"snapshot": "daily"}, r"^snapshot: expected a mapping, got 'daily'$"),
    ({"host-workers": 1000}, rf"^host-workers: 1000 is more than {CPU_CAP} \(syncing processes: two per CPU"),
    # wrong types
    ({"broker": 5}, r"^broker: expected a string, got 5$"),
    ({"catalogue": ["sqlite:///a.db"]}, r"^catalogue: expected a string, got \['sqlite:///a.db'\]$"),
    ({"catalogue": None}, r"^catalogue: expected a string, got None$"),
    ({"host": 42}, r"^host: expected a string, got 42$"),
    ({"host": " "}, r"^host: expected a non-empty string, got ' '$"),
    ({"replica": None}, r"^replica: expected a string, got None$"),
    ({"globs": [7]}, r"^globs entry: expected a string, got 7$"),
    ({"globs": [""]}, r"^globs entry: expected a non-empty string, got ''$"),
    ({"globs": {"path": "/x"}}, r"^globs: expected a glob or a list of globs"),
    ({"globs": [{"path": 7}]}, r"^globs entry path: expected a string, got 7$"),
    ({"globs": [{"path": "/x", "archive": "7d"}]}, r"^unknown globs entry key\(s\): archive$"),
    ({"globs": [{"archive-after": "7d"}]}, r"^globs: entry .* has no 'path'$"),
    ({"cold-after": "soon"}, r"^cold-after: "),
    ({"globs": [{"path": "/x", "cold-after": -1}]}, r"^cold-after of /x: "),
    ({"sync-threads": True}, r"^sync-threads: expected a positive integer, got True$"),
    ({"sync-threads": 2.5}, r"^sync-threads: expected a positive integer, got 2.5$"),
    ({"sync-threads": [8]}, r"^sync-threads: expected a positive integer, got \[8\]$"),
    ({"sync-threads": 65}, r"^sync-threads: 65 is more than 64 \(sync threads in one process\)$"),
    ({"workers": 65}, r"^workers: 65 is more than 64 \(sync threads in one process\)$"),  # the old key, as written
    ({"host-workers": None}, r"^host-workers: expected a positive integer, got None$"),
    ({"host-workers": CPU_CAP + 1}, rf"^host-workers: {CPU_CAP + 1} is more than {CPU_CAP} "),
    ({"pitr-seconds": 1}, r"^pitr-seconds: expected true or false, got 1$"),
    ({"debounce": True}, r"^debounce: True is not a duration"),
    ({"debounce": ["50ms"]}, r"^debounce: \['50ms'\] is not a duration"),
    ({"idle-after": {"s": 30}}, r"^idle-after: \{'s': 30\} is not a duration"),
    # durations out of bounds
    ({"debounce": -1}, r"^debounce: expected a duration of zero or more, got -1$"),
    ({"idle-after": "0s"}, r"^idle-after: expected a duration above zero, got '0s'$"),
    ({"rescan-interval": 0}, r"^rescan-interval: expected a duration above zero, got 0$"),
    ({"lease-ttl": -30}, r"^lease-ttl: expected a duration above zero, got -30$"),
    ({"lease-ttl": "-30s"}, r"^lease-ttl: '-30s' is not a duration"),
    ({"idle-after": "999999999999d"}, r"^idle-after: '999999999999d' is out of range \(at most 36500d\)$"),
    ({"idle-after": float("inf")}, r"^idle-after: inf is out of range"),
    ({"idle-after": float("nan")}, r"^idle-after: nan is out of range"),
    ({"retention": "0s"}, r"^retention: expected a duration above zero, got '0s'$"),
    ({"l0-retention": None}, r"^l0-retention: None is not a duration"),
    ({"archive-after": 0}, r"^archive-after: expected a duration above zero, got 0$"),
    ({"failover-after": "30s"}, r"^failover-after: '30s' is not longer than lease-ttl \(30s\)$"),
    ({"failover-after": "1m", "lease-ttl": "2m"}, r"^failover-after: '1m' is not longer than lease-ttl \(120s\)$"),
    ({"archive-after": "soon"}, r"^archive-after: 'soon' is not a duration"),  # even with no globs
    ({"globs": [{"path": "/x", "archive-after": "0s"}]}, r"^archive-after of /x: expected a duration above zero"),
    # snapshot and levels
    ({"snapshot": None}, r"^snapshot: expected a mapping, got None$"),
    ({"snapshot": {"interval": "24h", "every": "1h"}}, r"^unknown snapshot key\(s\): every$"),
    ({"snapshot": {"interval": "0s"}}, r"^snapshot.interval: expected a duration above zero, got '0s'$"),
    ({"snapshot": {"retention": -1}}, r"^snapshot.retention: expected a duration above zero, got -1$"),
    ({"levels": []}, r"^levels: expected a list of \{level: N, interval: DURATION\}, got \[\]$"),
    ({"levels": [{"interval": "30s", "every": "1m"}]}, r"^unknown levels entry 1 key\(s\): every$"),
    ({"levels": [{"interval": "0s"}]}, r"^levels\[1\].interval: expected a duration above zero, got '0s'$"),
    ({"levels": [{"level": True, "interval": "1m"}]}, r"^levels: level True is not a number$"),
    ({"levels": [{"level": 1, "interval": "1m"}, {"level": 1, "interval": "2m"}]}, r"^levels: level 1 is given twice$"),
    ({"levels": [{"level": 2, "interval": "5m"}]}, r"^levels: level 1 is missing \(level 2 compacts it\)$"),
    # sizes
    ({"max-local-bytes": 0}, r"^max-local-bytes: expected a size above zero, got 0$"),
    ({"max-local-bytes": -5}, r"^max-local-bytes: expected a size above zero, got -5$"),
    ({"max-local-bytes": "10 GiBs"}, r"^max-local-bytes: '10 GiBs' is not a size"),
    ({"max-local-bytes": 1.5e9}, r"^max-local-bytes: 1500000000.0 is not a size"),
    ({"max-local-bytes": True}, r"^max-local-bytes: True is not a size"),
])
def test_from_dict_refuses_a_bad_value_naming_the_key_and_the_value(raw, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)


@pytest.mark.parametrize("var, value, message", [
    ("TENANTSYNC_REPLICA", "", None),  # no replica: watch says so, tenants needs none
    ("TENANTSYNC_BROKER", "", None),  # the embedded mode
    ("TENANTSYNC_CATALOGUE", "", r"^TENANTSYNC_CATALOGUE: expected a non-empty string, got ''$"),
    ("TENANTSYNC_HOST", "", r"^TENANTSYNC_HOST: expected a non-empty string, got ''$"),
    ("TENANTSYNC_GLOBS", "/a/*.db,", r"^TENANTSYNC_GLOBS entry: expected a non-empty string, got ''$"),
    ("TENANTSYNC_DEBOUNCE", "-1s", r"^TENANTSYNC_DEBOUNCE: '-1s' is not a duration"),
    ("TENANTSYNC_IDLE_AFTER", "0", r"^TENANTSYNC_IDLE_AFTER: '0' is not a duration"),
    ("TENANTSYNC_IDLE_AFTER", "0s", r"^TENANTSYNC_IDLE_AFTER: expected a duration above zero, got '0s'$"),
    ("TENANTSYNC_SYNC_THREADS", "-2", r"^TENANTSYNC_SYNC_THREADS: expected a positive integer, got '-2'$"),
    ("TENANTSYNC_SYNC_THREADS", "1000", r"^TENANTSYNC_SYNC_THREADS: '1000' is more than 64"),
    ("TENANTSYNC_SYNC_THREADS", "\u00b2", r"^TENANTSYNC_SYNC_THREADS: expected a positive integer, got '\u00b2'$"),  # a digit int() refuses
    ("TENANTSYNC_WORKERS", "1000", r"^TENANTSYNC_WORKERS: '1000' is more than 64"),  # the old variable, as set
    ("TENANTSYNC_RESCAN_INTERVAL", "0s", r"^TENANTSYNC_RESCAN_INTERVAL: expected a duration above zero, got '0s'$"),
    ("TENANTSYNC_LEASE_TTL", "soon", r"^TENANTSYNC_LEASE_TTL: 'soon' is not a duration"),
    ("TENANTSYNC_MAX_LOCAL_BYTES", "lots", r"^TENANTSYNC_MAX_LOCAL_BYTES: 'lots' is not a size"),
    ("TENANTSYNC_WAL_CEILING", "0", r"^TENANTSYNC_WAL_CEILING: expected a size above zero, got '0'$"),
    ("TENANTSYNC_AT_WAL_CEILING", "drop", r"^TENANTSYNC_AT_WAL_CEILING: expected one of grow, checkpoint, got 'drop'$"),
    ("TENANTSYNC_HOST_WORKERS", "1000", rf"^TENANTSYNC_HOST_WORKERS: '1000' is more than {CPU_CAP} "),
    ("TENANTSYNC_HOST_WORKERS", "two", r"^TENANTSYNC_HOST_WORKERS: expected a positive integer, got 'two'$"),
    ("TENANTSYNC_ENCRYPT", "yes please", r"^TENANTSYNC_ENCRYPT: expected true or false, got 'yes please'$"),
])
def test_an_environment_override_is_checked_and_named_by_its_variable(var, value, message):
    if message is None:
        load(None, env={var: value})
    else:
        with pytest.raises(ConfigError, match=message):
            load(None, env={var: value})


def test_accepted_values_keep_their_meaning():
    cfg = from_dict({
        "max-local-bytes": "10GiB", "debounce": 0, "broker": None, "host-workers": CPU_CAP, "sync-threads": "64",
        "archive-after": "7d", "globs": ["/a/*.db", {"path": "/b/*.db", "archive-after": None, "cold-after": "30d"},
                                         {"path": "/c/*.db", "archive-after": "1d"}],
        "cold-after": "90d",
        "retention": "48h", "snapshot": {"interval": "12h"}, "idle-after": 1.5,
    })
    assert cfg.max_local_bytes == 10 * 2**30
    assert cfg.debounce == timedelta(0) and cfg.broker is None
    assert cfg.host_workers == CPU_CAP and cfg.sync_threads == 64
    assert cfg.globs == ("/a/*.db", "/b/*.db", "/c/*.db")
    assert cfg.archive_after == (("/a/*.db", timedelta(days=7)), ("/c/*.db", timedelta(days=1)))  # null: never
    assert cfg.cold_after == (("/a/*.db", timedelta(days=90)), ("/b/*.db", timedelta(days=30)),
                              ("/c/*.db", timedelta(days=90)))
    assert cfg.cold_after_for("/b/x.db") == timedelta(days=30) and from_dict({}).cold_after_for("/a/x.db") is None
    assert cfg.levels.retention == timedelta(hours=48) and cfg.levels.snapshot_interval == timedelta(hours=12)
    assert cfg.idle_after == timedelta(seconds=1.5)
    assert from_dict({"max-local-bytes": "500MB"}).max_local_bytes == 500_000_000
    assert from_dict({"max-local-bytes": 50_000_000_000}).max_local_bytes == 50_000_000_000
    assert from_dict({"max-local-bytes": ""}).max_local_bytes is None
    assert from_dict({"snapshot": {"retention": "1h"}, "retention": "2h"}).levels.retention == timedelta(hours=1)


def test_host_workers_are_capped_by_this_machines_cpus(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert from_dict({"host-workers": 6}).host_workers == 6
    with pytest.raises(ConfigError, match=r"^host-workers: 7 is more than 6 "):
        from_dict({"host-workers": 7})


@pytest.mark.parametrize("text, address", [
    ("127.0.0.1:8080", ("127.0.0.1", 8080)), (":1", ("127.0.0.1", 1)), ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ("127.0.0.1:notaport", None), ("127.0.0.1:99999", None), ("127.0.0.1:0", None), ("127.0.0.1:", None),
    ("127.0.0.1", None), ("8080", None),
])
def test_parse_listen(text, address):
    if address is None:
        with pytest.raises(ConfigError, match=rf"^'{text}' is not HOST:PORT with a port from 1 to 65535$"):
            parse_listen(text)
    else:
        assert parse_listen(text) == address


def test_sync_threads_default_by_replica_kind_unless_set():
    """Object storage keeps more syncs in flight: each mostly waits for round trips."""
    assert Config(replica="file:///r").threads_per_process() == 8
    assert Config(replica="s3://bucket/r").threads_per_process() == 32
    assert Config(replica="s3://bucket/r", sync_threads=5).threads_per_process() == 5


def test_every_key_holding_one_value_has_its_environment_override():
    env = {"TENANTSYNC_RESCAN_INTERVAL": "5m", "TENANTSYNC_LEASE_TTL": "1m", "TENANTSYNC_MAX_LOCAL_BYTES": "1GB",
           "TENANTSYNC_SYNC_THREADS": "3", "TENANTSYNC_DEBOUNCE": "0s"}
    cfg = load(None, env=env)
    assert (cfg.rescan_interval, cfg.lease_ttl, cfg.max_local_bytes, cfg.sync_threads, cfg.debounce) == (
        timedelta(minutes=5), timedelta(minutes=1), 10**9, 3, timedelta(0))


# -- the renamed key: workers (which also named Celery's processes) is sync-threads ------


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tenantsync.config" and r.levelname == "WARNING"]


def test_the_old_key_workers_still_sets_the_sync_threads_with_one_warning_naming_the_new_key(tmp_path, caplog):
    path = tmp_path / "tenantsync.yml"
    path.write_text("workers: 4\n")
    assert load(str(path), env={}).sync_threads == 4
    assert warnings(caplog) == ["workers is deprecated: name it sync-threads (the same setting)"]


def test_the_old_variable_still_sets_the_sync_threads_over_the_file_with_one_warning(tmp_path, caplog):
    path = tmp_path / "tenantsync.yml"
    path.write_text("sync-threads: 4\n")
    assert load(str(path), env={"TENANTSYNC_WORKERS": "6"}).sync_threads == 6
    assert warnings(caplog) == ["TENANTSYNC_WORKERS is deprecated: name it TENANTSYNC_SYNC_THREADS (the same setting)"]
    caplog.clear()
    path.write_text("workers: 4\n")  # the variable overrides the file's setting under either name
    assert load(str(path), env={"TENANTSYNC_SYNC_THREADS": "6"}).sync_threads == 6
    assert warnings(caplog) == ["workers is deprecated: name it sync-threads (the same setting)"]


def test_the_new_key_alone_warns_of_nothing(caplog):
    assert from_dict({"sync-threads": 2}).sync_threads == 2 and from_dict({}).sync_threads == Config.sync_threads
    assert warnings(caplog) == []


@pytest.mark.parametrize("raw, env, message", [
    ({"workers": 4, "sync-threads": 4}, {}, r"^workers and sync-threads are one setting: give only sync-threads$"),
    ({}, {"TENANTSYNC_WORKERS": "4", "TENANTSYNC_SYNC_THREADS": "4"},
     r"^TENANTSYNC_WORKERS and TENANTSYNC_SYNC_THREADS are one setting: give only TENANTSYNC_SYNC_THREADS$"),
])
def test_the_old_and_the_new_name_together_are_refused(tmp_path, raw, env, message):
    path = tmp_path / "tenantsync.yml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message):
        load(str(path), env=env)


# -- defaults are written once --------------------------------------------------------


def test_the_lease_and_the_command_line_take_their_defaults_from_the_config():
    from tenantsync import lease
    from tenantsync.cli import cli

    assert lease.DEFAULT_TTL == Config().lease_ttl
    debounce = {p.name: p.default for p in cli.commands["replicate"].params}["debounce"]
    assert debounce == Config().debounce.total_seconds()
