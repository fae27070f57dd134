"""The Celery-mode dispatcher: jobs onto queues, one pending sync per tenant across hosts.

Dedupe lives in Redis so every watcher and worker sees it: ``SET NX`` on a per-tenant
*pending* key admits one sync; later requests set a *dirty* key instead. Requests come in
batches (one per watcher tick): the keys of a batch are set in one round trip (a script)
and the admitted tenants go out as one ``tenantsync.sync`` message per host queue and
SYNC_BATCH tenants, because Celery's own cost per message (publish, deliver, ack, trace)
was most of a sync's cost at 200 writes/s. The sync task calls :func:`finish_syncs` when
it is done, which clears *pending* and takes *dirty*, and if it was set requests one more
sync. Both steps are Lua scripts, atomic per tenant: as separate commands a request could
fail its ``SET NX``, the job finish, and the request's dirty mark then wait for the catch-up
check (a commit seen after 14 s at 10,000 tenants). So no write is ever left unsynced. Before
that, the task takes the *dirty* mark itself (:func:`take_dirty`) a few times and syncs
again at once: a write during a sync then waits for one pass, not for the whole queue.
Keys expire, so a worker killed mid-job cannot wedge a tenant; the periodic catch-up
check re-requests anything that lags.
"""

from __future__ import annotations

import redis
from celery import Celery
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from .dispatch import STORAGE_BATCH, job_key

PENDING_TTL = 300
# Tenants per sync message: enough that Celery's per-message cost is shared, few enough
# that a burst (start-up: every tenant at once) is spread over every worker thread.
SYNC_BATCH = 8
# A broker restart must neither kill the watcher nor fail a sync that is done: each Redis
# call is retried on connection errors, with backoff, for about half a minute.
REDIS_RETRIES = 20


# Per tenant (KEYS: pending, dirty, pending, dirty, ...): admit a sync, else mark it dirty.
_REQUEST = """
local admitted = {}
for i = 1, #KEYS, 2 do
  if redis.call('SET', KEYS[i], 1, 'NX', 'EX', ARGV[1]) then
    admitted[#admitted + 1] = 1
  else
    redis.call('SET', KEYS[i + 1], 1, 'EX', ARGV[1])
    admitted[#admitted + 1] = 0
  end
end
return admitted
"""
# Per tenant (KEYS: once-keys): admit a maintenance job unless one is queued or running.
_ONCE = """
local admitted = {}
for i = 1, #KEYS do
  admitted[i] = redis.call('SET', KEYS[i], 1, 'NX', 'EX', ARGV[1]) and 1 or 0
end
return admitted
"""
# Per tenant: the sync ended; clear pending and say whether a write came in meanwhile.
_FINISH = """
local dirty = {}
for i = 1, #KEYS, 2 do
  redis.call('DEL', KEYS[i])
  dirty[#dirty + 1] = redis.call('GETDEL', KEYS[i + 1]) and 1 or 0
end
return dirty
"""


def once_key(job: str, name: str, kwargs: dict | None = None) -> str:
    return f"tenantsync:{job_key(job, kwargs or {})}:pending:{name}"


def _keys(name: str) -> tuple[str, str]:
    return f"tenantsync:sync:pending:{name}", f"tenantsync:sync:dirty:{name}"


