"""Configuration: ``tenantsync.yml`` with environment overrides.

Keys follow Litestream's spelling where they mean the same thing (``l0-retention``,
``snapshot.interval``, ``snapshot.retention``, ``levels[].interval``). Every top-level
key that holds one value has an environment override, ``TENANTSYNC_`` and the key in
capitals with ``_`` for ``-`` (``TENANTSYNC_IDLE_AFTER``), so containers need no file.
With no ``broker`` the fleet runs embedded: jobs in-process, SQLite catalogue, nothing
else to install.

Each default is written once, as the ``Config`` field's (or ``Levels``'s): the parsers,
the overrides and the command line's flags take it from there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import urllib.parse
from dataclasses import dataclass, field, replace
from datetime import timedelta
from fractions import Fraction

from .errors import TenantSyncError
from .layout import PITR_LEVEL
from .levels import Levels
from .storage.options import StorageOptions


log = logging.getLogger(__name__)


class ConfigError(TenantSyncError):
    """The configuration file or an override is invalid; the message names the key."""


DEFAULT_STATE_DIR = os.path.join(os.path.expanduser("~"), ".local", "state", "tenantsync")
# Where every fleet's default catalogue was before each fleet had its own: rows found there
# are carried into a fleet's new default catalogue (catalogue.open_catalogue).
LEGACY_CATALOGUE = os.path.join(DEFAULT_STATE_DIR, "catalogue.db")
# Embedded mode's default number of syncing processes is one per CPU, at most this many.
MAX_DEFAULT_PROCESSES = 4
# Sync threads per process: past this, threads only queue on the interpreter lock.
MAX_SYNC_THREADS = 64
# Longer durations than this overflow the date arithmetic (``now - retention``).
MAX_DURATION = timedelta(days=36500)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1} | {f"{p}b": 1000 ** n for n, p in enumerate("kmgt", 1)} | {
    f"{p}ib": 1024 ** n for n, p in enumerate("kmgt", 1)}


def parse_duration(value, key: str) -> timedelta:
    """Go-style durations as Litestream's config uses them: ``50ms``, ``30s``, ``5m``, ``24h``;
    a number is seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        m = _DURATION.match(value) if isinstance(value, str) else None
        if not m:
            raise ConfigError(f"{key}: {value!r} is not a duration (like 50ms, 30s, 5m, 24h)")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not -MAX_DURATION.total_seconds() <= seconds <= MAX_DURATION.total_seconds():  # and NaN
        raise ConfigError(f"{key}: {value!r} is out of range (at most {MAX_DURATION.days}d)")
    return timedelta(seconds=seconds)


