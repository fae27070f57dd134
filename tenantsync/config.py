"""Configuration: ``tenantsync.yml`` with environment overrides.

Keys follow Litestream's spelling where they mean the same thing (``l0-retention``,
``snapshot.interval``, ``snapshot.retention``, ``levels[].interval``). Every key has a
``TENANTSYNC_…`` environment override so containers need no file. With no ``broker``
the fleet runs embedded: jobs in-process, SQLite catalogue, nothing else to install.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import urllib.parse
from dataclasses import dataclass, field, replace
from datetime import timedelta

from .errors import TenantSyncError
from .layout import PITR_LEVEL
from .levels import Levels


class ConfigError(TenantSyncError):
    """The configuration file or an override is invalid; the message names the key."""


DEFAULT_STATE_DIR = os.path.join(os.path.expanduser("~"), ".local", "state", "tenantsync")
# Where every fleet's default catalogue was before each fleet had its own: rows found there
# are carried into a fleet's new default catalogue (catalogue.open_catalogue).
LEGACY_CATALOGUE = os.path.join(DEFAULT_STATE_DIR, "catalogue.db")
# Embedded mode's default number of syncing processes is one per CPU, at most this many.
MAX_DEFAULT_PROCESSES = 4

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value, key: str) -> timedelta:
    """Go-style durations as Litestream's config uses them: ``50ms``, ``30s``, ``5m``, ``24h``."""
    if isinstance(value, (int, float)):
        return timedelta(seconds=value)
    m = _DURATION.match(str(value))
    if not m:
        raise ConfigError(f"{key}: {value!r} is not a duration (like 50ms, 30s, 5m, 24h)")
    return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])


@dataclass(frozen=True)
class Config:
    """Everything a watcher or worker needs; defaults make the embedded mode work."""

    replica: str = ""
    globs: tuple[str, ...] = ()
    broker: str | None = None
    # Empty: the fleet's own SQLite file under DEFAULT_STATE_DIR (see catalogue_url).
    catalogue: str = ""
    host: str = field(default_factory=socket.gethostname)
    debounce: timedelta = timedelta(milliseconds=50)
    idle_after: timedelta = timedelta(seconds=30)
    rescan_interval: timedelta = timedelta(seconds=60)
    lease_ttl: timedelta = timedelta(seconds=30)
    # Sync threads per process (embedded). A sync spends about a third of its time in fsync
    # (the LTX file, its directory), which holds no interpreter lock: at 10,000 tenants under
    # 200 commits/s, 4 threads were 75 % busy and queued whenever fsyncs slowed.
    workers: int = 8
    # Processes syncing this host's tenants, each tenant always in the same one (see
    # host_processes); unset: the default of the mode.
    host_workers: int | None = None
    levels: Levels = field(default_factory=Levels)
    # (glob, idle time after which its tenants are archived); first matching glob wins.
    archive_after: tuple[tuple[str, timedelta], ...] = ()
    # Archive least recently written idle tenants while local tenants exceed this.
    max_local_bytes: int | None = None

    def host_processes(self, embedded: bool) -> int:
        """How many processes share this host's tenants. With Celery, the worker processes
        consuming ``host.<host>.<0..n-1>`` (1: the single queue ``host.<host>``), which the
        operator starts, so 1 unless set. Embedded (``tenantsync watch``), the watcher's
        process and n-1 children it starts: by default one per CPU, up to 4, as one
        process's interpreter lock could not keep up with 10,000 tenants' wake-ups
        (scheduler/job_process.py)."""
        if self.host_workers is not None:
            return self.host_workers
        return min(os.cpu_count() or 1, MAX_DEFAULT_PROCESSES) if embedded else 1

    @property
    def fleet(self) -> str:
        """The fleet's identity: its replica root, however spelled (storage.fleet_id). A
        tenant is its fleet and its name; catalogue rows are keyed by both."""
        from .storage import fleet_id

        if not self.replica:
            raise ConfigError("no replica: give --replica URL or 'replica:' in tenantsync.yml")
        return fleet_id(self.replica)

    def catalogue_url(self) -> str:
        """The catalogue given, or this fleet's default: a SQLite file of its own, named after
        the replica root, so two apps on one machine, each with its own replica and no
        catalogue configured, never share one (they did, and a tenant name both used had
        one row: archiving one app's tenant deleted the other's file)."""
        return self.catalogue or f"sqlite:///{default_catalogue_path(self.fleet)}"

    def archive_after_for(self, path: str) -> timedelta | None:
        from fnmatch import fnmatchcase

        for pattern, after in self.archive_after:
            if fnmatchcase(path, os.path.abspath(pattern)):
                return after
        return None

    def with_overrides(self, **changes) -> "Config":
        return replace(self, **{k: v for k, v in changes.items() if v not in (None, ())})


def default_catalogue_path(fleet: str) -> str:
    """``DEFAULT_STATE_DIR/fleets/<last part of the replica root>-<hash of the fleet>.db``:
    readable in a listing, and distinct for every replica root."""
    tail = urllib.parse.unquote(fleet.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1])
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", tail).strip("._")[:40] or "fleet"
    return os.path.join(DEFAULT_STATE_DIR, "fleets", f"{slug}-{hashlib.sha256(fleet.encode()).hexdigest()[:12]}.db")


