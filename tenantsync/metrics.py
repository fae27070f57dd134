"""The fleet's Prometheus metrics, with the same series whether it holds 10 tenants or 10,000.

Two sources. What every process of the host does (jobs, object-store requests, leases) is
counted where it happens, through prometheus_client in its multiprocess mode: each process
writes its counters to files in the fleet's metrics directory, and the process serving
``/metrics`` adds them up, so the host's metrics are complete whichever process (the
watcher, a shard child, a Celery worker) did the work. What the fleet *is* (tenants by
state, replication lag, WAL bytes) is read from the catalogue at each scrape, which every
process writes. No label names a tenant: per-tenant detail is the API's and the page's.

Litestream labels every gauge by database path (series without bound at thousands of
tenants) and has no lag metric; LiteFS's ``litefs_db_lag_seconds`` is the model for lag.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from types import SimpleNamespace

log = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"
#: ``TENANTSYNC_METRICS=off``: the processes count nothing (each call returns at once) and
#: ``/metrics`` shows only what the catalogue says. For a host nobody scrapes, and for
#: measuring what counting costs a sync (bench/fleet.py's ``ts-embedded-nometrics``).
SWITCH = "TENANTSYNC_METRICS"
_OFF = {"off", "0", "false", "no"}
#: Seconds; lag and job durations from a commit batch (ms) to an outage (minutes).
LAG_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_PID_FILE = re.compile(r"_(\d+)\.db$")


def use_directory(path: str) -> None:
    """Count this process's metrics in ``path`` (and its children's: the environment is
    inherited), removing the files of processes that are gone. Called by a fleet process
    before anything is counted; a process that counted already keeps counting in memory."""
    if _made:
        log.warning("metrics: counted before the metrics directory was set; this process's counts stay in memory")
        return
    os.makedirs(path, mode=0o700, exist_ok=True)
    for entry in os.listdir(path):
        m = _PID_FILE.search(entry)
        if m and not _alive(int(m.group(1))):
            try:
                os.unlink(os.path.join(path, entry))
            except FileNotFoundError:
                pass
    os.environ[ENV] = path
    if "prometheus_client" in sys.modules:
        # Loaded before this (the `celery` command loads its plugins first, Flower's with
        # it), when the environment did not say multiprocess yet: prometheus_client picks
        # its value class from the environment when it is imported, so pick it again.
        from prometheus_client import values

        values.ValueClass = values.get_value_class()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_made: list[SimpleNamespace] = []
_making = threading.Lock()


def _instruments() -> SimpleNamespace | None:
    """The counters, made once, on first use (prometheus_client reads ENV when it is
    imported); under a lock, as two job threads may count their first job together.
    None when SWITCH turns counting off."""
    if _made:
        return _made[0]
    with _making:
        if not _made:
            _made.append(None if os.environ.get(SWITCH, "on").lower() in _OFF else _make())
        return _made[0]


def _make() -> SimpleNamespace:
    from prometheus_client import Counter, Histogram

    return SimpleNamespace(
        jobs=Counter("tenantsync_jobs", "Jobs run, by kind and outcome.", ["job", "outcome"]),
        job_seconds=Histogram("tenantsync_job_duration_seconds", "Time one tenant's job took.", ["job"],
                              buckets=LAG_BUCKETS),
        requests=Counter("tenantsync_store_requests", "Object-store requests, by operation and result.",
                         ["operation", "result"]),
        request_seconds=Histogram("tenantsync_store_request_duration_seconds",
                                  "Time one object-store request took, its body included.", ["operation"],
                                  buckets=REQUEST_BUCKETS),
        store_bytes=Counter("tenantsync_store_bytes", "Bytes sent to and received from the object store.",
                            ["direction"]),
        handovers=Counter("tenantsync_lease_handovers", "Leases taken over from another holder after expiry."),
        fenced=Counter("tenantsync_fence_refusals", "Uploads refused because the lease was no longer held."),
    )


def job_done(job: str, outcome: object, seconds: float) -> None:
    """One tenant's ``job`` ended with ``outcome`` (an Outcome, or the exception it raised)."""
    m = _instruments()
    if m is None:
        return
    kind = "failed" if isinstance(outcome, BaseException) else type(outcome).__name__.lower()
    m.jobs.labels(job, kind).inc()
    m.job_seconds.labels(job).observe(seconds)