AT_CEILING_GROW = "grow"
AT_CEILING_CHECKPOINT = "checkpoint"


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
    lease_ttl: timedelta = timedelta(seconds=30)  # Litestream's s3.DefaultLeaseTTL
    # Sync threads per process (embedded); unset: see threads_per_process.
    sync_threads: int | None = None
    # Processes syncing this host's tenants, each tenant always in the same one (see
    # host_processes); unset: the default of the mode.
    host_workers: int | None = None
    levels: Levels = field(default_factory=Levels)
    # (glob, idle time after which its tenants are archived); first matching glob wins.
    archive_after: tuple[tuple[str, timedelta], ...] = ()
    # (glob, time archived after which its tenants are frozen into one bundle, cold.py).
    cold_after: tuple[tuple[str, timedelta], ...] = ()
    # Archive least recently written idle tenants while local tenants exceed this.
    max_local_bytes: int | None = None
    # While the store fails, a tenant's WAL keeps every unshipped frame and grows with its
    # writes. Past this size it is reported (once), and ``at_wal_ceiling`` says what then:
    # "grow" keeps every frame (disk for history), "checkpoint" copies the WAL into the
    # database unshipped (history for disk: the replica later gets the whole database).
    wal_ceiling: int = 1 << 30
    at_wal_ceiling: str = AT_CEILING_GROW
    # The HTTP API's bearer token (api_guard.py); unset: serve on loopback keeps one in the
    # fleet's state directory, and refuses to listen beyond loopback. Never printed.
    api_token: str | None = field(default=None, repr=False)
    # /readyz fails while some tenant's replication lag is above this.
    max_lag: timedelta = timedelta(seconds=60)
    # Automatic failover (catalogue_hosts.py): this host hydrates its share of the active
    # tenants of a host not seen for this long. Unset: only on demand (``hydrate``).
    failover_after: timedelta | None = None
    # Encryption at rest (storage/sealed.py): every tenant's replica objects sealed under a
    # data key of its own, wrapped by the current key of the keyring (a file; unset: the
    # TENANTSYNC_KEYRING variable holds the keyring itself). Off: replicas stay plain
    # Litestream replicas.
    encrypt: bool = False
    keyring: str | None = None
    # Timeouts, retries and requests in flight of object storage (``storage:``).
    storage: StorageOptions = field(default_factory=StorageOptions)

    def threads_per_process(self) -> int:
        """Sync threads of each syncing process: ``sync-threads`` if set. Else 8 for a
        ``file://`` replica: a sync spends much of its time in fsync (the LTX file, its
        directory), which holds no interpreter lock, so a process needs more threads than
        cores. And 32 for object storage, where a sync mostly waits for round trips (a new
        tenant's three requests one after another): more of them in flight, not more CPU,
        is what brings thousands of tenants up (the per-host cap, ``storage:
        max-in-flight``, still bounds the requests)."""
        if self.sync_threads is not None:
            return self.sync_threads
        return 8 if self.replica.startswith("file:") else 32

    def storage_job_threads(self) -> int:
        """Tenants of one storage batch (compact, snapshot, retain) worked on at once: 1 for
        a ``file://`` replica, where a compaction is CPU and disk, and 16 for object storage,
        where each is a few requests one after another (two LISTs, GETs, a PUT) and a round
        of 1,000 tenants one at a time at 30 ms outlasts the 30-s L1 interval."""
        return 1 if self.replica.startswith("file:") else 16

    def host_processes(self, embedded: bool) -> int:
        """How many processes share this host's tenants. With Celery, the worker processes
        consuming ``host.<host>.<0..n-1>`` (1: the single queue ``host.<host>``), which the
        operator starts, so 1 unless set. Embedded (``tenantsync watch``), the watcher's
        process and n-1 children it starts: by default one per CPU, up to
        MAX_DEFAULT_PROCESSES, as every tenant's wake-up costs interpreter time and one
        process's interpreter lock serialises them all (scheduler/job_process.py)."""
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
        catalogue configured, never share one: a tenant name both used would be one row,
        and archiving one app's tenant would delete the other's file."""
        return self.catalogue or f"sqlite:///{default_catalogue_path(self.fleet)}"

    def archive_after_for(self, path: str) -> timedelta | None:
        return _delay_for(self.archive_after, path)

    def cold_after_for(self, path: str) -> timedelta | None:
        return _delay_for(self.cold_after, path)

    def with_overrides(self, **changes) -> "Config":
        return replace(self, **{k: v for k, v in changes.items() if v not in (None, ())})


def _delay_for(delays: tuple[tuple[str, timedelta], ...], path: str) -> timedelta | None:
    """The delay of the first glob of ``delays`` that ``path`` matches."""
    from fnmatch import fnmatchcase

    for pattern, after in delays:
        if fnmatchcase(path, os.path.abspath(pattern)):
            return after
    return None


# The directory of each fleet's files on this host (its default catalogue, its owner's socket).
FLEETS_DIR = os.path.join(DEFAULT_STATE_DIR, "fleets")


def default_catalogue_path(fleet: str) -> str:
    """``DEFAULT_STATE_DIR/fleets/<last part of the replica root>-<hash of the fleet>.db``:
    readable in a listing, and distinct for every replica root."""
    return os.path.join(FLEETS_DIR, f"{fleet_slug(fleet)}-{hashlib.sha256(fleet.encode()).hexdigest()[:12]}.db")


def fleet_slug(fleet: str) -> str:
    """The last part of the fleet's replica root, in characters safe in a file name."""
    tail = urllib.parse.unquote(fleet.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1])
    return re.sub(r"[^A-Za-z0-9._-]+", "_", tail).strip("._")[:40] or "fleet"


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
    raw, names = _renamed(raw, {})
    overridden = {key: var for var, key in _ENV.items() if var in env}
    env_raw, env_names = _renamed({key: env[var].split(",") if key == "globs" else env[var]
                                   for key, var in overridden.items()}, overridden)
    return from_dict(raw | env_raw, names=names | env_names)


