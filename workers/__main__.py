"""``python -m workers``: a Celery worker for this host's queues, without the ``celery`` command.

The ``celery`` command imports every installed plugin before it reads its arguments
(Flower's web stack, the REPL's prompt_toolkit), and a worker process keeps them for its
whole life; this launcher imports only the worker. Same app,
same settings and tasks; host-queue workers need the threads pool (one process holds its
tenants' open captures), so it is the only one offered.

    python -m workers                    # this host's queue, host.<host>
    python -m workers --shard 1          # host.<host>.1, with host-workers: N in the config
    python -m workers --storage          # and a storage worker beside it, started on demand
    python -m workers -Q storage -c 2    # only storage jobs (and beat's plans)
    python -m workers --storage --watch  # and the watcher (instead of tenantsync watch)
    python -m workers --beat             # and the storage plans' beat (instead of celery beat)

``--watch`` runs the host's watcher in this process, ``--beat`` the fleet's beat schedule
(``scheduler/beat.py``), each on a thread, as ``celery worker -B`` runs beat: on a small host
each is one Python process fewer. One watcher per host, one beat per fleet.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from celery.signals import worker_ready, worker_shutdown
from celery.utils.nodenames import default_nodename, host_format

from tenantsync import config as configmod

from scheduler.routing import PLAN_QUEUE, shard_queue
from scheduler.schedule import beat_schedule

from .app import app, config, storage_without_plans
from .storage_child import StorageChild, exit_when_idle

log = logging.getLogger("workers")

STOP_TIMEOUT = 10.0


def queues(config: configmod.Config, shard: int | None) -> list[str]:
    """This host's queue (``host.<host>``, or shard ``K`` of ``host.<host>.<0..N-1>``)."""
    n = config.host_processes(embedded=False)
    if n > 1 and shard is None:
        raise SystemExit(f"workers: the config has host-workers: {n}; pass --shard K (0..{n - 1}), one worker each")
    if shard is not None and not 0 <= shard < n:
        raise SystemExit(f"workers: --shard {shard} is outside 0..{n - 1} (host-workers: {n})")
    return [shard_queue(config.host, shard or 0, n)]


def watch_beside(config: configmod.Config, http: tuple[str, int] | None) -> None:
    """Run the watcher on a thread of this worker from its start to its shutdown. If the
    watcher fails, the worker stops too, so its supervisor restarts both: a worker left
    running without it would replicate nothing new, silently."""
    stop = threading.Event()

    def watch() -> None:
        # Imported only here: most workers run no watcher, and its modules (inotify, the
        # HTTP server) would stay in every worker's memory.
        from scheduler.fleet_watch import run as run_watcher

        try:
            run_watcher(config, stop, report=lambda line: log.warning("tenantsync: %s", line), http=http, app=app)
        except BaseException:
            log.exception("the watcher failed; stopping this worker")
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="tenantsync-watcher", daemon=True)

    def stop_watching(**_) -> None:
        stop.set()
        thread.join(STOP_TIMEOUT)  # it releases its inotify watches and HTTP port

    worker_ready.connect(lambda **_: thread.start(), weak=False)
    worker_shutdown.connect(stop_watching, weak=False)


def beat_beside(config: configmod.Config, schedule_file: str) -> None:
    """Run the storage plans' beat on a thread of this worker (Celery's threaded embedded
    beat), from the worker's start to its shutdown."""
    from celery.beat import EmbeddedService  # only in the one worker per fleet that runs beat

    app.conf.beat_schedule = beat_schedule(config)
    beat = EmbeddedService(app, thread=True, schedule_filename=schedule_file)
    worker_ready.connect(lambda **_: beat.start(), weak=False)
    worker_shutdown.connect(lambda **_: beat.stop(), weak=False)


def storage_beside(hostname: str, loglevel: str) -> None:
    """Start the on-demand storage worker (storage_child.py) with this worker, stop it with it."""
    child = StorageChild(hostname, loglevel)
    worker_ready.connect(lambda **_: child.start(), weak=False)
    worker_shutdown.connect(lambda **_: child.stop(), weak=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workers", description=__doc__.split("\n\n")[0])
    p.add_argument("-Q", "--queues", help="comma-separated queues, instead of this host's")
    p.add_argument("--shard", type=int, help="which host.<host>.K queue (config host-workers > 1)")
    p.add_argument("--storage", action="store_true",
                   help="also run storage jobs (compact, snapshot, retain): a niced storage worker, started while they wait")
    p.add_argument("-c", "--concurrency", type=int, default=8, help=f"job threads (default 8, at most {configmod.MAX_SYNC_THREADS})")
    p.add_argument("-n", "--hostname", help="node name (default: the first queue @ this machine)")
    p.add_argument("-l", "--loglevel", default="INFO")
    p.add_argument("--watch", action="store_true", help="also run this host's watcher (tenantsync watch)")
    p.add_argument("--listen", metavar="HOST:PORT", help="with --watch: serve the HTTP API (tenantsync serve)")
    p.add_argument("--beat", action="store_true", help="also run the storage plans' beat (celery beat)")
    p.add_argument("--beat-schedule", default="celerybeat-schedule", metavar="FILE",
                   help="with --beat: where beat keeps its last run times (celery beat -s)")
    p.add_argument("--exit-when-idle", type=float, metavar="SECONDS", help=argparse.SUPPRESS)  # --storage's child
    a = p.parse_args(argv)
    if not 1 <= a.concurrency <= configmod.MAX_SYNC_THREADS:
        raise SystemExit(f"workers: -c/--concurrency {a.concurrency} is outside 1..{configmod.MAX_SYNC_THREADS}")
    if a.listen and not a.watch:
        raise SystemExit("workers: --listen serves the watcher's HTTP API; it needs --watch")
    if a.watch:
        if not config.globs:
            raise SystemExit("workers: --watch needs 'globs:' in tenantsync.yml (or TENANTSYNC_GLOBS)")
        try:
            http = configmod.parse_listen(a.listen) if a.listen else None
        except configmod.ConfigError as e:
            raise SystemExit(f"workers: --listen {e}") from None
        watch_beside(config, http)
    if a.beat:
        beat_beside(config, a.beat_schedule)
    names = [q for q in a.queues.split(",") if q] if a.queues else queues(config, a.shard)
    hostname = host_format(default_nodename(a.hostname or f"{names[0]}@%h"))
    if a.storage:
        names.append(PLAN_QUEUE)  # beat's plans enqueue storage jobs: here, not in the child (app.py)
        storage_beside(hostname, a.loglevel)
    if a.exit_when_idle:  # the child of a --storage worker
        storage_without_plans()
        exit_when_idle(a.exit_when_idle)
    worker = app.Worker(
        queues=names,
        pool_cls="threads",
        concurrency=a.concurrency,
        hostname=hostname,
        loglevel=a.loglevel,
        # Gossip and mingle let workers discover each other at start; these workers never
        # need to, and their broadcasts would wake every worker for every peer's event.
        without_gossip=True,
        without_mingle=True,
    )
    worker.start()
    return worker.exitcode or 0


if __name__ == "__main__":
    sys.exit(main())
