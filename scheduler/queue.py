"""The Celery-mode dispatcher: jobs onto queues, one pending sync per tenant across hosts.

The admission policy (admission.py) keeps its marks in Redis (admission_redis.py), so
every watcher and worker sees them. Requests come in batches (one per watcher tick): the
marks of a batch are set in one round trip, and the admitted tenants go out as one
``tenantsync.sync`` message per host queue and SYNC_BATCH tenants, because Celery's own
cost per message (publish, deliver, ack, trace) is of the order of a small sync's.
The tasks (workers/tasks.py) run their tenants with this dispatcher's ``run_syncs`` and
``run_jobs``, so a sync ends, re-runs while dirty and is re-offered as in embedded mode.
"""

from __future__ import annotations

import contextlib

import kombu.exceptions
import redis
from celery import Celery
from celery.exceptions import TimeoutError as ResultTimeout
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from tenantsync.errors import BrokerUnavailable, NoAnswer
from tenantsync.outcome import from_dict
from tenantsync.tenants import locate, patterns

from .admission import STORAGE_BATCH, SYNC_BATCH, AdmittingDispatcher, batches
from .admission_redis import RedisStore
from .routing import HOST_JOBS, STORAGE_QUEUE, host_queue

# A broker restart must neither kill the watcher nor fail a sync that is done: each Redis
# call is retried on connection errors, with backoff, for about half a minute.
REDIS_RETRIES = 20


class CeleryDispatcher(AdmittingDispatcher):
    def __init__(self, app: Celery, host: str, redis_url: str | None = None, host_workers: int = 1, fleet: str = ""):
        self.app = app
        self.host, self.host_workers = host, host_workers
        self.redis = redis.Redis.from_url(
            redis_url or app.conf.broker_url,
            retry=Retry(ExponentialWithJitterBackoff(cap=2.0, base=0.05), REDIS_RETRIES),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        super().__init__(RedisStore(self.redis, fleet, host))

    def host_queue(self, name: str) -> str:
        return host_queue(self.host, name, self.host_workers)

    def _start_syncs(self, names: list[str]) -> None:
        by_queue: dict[str, list[str]] = {}
        for name in names:
            by_queue.setdefault(self.host_queue(name), []).append(name)
        with _publishing():
            for queue, queued in by_queue.items():
                for batch in batches(queued, SYNC_BATCH):
                    self.app.send_task("tenantsync.sync", args=[batch], queue=queue, ignore_result=True)

    def _start_jobs(self, job: str, names: list[str], kwargs: dict) -> None:
        """Storage-only jobs go to the shared queue, STORAGE_BATCH tenants per message; jobs
        on local files to each tenant's host queue, one per message."""
        task = f"tenantsync.{job}"
        with _publishing():
            self._send_jobs(task, names, kwargs)

    def _send_jobs(self, task: str, names: list[str], kwargs: dict) -> None:
        if task in HOST_JOBS:
            for name in names:
                self.app.send_task(task, args=[name], kwargs=kwargs, queue=self.host_queue(name), ignore_result=True)
        else:
            for batch in batches(names, STORAGE_BATCH):
                self.app.send_task(task, args=[batch], kwargs=kwargs, queue=STORAGE_QUEUE, ignore_result=True)

    def close(self) -> None:
        self.redis.close()


@contextlib.contextmanager
def _publishing():
    """A publish the broker refused through every retry (``task_publish_retry_policy``) is
    BrokerUnavailable, one line: the caller keeps what it could not send."""
    try:
        yield
    except (kombu.exceptions.OperationalError, redis.ConnectionError, redis.TimeoutError) as e:
        raise BrokerUnavailable(f"broker: the job was not sent: {e}") from e


class HostQueueRoute:
    """Fleet mode's owners (owner.py): a job on the host queue of the tenant's worker, its
    result waited for (the HTTP API answers with it, as in embedded mode; the worker's
    OnDemand coalesces concurrent calls for one tenant). Tenants of other fleets are refused
    before any job is sent. A fork's restore time crosses the broker's JSON as RFC 3339 text."""

    def __init__(self, dispatcher: CeleryDispatcher, config, timeout: float = 300.0):
        self.dispatcher = dispatcher
        self.patterns = patterns(config.globs)
        self.timeout = timeout

    def __call__(self, job: str, name: str, **kwargs):
        if kwargs.get("timestamp") is not None:
            kwargs["timestamp"] = kwargs["timestamp"].isoformat()
        locate(self.patterns, name)
        queue = self.dispatcher.host_queue(name)
        sent = self.dispatcher.app.send_task(f"tenantsync.{job}", args=[name], kwargs=kwargs, queue=queue)
        try:
            answer = sent.get(timeout=self.timeout)
        except ResultTimeout:
            sent.forget()  # nobody waits for it now: stop listening for it (the job itself still runs)
            raise NoAnswer(f"{job} {name}: no answer within {self.timeout:g} s from a worker of queue {queue} "
                           f"(is `python -m workers` running on host {self.dispatcher.host}?); the job stays "
                           "queued") from None
        return from_dict(answer)  # an outcome, crossed the broker as JSON