def store_request(operation: str, result: str, seconds: float, sent: int = 0, received: int = 0) -> None:
    m = _instruments()
    if m is None:
        return
    m.requests.labels(operation, result).inc()
    m.request_seconds.labels(operation).observe(seconds)
    if sent:
        m.store_bytes.labels("up").inc(sent)
    if received:
        m.store_bytes.labels("down").inc(received)


def lease_handover() -> None:
    if m := _instruments():
        m.handovers.inc()


def fence_refusal() -> None:
    if m := _instruments():
        m.fenced.inc()


class FleetCollector:
    """What the catalogue says at scrape time: tenants by state, lag, WAL bytes."""

    def __init__(self, catalogue, max_lag: float):  # noqa: ANN001 - a Catalogue
        self.catalogue, self.max_lag = catalogue, max_lag

    def collect(self) -> Iterator:
        from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily
        from prometheus_client.utils import floatToGoString

        view = self.catalogue.fleet_view(datetime.now(timezone.utc))
        states = GaugeMetricFamily("tenantsync_tenants", "Tenants by state.", labels=["state"])
        for state, n in view.states.items():
            states.add_metric([state], n)
        yield states
        buckets, below = [], 0
        lags = sorted(view.lags.values())
        for bound in LAG_BUCKETS:
            while below < len(lags) and lags[below] <= bound:
                below += 1
            buckets.append((floatToGoString(bound), below + (view.tenants - len(lags))))
        buckets.append(("+Inf", view.tenants))
        yield GaugeHistogramMetricFamily(
            "tenantsync_replication_lag_seconds",
            "Tenants by how long their oldest write not in the replica has waited (0: current).",
            buckets=buckets, gsum_value=sum(lags))
        yield GaugeMetricFamily("tenantsync_replication_lag_max_seconds", "The most lagging tenant's lag.",
                                value=lags[-1] if lags else 0.0)
        yield GaugeMetricFamily("tenantsync_replication_lag_limit_seconds", "max-lag, past which /readyz fails.",
                                value=self.max_lag)
        yield GaugeMetricFamily("tenantsync_wal_bytes", "Bytes in all tenants' WAL files after their last sync.",
                                value=view.wal_total)
        yield GaugeMetricFamily("tenantsync_wal_largest_bytes", "The largest tenant WAL after its last sync.",
                                value=view.wal_largest)


def exposition(catalogue, max_lag: float, collectors: tuple = ()) -> tuple[bytes, str]:  # noqa: ANN001
    """The text a scrape gets, and its content type; ``collectors`` add what only the
    runtime knows (the broker's queues in Celery mode)."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    _instruments()  # every series exists from the first scrape on, at 0
    fleet = CollectorRegistry()
    for collector in (FleetCollector(catalogue, max_lag), *collectors):
        fleet.register(collector)
    if os.environ.get(ENV):
        processes = CollectorRegistry()
        MultiProcessCollector(processes)
    else:
        processes = REGISTRY  # this process's own counters
    started = time.monotonic()
    for attempt in range(3):
        try:
            counted = generate_latest(processes)
            break
        except struct.error:
            # A process that just started counting has created its file but not yet written
            # its header (prometheus_client reads the directory without locks): read again.
            if attempt == 2:
                raise
            time.sleep(0.01)
    text = counted + generate_latest(fleet)
    log.debug("metrics: %d bytes in %.3f s", len(text), time.monotonic() - started)
    return text, CONTENT_TYPE_LATEST