class CeleryDispatcher:
    def __init__(self, app: Celery, host: str, redis_url: str | None = None, host_workers: int = 1):
        from workers.app import STORAGE_QUEUE

        self.app = app
        self.host, self.host_workers = host, host_workers
        self.storage_queue = STORAGE_QUEUE
        self.redis = redis.Redis.from_url(
            redis_url or app.conf.broker_url,
            retry=Retry(ExponentialWithJitterBackoff(cap=2.0, base=0.05), REDIS_RETRIES),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        self._request = self.redis.register_script(_REQUEST)
        self._finish = self.redis.register_script(_FINISH)
        self._once = self.redis.register_script(_ONCE)

    def host_queue(self, name: str) -> str:
        from workers.app import host_queue

        return host_queue(self.host, name, self.host_workers)

    def request_sync(self, name: str) -> bool:
        return self.request_syncs([name]) == 1

    def request_syncs(self, names) -> int:
        """Queue a sync for each tenant without one pending, mark the others dirty; how many
        were queued."""
        names = list(dict.fromkeys(names))
        if not names:
            return 0
        admitted = self._request(keys=[key for name in names for key in _keys(name)], args=[PENDING_TTL])
        by_queue: dict[str, list[str]] = {}
        for name, ok in zip(names, admitted):
            if ok:
                by_queue.setdefault(self.host_queue(name), []).append(name)
        for queue, queued in by_queue.items():
            for i in range(0, len(queued), SYNC_BATCH):
                self.app.send_task("tenantsync.sync", args=[queued[i:i + SYNC_BATCH]], queue=queue,
                                   ignore_result=True)
        return sum(map(len, by_queue.values()))

    def submit(self, job: str, names, **kwargs) -> int:
        """Storage-only jobs go to the shared queue, STORAGE_BATCH tenants per message; jobs
        on local files to each tenant's host queue, one per message. Tenants with the same
        job already queued or running are skipped (the schedule re-offers candidates every
        run); how many were queued."""
        from workers.app import HOST_JOBS

        names = list(dict.fromkeys(names))
        if not names:
            return 0
        task = f"tenantsync.{job}"
        admitted = self._once(keys=[once_key(job, name, kwargs) for name in names], args=[PENDING_TTL])
        queued = [name for name, ok in zip(names, admitted) if ok]
        if task in HOST_JOBS:
            for name in queued:
                self.app.send_task(task, args=[name], kwargs=kwargs, queue=self.host_queue(name), ignore_result=True)
        else:
            for i in range(0, len(queued), STORAGE_BATCH):
                self.app.send_task(task, args=[queued[i:i + STORAGE_BATCH]], kwargs=kwargs, queue=self.storage_queue,
                                   ignore_result=True)
        return len(queued)

    def finish(self, job: str, names: list[str], **kwargs) -> None:
        """The jobs submitted with these arguments have ended: the schedule may offer them again."""
        self.redis.delete(*(once_key(job, name, kwargs) for name in names))

    def close(self) -> None:
        self.redis.close()


def take_dirty(dispatcher: CeleryDispatcher, name: str) -> bool:
    """Whether a write arrived during the running sync (and clear the mark): the task
    then syncs again itself instead of queueing behind every other tenant's job."""
    return bool(dispatcher.redis.getdel(_keys(name)[1]))


def finish_syncs(dispatcher: CeleryDispatcher, names: list[str]) -> None:
    """The syncs of ``names`` have ended: clear *pending* and sync again whoever was
    marked dirty in between (one script for the whole batch, atomic per tenant)."""
    if not names:
        return
    dirty = dispatcher._finish(keys=[key for name in names for key in _keys(name)])
    dispatcher.request_syncs([name for name, mark in zip(names, dirty) if mark])


class CeleryOnDemand:
    """Hydration and archival as Celery jobs on this host's queue, for ``serve`` in fleet mode.

    The HTTP API waits for the job's result, so callers see the same answers as in
    embedded mode; the worker's OnDemand coalesces concurrent calls for one tenant.
    """

    def __init__(self, dispatcher: CeleryDispatcher, catalogue, config, timeout: float = 300.0):
        from tenantsync.tenants import Pattern

        self.dispatcher = dispatcher
        self.catalogue = catalogue
        self.patterns = [Pattern.parse(g) for g in config.globs]
        self.timeout = timeout

    def hydrate(self, name: str, *, txid: int | None = None, timestamp=None):
        from tenantsync.errors import InvalidArgument
        from tenantsync.outcome import Hydrated
        from tenantsync.tenants import locate

        if timestamp is not None:
            raise InvalidArgument("timestamp hydration runs in embedded mode or with `tenantsync fork`")
        locate(self.patterns, name)  # not a tenant of this fleet: refused before any job is sent
        job = self.dispatcher.app.send_task("tenantsync.hydrate", args=[name], kwargs={"txid": txid},
                                            queue=self.dispatcher.host_queue(name))
        r = job.get(timeout=self.timeout)
        return Hydrated(name, r["path"], r["txid"], r["restored"])

    def archive(self, name: str):
        from tenantsync.outcome import Archived, Skip, Skipped
        from tenantsync.tenants import locate

        locate(self.patterns, name)
        job = self.dispatcher.app.send_task("tenantsync.archive", args=[name], queue=self.dispatcher.host_queue(name))
        r = job.get(timeout=self.timeout)  # outcome.as_dict's fields
        if r["outcome"] == "Archived":
            return Archived(name, r["txid"], r["freed"])
        return Skipped(name, Skip[r["reason"].upper()], r["detail"])
