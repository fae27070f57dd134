"""The ``tenantsync`` command line: thin wrappers over the core calls.

Every TenantSyncError becomes one line on stderr and exit status 1, or 3 when the same
command is worth running again as it is (``RETRY_LATER``: storage, the catalogue or the
broker unreachable, a lease another host holds until it lapses, an owner process that did
not answer or died); a traceback means a bug.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

import click

from .config import Config, ConfigError, parse_listen
from .dictionary import SAMPLE_TENANTS
from .errors import (BrokerUnavailable, CatalogueUnavailable, InvalidArgument, LeaseHeld, NoAnswer, StorageUnavailable,
                     TenantSyncError, WorkerDied)
from .outcome import Archived, Frozen, Outcome, Shipped, Skip
from .targets import parse_timestamp, parse_txid

log = logging.getLogger("tenantsync")

# Exit status of a command whose job was Skipped, by why: an archival refused because the
# tenant is in use did not do what was asked (1, as an error); archived already did.
# catalogue_schema.TenantState's values, written out so that the CLI starts without
# importing SQLAlchemy (tests/test_catalogue.py checks the two agree).
TENANT_STATES = ("active", "idle", "archiving", "archived", "hydrating", "error", "freezing", "frozen", "shredded")
# Errors that say nothing is wrong with the command, only with the moment: exit status
# EXIT_RETRY, so a script (a failover loop) retries on the status, not on the message's words.
RETRY_LATER = (StorageUnavailable, CatalogueUnavailable, BrokerUnavailable, LeaseHeld, NoAnswer, WorkerDied)
EXIT_RETRY = 3
# Seconds between the attempts of ``hydrate --wait`` when the error does not say when to retry.
RETRY_POLL = 0.2
SKIPPED_EXIT = {Skip.ALREADY_ARCHIVED: 0, Skip.IN_USE: 1, Skip.ALREADY_FROZEN: 0, Skip.NOT_ARCHIVED: 1}


class Target(click.ParamType):
    """A restore target flag parsed by ``tenantsync.targets`` (the HTTP API's parser too):
    its InvalidArgument becomes click's one-line usage error naming the flag."""

    def __init__(self, name: str, parse: Callable[[str], object]):
        self.name, self._parse = name, parse

    def convert(self, value, param, ctx):
        try:
            return self._parse(value)
        except InvalidArgument as e:
            self.fail(e.problem, param, ctx)


TXID = Target("TXID", parse_txid)  # decimal or the 16 hex digits Litestream prints
TIMESTAMP = Target("TIMESTAMP", parse_timestamp)  # RFC 3339 with its zone, as UTC


class Listen(click.ParamType):
    """``HOST:PORT`` for the HTTP API, as (host, port); config.parse_listen, which
    ``python -m workers --listen`` shares."""

    name = "HOST:PORT"

    def convert(self, value, param, ctx) -> tuple[str, int]:
        try:
            return parse_listen(value)
        except ConfigError as e:
            self.fail(str(e), param, ctx)


def _replica(url: str, keyring_file: str | None = None):
    """The replica at ``url``. Imported here, not at the top: the LTX codec pulls in numpy,
    and commands that never touch a replica (``--help``, ``tenants``) should start fast.

    Given a keyring (``keyring_file``, or the keyring in $TENANTSYNC_KEYRING), a replica
    holding a tenant key is opened sealed: the tenant is the URL's last path segment, the
    name its fleet gave it."""
    from .keyring import ENV_VAR, load_keyring
    from .replica import Replica
    from .storage import open_storage

    storage = open_storage(url)
    if keyring_file is None and ENV_VAR not in os.environ:
        return Replica(storage)
    from . import tenant_key
    from .errors import ObjectNotFound

    tenant = url.partition("?")[0].rstrip("/").rpartition("/")[2]
    try:
        key = tenant_key.load(storage, tenant, load_keyring(keyring_file))
    except ObjectNotFound:
        return Replica(storage)  # a plain replica
    return Replica(key.seal(storage))


@click.group()
@click.option("-v", "--verbose", count=True, help="More logging on stderr (-vv for debug).")
@click.option("--log-format", type=click.Choice(["text", "json"]), envvar="TENANTSYNC_LOG_FORMAT", default="text",
              show_default=True, help="json: one object per line, with tenant, job and TXIDs (env TENANTSYNC_LOG_FORMAT).")
def cli(verbose: int, log_format: str) -> None:
    """Continuous replication of SQLite databases to object storage."""
    from . import logs

    os.environ["TENANTSYNC_LOG_FORMAT"] = log_format  # the fleet's child processes log alike
    logs.configure(logging.WARNING - 10 * min(verbose, 2), log_format, sys.stderr)


@cli.command()
@click.argument("db_path", type=click.Path(dir_okay=False))
@click.option("--replica", "replica_url", required=True, help="file:///dir or s3://bucket/path?endpoint=…")
@click.option("--interval", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True,
              help="Seconds between passes when no WAL event arrives.")
@click.option("--debounce", type=click.FloatRange(0), default=Config.debounce.total_seconds(), show_default=True,
              help="Seconds to gather WAL events into one pass.")
def replicate(db_path: str, replica_url: str, interval: float, debounce: float) -> None:
    """Replicate DB_PATH continuously until Ctrl-C or SIGTERM (then ship what is committed)."""
    from .replicate import run

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    run(db_path, _replica(replica_url), stop, interval=interval, debounce=debounce, report=_report)


def _report(result) -> None:
    full = f" full={result.full.value!r}" if result.full else ""
    click.echo(f"shipped txid={result.txid:016x} pages={result.pages} bytes={result.size}{full}")
    sys.stdout.flush()


@cli.command()
@click.option("--replica", "replica_url", required=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@click.option("--txid", type=TXID, default=None, help="Restore to this TXID (decimal or 16 hex digits).")
@click.option("--timestamp", type=TIMESTAMP, default=None, help="Restore to the last state before this RFC 3339 time.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--keyring-file", default=None, envvar="TENANTSYNC_KEYRING_FILE",
              help="Keyring of an encrypted replica (default: the keyring in $TENANTSYNC_KEYRING).")
def restore(replica_url: str, output: str, txid: int | None, timestamp: datetime | None, force: bool,
            keyring_file: str | None) -> None:
    """Restore a database from a replica into OUTPUT."""
    from .restore import restore as do_restore

    if txid is not None and timestamp is not None:
        raise click.UsageError("--txid and --timestamp are exclusive")
    with _progress_bar(f"restore {os.path.basename(output)}") as progress:
        result = do_restore(_replica(replica_url, keyring_file), output, txid=txid, timestamp=timestamp, force=force,
                            progress=progress)
    as_of = result.timestamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    click.echo(f"restored {output} txid={result.txid:016x} as-of={as_of} files={result.files} pages={result.pages}")


@contextlib.contextmanager
def _progress_bar(what: str, unit: str = "B"):
    """A ``progress(done, total)`` drawing a bar on stderr (of bytes, or of ``unit``), if
    stderr is a terminal (None otherwise: logs and pipes get no bar). Work done by the
    fleet's owner over its socket reports no progress: its bar shows the time spent."""
    if not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    in_bytes = unit == "B"
    with tqdm(desc=what, unit=unit, unit_scale=in_bytes, unit_divisor=1024, file=sys.stderr, leave=False) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
            if done >= total:
                bar.refresh()  # the last step is drawn even when it came within mininterval

        yield progress


def fleet_options(f):
    """Options shared by every command that works on the fleet."""
    for opt in reversed([
        click.option("--replica", "replica_url", default=None, help="Replica root URL; each tenant lives under NAME/."),
        click.option("--config", "config_path", default=None,
                     help="tenantsync.yml (default: $TENANTSYNC_CONFIG or ./tenantsync.yml)."),
        click.option("--broker", default=None, help="redis://… to run jobs on Celery workers instead of in-process."),
        click.option("--catalogue", default=None, help="SQLAlchemy URL of the catalogue (default: SQLite in ~/.local/state)."),
    ]):
        f = opt(f)
    return f


def load_config(config_path, replica_url=None, broker=None, catalogue=None, globs=(), need_replica=True):
    from . import config as configmod

    cfg = configmod.load(config_path).with_overrides(
        replica=replica_url, broker=broker, catalogue=catalogue, globs=tuple(globs)
    )
    if need_replica and not cfg.replica:
        raise click.UsageError("no replica: give --replica URL or 'replica:' in tenantsync.yml")
    return cfg


def _run_fleet(cfg, http=None) -> None:
    if not cfg.globs:
        raise click.UsageError("no databases to watch: give a GLOB or 'globs:' in tenantsync.yml")
    if http is not None:  # no token beyond loopback: refused before anything starts
        from .api_guard import is_loopback
        from .serving import api_token

        api_token(cfg, is_loopback(http[0]))
    from . import control, metrics
    from .storage import open_storage

    metrics.use_directory(control.metrics_path(cfg))  # before anything is counted, children too

    storage = open_storage(cfg.replica, cfg.storage)
    if storage.kind == "file":  # an S3 bucket is checked by its first request
        storage.make_root()
    from .process import prepare_process

    prepare_process()  # descriptors for thousands of open tenants, a short switch interval
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def report(line: str) -> None:
        click.echo(f"tenantsync: {line}", err=True)

    if cfg.broker:
        from scheduler.fleet_watch import run as run_celery  # imports Celery, only in this mode

        run_celery(cfg, stop, report=report, http=http)
    else:
        from scheduler.embedded import run as run_embedded

        run_embedded(cfg, stop, report=report, on_result=_report_job, http=http,
                     processes=cfg.host_processes(embedded=True))


@cli.command()
@click.argument("globs", nargs=-1)
@fleet_options
def watch(globs, replica_url, config_path, broker, catalogue) -> None:
    """Replicate every database matching GLOBS (e.g. '/data/*.db') until Ctrl-C or SIGTERM."""
    _run_fleet(load_config(config_path, replica_url, broker, catalogue, globs))


@cli.command()
@click.argument("globs", nargs=-1)
@fleet_options
@click.option("--listen", type=Listen(), default="127.0.0.1:8080", show_default=True, help="HOST:PORT of the HTTP API.")
def serve(globs, replica_url, config_path, broker, catalogue, listen) -> None:
    """Like watch, plus the HTTP API: POST /tenants/NAME/hydrate|archive|fork, GET /tenants/NAME,
    GET /healthz, GET /openapi.json. POSTs need the bearer token (api-token or
    TENANTSYNC_API_TOKEN; on loopback without one, the token file the log names), and so
    does everything when listening beyond loopback, which is refused without a token."""
    _run_fleet(load_config(config_path, replica_url, broker, catalogue, globs), http=listen)


@cli.command()
@fleet_options
@click.option("--state", type=click.Choice((*TENANT_STATES, "fenced")))
@click.option("--json", "as_json", is_flag=True)
def tenants(replica_url, config_path, broker, catalogue, state, as_json) -> None:
    """List tenants: name, state, size, TXID, lag, last write, lease holder."""
    import json as jsonmod

    from .catalogue import open_catalogue
    from .catalogue_schema import lag_seconds
    from .server import tenant_json

    cfg = load_config(config_path, replica_url, broker, catalogue)
    cat = open_catalogue(cfg)
    records = [] if state == "fenced" else cat.records(state=state)
    now = datetime.now(timezone.utc)
    rows = []
    if state in (None, "fenced"):
        rows += [_fenced_row(copy) for copy in cat.fenced(cfg.host)]
    for r in records:
        size = sum(os.path.getsize(p) for p in (r.path, r.path + "-wal") if os.path.exists(p))
        row = tenant_json(r, fleet=r.fleet, local_bytes=size, lag_seconds=lag_seconds(r.pending_since, now),
                          idle_seconds=(now - r.last_write_at).total_seconds() if r.last_write_at else None)
        if os.path.exists(r.path + "-wal"):  # this host's tenant: its WAL as it is now
            row["wal_bytes"] = os.path.getsize(r.path + "-wal")
        rows.append(row)
    if as_json:
        click.echo(jsonmod.dumps(rows, indent=2))
        return
    click.echo(f"fleet {cfg.fleet}: {len(rows)} tenants{f' {state}' if state else ''}")
    click.echo(f"{'name':30} {'state':9} {'size':>10} {'wal':>10} {'txid':16} {'lag':>6} {'last write':25} lease")
    for row in rows:
        lag = f"{row['lag_seconds']:.1f}" if row["lag_seconds"] is not None else "-"
        wal = row["wal_bytes"] if row["wal_bytes"] is not None else "-"
        click.echo(f"{row['name']:30} {row['state']:9} {row['local_bytes']:>10} {wal:>10} {row['txid']:16} {lag:>6} "
                   f"{row['last_write_at'] or '-':25} {row['lease_holder'] or '-'}")


def _fenced_row(copy) -> dict:  # noqa: ANN001 - a FencedCopy
    """A fenced copy (catalogue_fenced.py) as a ``tenants`` row: this host's files, aside."""
    size = sum(os.path.getsize(p) for p in (copy.aside, copy.aside + "-wal") if os.path.exists(p))
    wal = copy.aside + "-wal"
    return {"name": copy.name, "state": "fenced", "local_bytes": size,
            "wal_bytes": os.path.getsize(wal) if os.path.exists(wal) else None, "txid": f"{copy.txid:016x}",
            "lag_seconds": None, "last_write_at": None, "lease_holder": None, "path": copy.path,
            "aside": copy.aside, "reason": copy.reason, "fenced_at": copy.fenced_at.isoformat()}


@cli.command()
@click.argument("name")
@fleet_options
def unfence(name, replica_url, config_path, broker, catalogue) -> None:
    """Forget NAME's fenced copy on this host (its files stay where they were moved): the
    name is synced here again, once it is hydrated or put back. Decide on the files first."""
    from .catalogue import open_catalogue

    cfg = load_config(config_path, replica_url, broker, catalogue)
    cat = open_catalogue(cfg)
    copies = [c for c in cat.fenced(cfg.host) if c.name == name]
    if not copies or not cat.unfence(cfg.host, name):
        raise click.ClickException(f"tenant {name} has no fenced copy on host {cfg.host}")
    click.echo(f"unfenced {name} on host {cfg.host}; its fenced files are at {copies[0].aside}")


@cli.command()
@fleet_options
@click.option("--json", "as_json", is_flag=True)
def status(replica_url, config_path, broker, catalogue, as_json) -> None:
    """The fleet at a glance: tenants by state, replication lag (p50, p99, max: how long the
    oldest write not in the replica has waited), WAL bytes, the most lagging tenants."""
    import json as jsonmod

    from .catalogue import open_catalogue

    cfg = load_config(config_path, replica_url, broker, catalogue)
    summary = open_catalogue(cfg).fleet_view(datetime.now(timezone.utc)).summary()
    if as_json:
        click.echo(jsonmod.dumps({"fleet": cfg.fleet, **summary}, indent=2))
        return
    lag, wal = summary["lag_seconds"], summary["wal_bytes"]
    states = ", ".join(f"{n:,} {state}" for state, n in summary["states"].items() if n) or "none"
    click.echo(f"fleet {cfg.fleet}: {summary['tenants']:,} tenants ({states})")
    click.echo(f"lag: p50 {lag['p50']:.2f} s, p99 {lag['p99']:.2f} s, max {lag['max']:.2f} s "
               f"(max-lag {cfg.max_lag.total_seconds():g} s)")
    click.echo(f"WAL on disk: {wal['total']:,} bytes, largest {wal['largest']:,}")
    for row in summary["most_lagging"]:
        click.echo(f"  {row['name']:30} lag {row['lag_seconds']:.2f} s")


def _by_owner(cfg, call):
    """``call(owner)`` by the fleet's owner on this host (a running watch or serve, over its
    control socket), else in this process; -v tells which on stderr."""
    from .client import through_owner

    return through_owner(cfg, call)


@cli.command()
@click.argument("name")
@fleet_options
@click.option("--txid", type=TXID, default=None)
@click.option("--wait", type=click.FloatRange(min=0), default=0.0, metavar="SECONDS",
              help="Try again for up to SECONDS while the error is worth retrying (exit status 3: "
                   "another host's lease still live, no answer): a failover returns as soon as the "
                   "dead host's lease lapses.")
def hydrate(name, replica_url, config_path, broker, catalogue, txid, wait) -> None:
    """Bring tenant NAME back from the replica (no-op if it is local); prints its path."""
    cfg = load_config(config_path, replica_url, broker, catalogue)
    with _progress_bar(f"hydrate {name}") as progress:
        result = _retrying(wait, lambda: _by_owner(cfg, lambda owner: owner.hydrate(name, txid=txid,
                                                                                   progress=progress)))
    _report_aside(name, result)
    click.echo(result.path)


def _retrying(wait: float, call: Callable):
    """``call()``, made again while it raises an error of ``RETRY_LATER`` until ``wait``
    seconds have passed (then that error ends the command as any does). A lease whose
    expiry is known is waited for until then; else every ``RETRY_POLL`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return call()
        except RETRY_LATER as e:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            pause = RETRY_POLL
            if isinstance(e, LeaseHeld) and e.expires_at is not None:
                pause = max(RETRY_POLL / 4, (e.expires_at - datetime.now(timezone.utc)).total_seconds())
            time.sleep(min(left, pause))


@cli.command()
@click.argument("names", nargs=-1, required=True)
@fleet_options
def archive(names, replica_url, config_path, broker, catalogue) -> None:
    """Ship, snapshot and verify each tenant NAME, then remove its local files.

    One after the other; a tenant that cannot be archived is reported and the others go
    on. The exit status is the worst of them."""
    cfg = load_config(config_path, replica_url, broker, catalogue)
    if len(names) == 1:
        sys.exit(_archive_one(cfg, names[0]))  # an error ends it as any command's does
    worst = 0
    with _progress_bar(f"archive {len(names)} tenants", unit="tenant") as progress:
        for done, name in enumerate(names, 1):
            try:
                worst = max(worst, _archive_one(cfg, name))
            except TenantSyncError as e:
                click.echo(f"tenantsync: error: {e}", err=True)
                worst = max(worst, _exit_status(e))
            if progress:
                progress(done, len(names))
    sys.exit(worst)


def _archive_one(cfg, name: str) -> int:
    """Archive one tenant: 0, or the exit status of its Skipped outcome."""
    outcome = _by_owner(cfg, lambda owner: owner.archive(name))
    if isinstance(outcome, Archived):
        click.echo(f"archived {name} txid={outcome.txid:016x} freed={outcome.freed}")
        return 0
    status = SKIPPED_EXIT[outcome.reason]
    if status:
        click.echo(f"tenantsync: error: {outcome}", err=True)
    else:
        click.echo(str(outcome))
    return status


@cli.command()
@click.argument("name")
@click.argument("new_name")
@fleet_options
@click.option("--txid", type=TXID, default=None)
@click.option("--timestamp", type=TIMESTAMP, default=None)
def fork(name, new_name, replica_url, config_path, broker, catalogue, txid, timestamp) -> None:
    """Create tenant NEW_NAME from NAME's state at a TXID or time (default: latest)."""
    cfg = load_config(config_path, replica_url, broker, catalogue)
    with _progress_bar(f"fork {name} as {new_name}") as progress:
        result = _by_owner(cfg, lambda owner: owner.hydrate(new_name, source=name, txid=txid, timestamp=timestamp,
                                                            progress=progress))
    _report_aside(new_name, result)
    click.echo(result.path)


def _report_aside(name: str, result) -> None:
    if result.moved_aside:
        click.echo(f"tenantsync: {name}: the file at {result.path} was not the replica's database; "
                   f"kept as {result.moved_aside}", err=True)


def _report_job(job: str, outcome: Outcome) -> None:
    if isinstance(outcome, Shipped):
        full = f" full={outcome.full.value!r}" if outcome.full else ""
        click.echo(f"synced {outcome.tenant} txid={outcome.txid:016x} pages={outcome.pages}{full}")


def _levels(config_path):
    """Compaction levels and retention from tenantsync.yml (Litestream's defaults without one),
    so the one-shot commands do what the fleet's schedule does."""
    return load_config(config_path, need_replica=False).levels


@cli.command()
@click.option("--replica", "replica_url", required=True)
@click.option("--level", type=int, default=None, help="Only this level (1..3, or 9 for a snapshot).")
@click.option("--force", is_flag=True, help="Compact now even if the level's interval has not elapsed.")
@click.option("--config", "config_path", default=None, help="tenantsync.yml for the levels (default as for watch).")
def compact(replica_url: str, level: int | None, force: bool, config_path: str | None) -> None:
    """Merge LTX files into the next level (and snapshot) once; storage only."""
    from .compactor import compact as do_compact

    levels = _levels(config_path)
    replica = _replica(replica_url)
    for lvl in [level] if level is not None else [*sorted(levels.intervals), 9]:
        info = do_compact(replica, lvl, levels, force=force or level is not None)
        if info is not None:
            click.echo(f"level {lvl}: wrote {info.name} ({info.size} bytes)")


@cli.command()
@click.option("--replica", "replica_url", required=True)
@click.option("--config", "config_path", default=None,
              help="tenantsync.yml for retention, l0-retention, pitr-seconds (default as for watch).")
def retain(replica_url: str, config_path: str | None) -> None:
    """Delete files no restore inside the retention window needs; storage only."""
    from .compactor import retain as do_retain

    deleted = do_retain(_replica(replica_url), _levels(config_path))
    click.echo(f"deleted {len(deleted)} files")


@cli.command()
@click.argument("names", nargs=-1, required=True)
@fleet_options
def freeze(names, replica_url, config_path, broker, catalogue) -> None:
    """Turn archived tenants' replicas into one zstd bundle each (LTX files go once it verified).

    One after the other; a tenant that cannot be frozen is reported and the others go on.
    The exit status is the worst of them."""
    from .cold import freeze_tenant
    from .fleet import Fleet

    fleet = Fleet(load_config(config_path, replica_url, broker, catalogue))
    worst = 0
    try:
        with _progress_bar(f"freeze {len(names)} tenants", unit="tenant") as progress:
            for done, name in enumerate(names, 1):
                try:
                    worst = max(worst, _reported(freeze_tenant(fleet, name)))
                except TenantSyncError as e:
                    if len(names) == 1:
                        raise
                    click.echo(f"tenantsync: error: {e}", err=True)
                    worst = max(worst, _exit_status(e))
                if progress:
                    progress(done, len(names))
    finally:
        fleet.close()
    sys.exit(worst)


def _reported(outcome) -> int:  # noqa: ANN001 - Frozen or Skipped
    """One freeze's line: 0, or the exit status of its Skipped outcome."""
    if isinstance(outcome, Frozen):
        click.echo(f"frozen {outcome.tenant} txid={outcome.txid:016x} bytes={outcome.bytes}")
        return 0
    status = SKIPPED_EXIT[outcome.reason]
    click.echo(f"tenantsync: error: {outcome}" if status else str(outcome), err=bool(status))
    return status


@cli.command()
@click.argument("name")
@fleet_options
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="A plain SQLite file.")
@click.option("--to-replica", "to_replica", help="A plain Litestream replica URL instead (one level-9 snapshot).")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
def export(name, replica_url, config_path, broker, catalogue, output, to_replica, force) -> None:
    """Write tenant NAME's newest state, from any tier, as a plain SQLite file or replica."""
    from .cold import export as do_export
    from .fleet import Fleet

    if (output is None) == (to_replica is None):
        raise click.UsageError("give -o FILE or --to-replica URL")
    fleet = Fleet(load_config(config_path, replica_url, broker, catalogue))
    try:
        with _progress_bar(f"export {name}") as progress:
            txid = do_export(fleet, name, output, replica_url=to_replica, force=force, progress=progress)
    finally:
        fleet.close()
    click.echo(f"exported {name} txid={txid:016x} to {output or to_replica}")


@cli.group()
def dictionary() -> None:
    """The fleet's zstd dictionary for cold bundles (README: Cold tenants)."""


@dictionary.command("train")
@click.argument("paths", nargs=-1, type=click.Path(dir_okay=False))
@fleet_options
@click.option("--sample", type=click.IntRange(1), default=SAMPLE_TENANTS, show_default=True,
              help="Without PATHs: train on at most this many of this host's tenant databases, drawn at random.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random draws of tenants and pages.")
def dictionary_train(paths, replica_url, config_path, broker, catalogue, sample, seed) -> None:
    """Train a dictionary on PATHs (default: a sample of this host's tenants) and publish it
    as the one new bundles use. Earlier dictionaries stay: bundles name theirs."""
    from .dictionary import train_for_fleet
    from .fleet import Fleet

    fleet = Fleet(load_config(config_path, replica_url, broker, catalogue))
    try:
        trained, databases = train_for_fleet(fleet, paths, sample=sample, seed=seed)
    finally:
        fleet.close()
    click.echo(f"dictionary {trained.dict_id()}: {len(trained.as_bytes())} bytes trained on {databases} databases, "
               f"now current")


@dictionary.command("list")
@fleet_options
def dictionary_list(replica_url, config_path, broker, catalogue) -> None:
    """List the stored dictionaries: id, bytes, when stored, and which one is current."""
    from .dictionary import Dictionaries, dictionary_key
    from .errors import DictionaryMissing
    from .storage import open_storage

    cfg = load_config(config_path, replica_url, broker, catalogue)
    dictionaries = Dictionaries(open_storage(cfg.replica, cfg.storage))
    published, stored = dictionaries.published(), dictionaries.stored()
    click.echo(f"{'id':>10}  {'bytes':>8}  {'stored':29}  current")
    for dict_id, info in sorted(stored.items(), key=lambda item: item[1].modified):
        current = f"yes, trained on {published.databases} databases" if published and published.id == dict_id else ""
        when = info.modified.isoformat(timespec="milliseconds")
        click.echo(f"{dict_id:>10}  {info.size:>8}  {when:29}  {current}".rstrip())
    if published and published.id not in stored:
        missing = dictionaries.storage.object_url(dictionary_key(published.id))
        raise DictionaryMissing(f"{missing}: the current dictionary is missing; "
                                f"publish another (tenantsync dictionary train)")


@cli.group()
def keys() -> None:
    """Key-encryption keys of an encrypted fleet (README: Encryption at rest)."""


@keys.command("generate")
@click.argument("name")
def keys_generate(name: str) -> None:
    """Print a new random KEK as a keyring entry (add it to the keyring file)."""
    from .keyring import generate_kek

    click.echo(f"{name}: {generate_kek()}")


@keys.command("rotate")
@fleet_options
@click.option("--to", "to", default=None, help="The KEK to rewrap under (default: the keyring's current).")
def keys_rotate(replica_url, config_path, broker, catalogue, to) -> None:
    """Rewrap every tenant's data key under one KEK, rewriting no data; the old KEK can
    then leave the keyring."""
    from .fleet import Fleet
    from .keys import rotate

    cfg = load_config(config_path, replica_url, broker, catalogue)
    fleet = Fleet(cfg)
    try:
        done = rotate(fleet, to)
    finally:
        fleet.close()
    click.echo(f"key {done.kek}: {len(done.rewrapped)} rewrapped, {len(done.already)} already, "
               f"{len(done.keyless)} without a key")


@cli.command()
@click.argument("name")
@fleet_options
@click.option("--yes", is_flag=True, help="Do not ask: erase it.")
def shred(name, replica_url, config_path, broker, catalogue, yes) -> None:
    """Erase tenant NAME's replica and its key for good, with every old version a versioned
    bucket keeps of them (its local database must be gone)."""
    from .fleet import Fleet
    from .keys import shred as do_shred

    cfg = load_config(config_path, replica_url, broker, catalogue)
    if not yes:
        click.confirm(f"erase tenant {name} from {cfg.replica} for good?", abort=True)
    fleet = Fleet(cfg)
    try:
        erased = do_shred(fleet, name)
    finally:
        fleet.close()
    key = "key deleted, " if cfg.encrypt else ""
    click.echo(f"shredded {name}: {key}{erased.objects} objects and {erased.versions} old versions deleted")


@cli.group()
def ltx() -> None:
    """Inspect LTX files and replicas."""


@ltx.command("dump")
@click.argument("source")
def ltx_dump(source: str) -> None:
    """Print an LTX file's header, pages and checksums (a path or an object URL)."""
    from .ltx import Decoder
    from .storage.sealed import sealed_header

    data, name = _read_source(source)
    sealed = sealed_header(data)
    if sealed is not None:  # what its header says; the pages need the tenant's key
        click.echo(f"file:        {name} ({len(data)} bytes)")
        click.echo(f"encrypted, key id {sealed.key_id} (tenantsync sealed v{sealed.version}, "
                   f"{sealed.segment_size}-byte segments)")
        click.echo(f"plaintext size: {sealed.plaintext_size}")
        return
    dec = Decoder(data, name=name)
    h = dec.header
    ts = datetime.fromtimestamp(h.timestamp / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")
    click.echo(f"file:        {name} ({len(data)} bytes)")
    click.echo(f"flags:       0x{h.flags:08x}{' (no checksum)' if h.no_checksum else ''}")
    click.echo(f"page size:   {h.page_size}")
    click.echo(f"commit:      {h.commit}")
    click.echo(f"txid:        {h.min_txid:016x}-{h.max_txid:016x}{' (snapshot)' if h.is_snapshot else ''}")
    click.echo(f"timestamp:   {ts}")
    click.echo(f"wal:         offset={h.wal_offset} size={h.wal_size} salt={h.wal_salt1:08x}{h.wal_salt2:08x}")
    click.echo(f"pre-apply:   {h.pre_apply_checksum:016x}")
    count = 0
    for pgno, _ in dec.pages():
        count += 1
        click.echo(f"page {pgno}")
    trailer = dec.close()
    click.echo(f"pages:       {count}")
    click.echo(f"post-apply:  {trailer.post_apply_checksum:016x}")
    click.echo(f"checksum:    {trailer.file_checksum:016x} (verified)")


@ltx.command("ls")
@click.option("--replica", "replica_url", required=True)
def ltx_ls(replica_url: str) -> None:
    """List a replica's LTX files per level with TXID ranges, sizes and times."""
    replica = _replica(replica_url)
    click.echo(f"{'level':>5}  {'min_txid':16}  {'max_txid':16}  {'size':>10}  created")
    for level, files in replica.all_files().items():
        for f in files:
            created = f.created_at.isoformat(timespec="milliseconds")
            click.echo(f"{level:>5}  {f.min_txid:016x}  {f.max_txid:016x}  {f.size:>10}  {created}")


def _read_source(source: str) -> tuple[bytes, str]:
    if "://" not in source:
        try:
            with open(source, "rb") as f:
                return f.read(), source
        except OSError as e:
            raise TenantSyncError(f"{source}: cannot read: {e.strerror}") from e
    base, _, query = source.partition("?")
    parent, _, key = base.rpartition("/")
    from .storage import open_storage

    storage = open_storage(parent + ("?" + query if query else ""))
    return storage.read(key), source


def _exit_status(error: TenantSyncError) -> int:
    return EXIT_RETRY if isinstance(error, RETRY_LATER) else 1


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.UsageError as e:
        hint = f"{e.ctx.command_path}: " if e.ctx is not None else ""
        click.echo(f"tenantsync: error: {hint}{e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except TenantSyncError as e:
        click.echo(f"tenantsync: error: {e}", err=True)
        sys.exit(_exit_status(e))
    except OSError as e:
        click.echo(f"tenantsync: error: {e.filename or ''}: {e.strerror}", err=True)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