_ENV = {
    "TENANTSYNC_REPLICA": "replica",
    "TENANTSYNC_BROKER": "broker",
    "TENANTSYNC_CATALOGUE": "catalogue",
    "TENANTSYNC_HOST": "host",
    "TENANTSYNC_GLOBS": "globs",
    "TENANTSYNC_DEBOUNCE": "debounce",
    "TENANTSYNC_IDLE_AFTER": "idle-after",
    "TENANTSYNC_WORKERS": "workers",
    "TENANTSYNC_HOST_WORKERS": "host-workers",
}


def load(path: str | None = None, env: dict | None = None) -> Config:
    """Read ``path`` (or ``$TENANTSYNC_CONFIG``, or ``./tenantsync.yml`` if present), then env."""
    env = os.environ if env is None else env
    path = path or env.get("TENANTSYNC_CONFIG") or ("tenantsync.yml" if os.path.exists("tenantsync.yml") else None)
    raw: dict = {}
    if path:
        import yaml

        try:
            with open(path) as f:
                raw = yaml.safe_load(os.path.expandvars(f.read())) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config: {e.strerror}") from e
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', None) or e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for var, key in _ENV.items():
        if var in env:
            raw[key] = env[var].split(",") if key == "globs" else env[var]
    return from_dict(raw)


def from_dict(raw: dict) -> Config:
    known = {"replica", "globs", "broker", "catalogue", "host", "debounce", "idle-after", "rescan-interval",
             "lease-ttl", "workers", "host-workers", "levels", "snapshot", "l0-retention", "retention", "archive-after",
             "max-local-bytes", "pitr-seconds"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(sorted(unknown))}")
    cfg = Config()
    levels = cfg.levels
    if "levels" in raw:
        levels = replace(levels, intervals=_level_intervals(raw["levels"]))
    snap = raw.get("snapshot") or {}
    if "interval" in snap:
        levels = replace(levels, snapshot_interval=parse_duration(snap["interval"], "snapshot.interval"))
    if "retention" in snap or "retention" in raw:
        value = snap.get("retention", raw.get("retention"))
        levels = replace(levels, retention=parse_duration(value, "snapshot.retention"))
    if "l0-retention" in raw:
        levels = replace(levels, l0_retention=parse_duration(raw["l0-retention"], "l0-retention"))
    if "pitr-seconds" in raw:
        if not isinstance(raw["pitr-seconds"], bool):
            raise ConfigError(f"pitr-seconds: expected true or false, got {raw['pitr-seconds']!r}")
        levels = replace(levels, pitr_seconds=raw["pitr-seconds"])
    globs = raw.get("globs", ())
    globs = [globs] if isinstance(globs, str) else list(globs)
    patterns, archive_after = [], []
    for item in globs:
        # A glob is a string, or {path: GLOB, archive-after: 7d} for its own archival delay.
        if isinstance(item, dict):
            if "path" not in item:
                raise ConfigError(f"globs: entry {item!r} has no 'path'")
            patterns.append(item["path"])
            after = item.get("archive-after", raw.get("archive-after"))
        else:
            patterns.append(item)
            after = raw.get("archive-after")
        if after is not None:
            archive_after.append((patterns[-1], parse_duration(after, f"archive-after of {patterns[-1]}")))
    return replace(
        cfg,
        replica=raw.get("replica", cfg.replica),
        globs=tuple(patterns),
        archive_after=tuple(archive_after),
        max_local_bytes=int(raw["max-local-bytes"]) if raw.get("max-local-bytes") else None,
        broker=raw.get("broker") or None,
        catalogue=raw.get("catalogue", cfg.catalogue),
        host=str(raw.get("host", cfg.host)),
        debounce=parse_duration(raw.get("debounce", "50ms"), "debounce"),
        idle_after=parse_duration(raw.get("idle-after", "30s"), "idle-after"),
        rescan_interval=parse_duration(raw.get("rescan-interval", "60s"), "rescan-interval"),
        lease_ttl=parse_duration(raw.get("lease-ttl", "30s"), "lease-ttl"),
        workers=_positive(raw.get("workers", cfg.workers), "workers"),
        host_workers=_positive(raw["host-workers"], "host-workers") if "host-workers" in raw else cfg.host_workers,
        levels=levels,
    )


def _level_intervals(items) -> dict[int, timedelta]:
    """``levels:`` as a list of ``{level: N, interval: D}``, or Litestream's ``{interval: D}``
    where the position gives the level (the first entry is level 1)."""
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ConfigError("levels: expected a list of {level: N, interval: DURATION}")
    intervals = {}
    for position, item in enumerate(items, 1):
        try:
            level = int(item.get("level", position))
        except (TypeError, ValueError):
            raise ConfigError(f"levels: level {item['level']!r} is not a number") from None
        if not 1 <= level < PITR_LEVEL:
            raise ConfigError(f"levels: level {level} must be between 1 and {PITR_LEVEL - 1} "
                              f"(level {PITR_LEVEL} holds the per-second restore points)")
        if "interval" not in item:
            raise ConfigError(f"levels: level {level} has no interval")
        intervals[level] = parse_duration(item["interval"], f"levels[{level}].interval")
    return intervals


def _positive(value, key: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise ConfigError(f"{key}: expected a positive integer, got {value!r}")
    return number