# -- values: each parser takes the value and the name to blame (a key or a variable) -----


def _text(value, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _name(value, key: str) -> str:
    """A string that must say something: a host's queue and lease owner, a catalogue URL, a glob."""
    if not _text(value, key).strip():
        raise ConfigError(f"{key}: expected a non-empty string, got {value!r}")
    return value


def _optional(parse):
    """``parse``, where null or an empty string leaves the key unset (None)."""
    return lambda value, key: None if value is None or value == "" else parse(value, key)


def _count(most, why: str):
    """A positive integer (or its digits, from the environment) up to ``most()``, ``why``
    saying what the limit is."""
    def parse(value, key: str) -> int:
        integer = isinstance(value, int) and not isinstance(value, bool)
        if not (integer or isinstance(value, str) and value.strip().isdecimal()) or int(value) < 1:
            raise ConfigError(f"{key}: expected a positive integer, got {value!r}")
        if int(value) > most():
            raise ConfigError(f"{key}: {value!r} is more than {most()} ({why})")
        return int(value)

    return parse


def _duration(zero: bool = False):
    """A duration longer than zero (or zero too, where nothing waits on it)."""
    def parse(value, key: str) -> timedelta:
        duration = parse_duration(value, key)
        if duration < timedelta(0) or duration == timedelta(0) and not zero:
            raise ConfigError(f"{key}: expected a duration {'of zero or more' if zero else 'above zero'}, got {value!r}")
        return duration

    return parse


def _size(value, key: str) -> int:
    """Bytes: an integer, or a number with a unit (10GiB, 500MB)."""
    m = _SIZE.match(value) if isinstance(value, str) else None
    if m:
        size = int(Fraction(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()])
    elif isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        raise ConfigError(f"{key}: {value!r} is not a size (bytes, or with a unit: 500MB, 10GiB)")
    if size < 1:
        raise ConfigError(f"{key}: expected a size above zero, got {value!r}")
    return size


def _choice(*choices: str):
    def parse(value, key: str) -> str:
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
        return value

    return parse


# A flag from an environment variable is text: YAML 1.2's spellings of true and false.
_FLAG_TEXT = {"true": True, "false": False}


def _flag(value, key: str) -> bool:
    if isinstance(value, str) and value.strip().lower() in _FLAG_TEXT:
        return _FLAG_TEXT[value.strip().lower()]
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _mapping(value, what: str, known) -> dict:
    """``value`` as a mapping holding none but the ``known`` keys."""
    if not isinstance(value, dict):
        raise ConfigError(f"{what}: expected a mapping, got {value!r}")
    unknown = set(value) - set(known)
    if unknown:
        raise ConfigError(f"unknown {what} key(s): {', '.join(sorted(map(str, unknown)))}")
    return value


_positive = _duration()
_delay = _optional(_positive)  # null on a glob: never archive (or freeze) its tenants
# Per-glob delays: each may be given at the top level (the default) and on a globs entry.
_GLOB_DELAYS = ("archive-after", "cold-after")

# Config key → (Config field, parser); a key absent keeps the field's default.
_FIELDS = {
    "replica": ("replica", _text),
    "broker": ("broker", _optional(_text)),  # none: the embedded mode
    "catalogue": ("catalogue", _name),
    "host": ("host", _name),
    "debounce": ("debounce", _duration(zero=True)),  # 0: a pass per event, no gathering
    "idle-after": ("idle_after", _positive),
    "rescan-interval": ("rescan_interval", _positive),
    "lease-ttl": ("lease_ttl", _positive),
    "sync-threads": ("sync_threads", _count(lambda: MAX_SYNC_THREADS, "sync threads in one process")),
    "host-workers": ("host_workers", _count(lambda: 2 * (os.cpu_count() or 1),
                                            "syncing processes: two per CPU of this machine")),
    "max-local-bytes": ("max_local_bytes", _optional(_size)),
    "wal-ceiling": ("wal_ceiling", _size),
    "at-wal-ceiling": ("at_wal_ceiling", _choice(AT_CEILING_GROW, AT_CEILING_CHECKPOINT)),
    "api-token": ("api_token", _optional(_text)),
    "max-lag": ("max_lag", _positive),
    "failover-after": ("failover_after", _optional(_positive)),
    "encrypt": ("encrypt", _flag),
    "keyring-file": ("keyring", _optional(_text)),
}
# Key → (Levels field, parser), at the top level and under ``snapshot:`` (which wins).
_LEVEL_FIELDS = {
    "l0-retention": ("l0_retention", _duration(zero=True)),  # 0: L0 files go once compacted
    "retention": ("retention", _positive),  # Litestream 0.3's place for snapshot.retention
    "pitr-seconds": ("pitr_seconds", _flag),
}
_SNAPSHOT_FIELDS = {"interval": ("snapshot_interval", _positive), "retention": ("retention", _positive)}


def _seconds(value, key: str) -> float:
    return _positive(value, key).total_seconds()


_many = _count(lambda: 10_000, "a sanity bound")
# Key under ``storage:`` → (StorageOptions field, parser).
_STORAGE_FIELDS = {
    "connect-timeout": ("connect_timeout", _seconds),
    "read-timeout": ("read_timeout", _seconds),
    "min-transfer-rate": ("min_transfer_rate", _size),  # bytes per second
    "max-in-flight": ("max_in_flight", _many),
    "attempts": ("attempts", _many),
    "throttled-attempts": ("throttled_attempts", _many),
    "retry-time": ("retry_time", _seconds),
}
# Old key → its new name. Files and environments written for the old name keep working,
# with one warning line for each use naming the new one.
_RENAMED = {"workers": "sync-threads"}  # "workers" also named Celery's worker processes
_KNOWN = {*_FIELDS, *_LEVEL_FIELDS, *_RENAMED, "levels", "snapshot", "globs", *_GLOB_DELAYS, "storage"}


def env_var(key: str) -> str:
    """The environment variable overriding ``key``: ``idle-after`` → ``TENANTSYNC_IDLE_AFTER``."""
    return "TENANTSYNC_" + key.upper().replace("-", "_")


# Variable → key, for every key holding one value (and globs, comma-separated).
_ENV = {env_var(key): key for key in (*_FIELDS, *_RENAMED, "globs")}


def _renamed(raw: dict, names: dict) -> tuple[dict, dict]:
    """``raw`` with each old key under its new name, and ``names`` (key → the variable or
    old key the operator wrote) to match, so errors still blame what was written."""
    raw, names = dict(raw), dict(names)
    for old, new in _RENAMED.items():
        if old not in raw:
            continue
        wrote = names.pop(old, old)
        now = env_var(new) if wrote == env_var(old) else new
        if new in raw:
            raise ConfigError(f"{wrote} and {names.get(new, new)} are one setting: give only {now}")
        log.warning("%s is deprecated: name it %s (the same setting)", wrote, now)
        raw[new], names[new] = raw.pop(old), wrote
    return raw, names


def _parsed(raw: dict, table: dict, prefix: str = "", names: dict | None = None) -> dict:
    """The fields ``table`` makes of the keys present in ``raw``."""
    names = names or {}
    return {field: parse(raw[key], names.get(key, prefix + key)) for key, (field, parse) in table.items() if key in raw}


def from_dict(raw: dict, names: dict | None = None) -> Config:
    """The Config of a parsed tenantsync.yml; ``names`` maps keys to what the operator
    wrote for them (a variable of the environment, an old key), so an error blames that."""
    _mapping(raw, "config", _KNOWN)
    raw, names = _renamed(raw, names or {})
    levels = Levels()
    if "levels" in raw:
        levels = replace(levels, intervals=_level_intervals(raw["levels"]))
    snapshot = _mapping(raw["snapshot"], "snapshot", _SNAPSHOT_FIELDS) if "snapshot" in raw else {}
    levels = replace(levels, **_parsed(raw, _LEVEL_FIELDS) | _parsed(snapshot, _SNAPSHOT_FIELDS, "snapshot."))
    globs, delays = _globs(raw.get("globs", []), {key: raw.get(key) for key in _GLOB_DELAYS}, names.get("globs", "globs"))
    storage = _mapping(raw["storage"], "storage", _STORAGE_FIELDS) if "storage" in raw else {}
    config = replace(Config(), **_parsed(raw, _FIELDS, names=names), globs=globs, archive_after=delays["archive-after"],
                     cold_after=delays["cold-after"], levels=levels,
                     storage=StorageOptions(**_parsed(storage, _STORAGE_FIELDS, "storage.")))
    if config.failover_after is not None and config.failover_after <= config.lease_ttl:
        # A host not seen for less than a lease's term may still hold its tenants' leases:
        # every hydration would be refused until they lapse.
        raise ConfigError(f"{names.get('failover-after', 'failover-after')}: {raw['failover-after']!r} is not longer "
                          f"than lease-ttl ({config.lease_ttl.total_seconds():g}s)")
    return config


def _globs(value, defaults: dict, key: str) -> tuple[tuple[str, ...], dict[str, tuple[tuple[str, timedelta], ...]]]:
    """``globs:`` (one or a list, each a string or ``{path: GLOB, archive-after: 7d, cold-after:
    90d}``) as the patterns and, per delay of _GLOB_DELAYS, each glob's (the top-level value
    ``defaults`` holds by default; null: none for that glob)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ConfigError(f"{key}: expected a glob or a list of globs, got {value!r}")
    defaults = {name: _delay(after, name) for name, after in defaults.items()}
    patterns: list[str] = []
    delays: dict[str, list] = {name: [] for name in _GLOB_DELAYS}
    for item in items:
        entry = {}
        if isinstance(item, dict):
            entry = _mapping(item, "globs entry", ("path", *_GLOB_DELAYS))
            if "path" not in entry:
                raise ConfigError(f"{key}: entry {item!r} has no 'path'")
            pattern = _name(entry["path"], f"{key} entry path")
        else:
            pattern = _name(item, f"{key} entry")
        patterns.append(pattern)
        for name in _GLOB_DELAYS:
            after = _delay(entry[name], f"{name} of {pattern}") if name in entry else defaults[name]
            if after is not None:
                delays[name].append((pattern, after))
    return tuple(patterns), {name: tuple(found) for name, found in delays.items()}


def _level_intervals(items) -> dict[int, timedelta]:
    """``levels:`` as a list of ``{level: N, interval: D}``, or Litestream's ``{interval: D}``
    where the position gives the level (the first entry is level 1). Each level compacts the
    one below it, so they run from 1 without a gap."""
    if not isinstance(items, list) or not items or not all(isinstance(item, dict) for item in items):
        raise ConfigError(f"levels: expected a list of {{level: N, interval: DURATION}}, got {items!r}")
    intervals = {}
    for position, item in enumerate(items, 1):
        _mapping(item, f"levels entry {position}", ("level", "interval"))
        level = item.get("level", position)
        if isinstance(level, bool) or not isinstance(level, int):
            raise ConfigError(f"levels: level {level!r} is not a number")
        if not 1 <= level < PITR_LEVEL:
            raise ConfigError(f"levels: level {level} must be between 1 and {PITR_LEVEL - 1} "
                              f"(level {PITR_LEVEL} holds the per-second restore points)")
        if level in intervals:
            raise ConfigError(f"levels: level {level} is given twice")
        if "interval" not in item:
            raise ConfigError(f"levels: level {level} has no interval")
        intervals[level] = _positive(item["interval"], f"levels[{level}].interval")
    missing = set(range(1, max(intervals) + 1)) - set(intervals)
    if missing:
        raise ConfigError(f"levels: level {min(missing)} is missing (level {min(missing) + 1} compacts it)")
    return intervals


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` of the HTTP API (``:PORT``: 127.0.0.1) as the address to bind; the
    caller names the flag in the error."""
    host, colon, port = text.rpartition(":")
    if not colon or not port.strip().isdecimal() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{text!r} is not HOST:PORT with a port from 1 to 65535")
    return host or "127.0.0.1", int(port)
