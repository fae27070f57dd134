"""Task wrappers: arguments in, one core call, result out.

Every task is idempotent (a sync re-reads its position from the catalogue; compaction
and snapshots write with write-if-absent; retention deletes idempotently), so Celery's
redelivery after a crash and its retries are safe. What a job's outcome asks for next
(run again while dirty, re-offer a contended tenant, back off from unreachable storage,
free the tenant for the schedule) is the dispatcher's admission policy, the same as in
embedded mode (scheduler/admission.py); a task only turns a re-offer into a Celery retry
and a failure into a failed job in Flower.
"""

from __future__ import annotations

import functools

from celery import Task

from scheduler.admission import BACKOFF_MAX, TRANSIENT_RETRIES, Ended, job_key
from scheduler.schedule import Schedule, storage_plans
from tenantsync.cold import freeze_tenant
from tenantsync.errors import StorageUnavailable
from tenantsync.outcome import Failed, Outcome, as_dict
from tenantsync.targets import parse_timestamp

from .app import app
from .runtime import dispatcher, fleet, ondemand, singleton


def _handed_on(task: Task, ended: Ended, kwargs: dict | None = None) -> dict[str, Outcome]:
    """Re-send the tenants the policy re-offers (the message's own arguments if that is all
    of them), as one message after its delay: a retry, counted in ``task.request.retries``,
    the policy's attempt. Else fail the job, with the first tenant's error, if any tenant
    failed (each is logged already), or return each tenant's outcome (Flower shows it)."""
    if ended.retry:
        args = None if len(ended.retry) == len(ended.outcomes) else [list(ended.retry)]
        raise task.retry(args=args, kwargs=kwargs, countdown=ended.retry_delay, max_retries=None)
    failed = [o for o in ended.outcomes.values() if isinstance(o, Failed)]
    if failed:
        raise failed[0].error
    return ended.outcomes


def _names(names: list[str] | str) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


@app.task(name="tenantsync.sync", bind=True, ignore_result=True)
def sync(self, names: list[str] | str) -> dict[str, Outcome]:
    """Sync a batch of this host's tenants (the dispatcher sends up to SYNC_BATCH at once)."""
    return _handed_on(self, dispatcher().run_syncs(_names(names), fleet().sync, self.request.retries))


def _storage_job(task: Task, job: str, names: list[str] | str, **kwargs) -> dict[str, Outcome]:
    """One storage job for each of a batch of tenants (the dispatcher sends up to STORAGE_BATCH)."""
    ended = dispatcher().run_jobs(job, _names(names), functools.partial(fleet().for_each, job), kwargs,
                                  batched=True, attempt=task.request.retries)
    return _handed_on(task, ended, kwargs)


@app.task(name="tenantsync.compact", bind=True, ignore_result=True)
def compact(self, names: list[str] | str, level: int = 1) -> dict[str, Outcome]:
    return _storage_job(self, "compact", names, level=level)


@app.task(name="tenantsync.snapshot", bind=True, ignore_result=True)
def snapshot(self, names: list[str] | str) -> dict[str, Outcome]:
    return _storage_job(self, "snapshot", names)


@app.task(name="tenantsync.retain", bind=True, ignore_result=True)
def retain(self, names: list[str] | str) -> dict[str, Outcome]:
    return _storage_job(self, "retain", names)


@app.task(name="tenantsync.archive", bind=True)
def archive(self, name: str) -> dict:
    """Archive one tenant (the schedule's candidates, or an HTTP API call waiting for this
    result: ``OnDemand.archive``'s outcome, as ``as_dict`` fields, since it crosses the broker
    as JSON)."""
    ended = dispatcher().run_jobs("archive", [name], ondemand().archive, {}, batched=False,
                                  attempt=self.request.retries)
    return as_dict(_handed_on(self, ended)[name])


@app.task(name="tenantsync.freeze", bind=True, ignore_result=True)
def freeze(self, name: str) -> dict:
    """Freeze one archived tenant past its ``cold-after`` into one bundle (the host's schedule's
    candidates): ``freeze_tenant``'s outcome as ``as_dict`` fields."""
    ended = dispatcher().run_jobs("freeze", [name], functools.partial(freeze_tenant, fleet()), {}, batched=False,
                                  attempt=self.request.retries)
    return as_dict(_handed_on(self, ended)[name])


@app.task(name="tenantsync.hydrate", autoretry_for=(StorageUnavailable,), retry_backoff=1,
          retry_backoff_max=BACKOFF_MAX, retry_jitter=True, max_retries=TRANSIENT_RETRIES)
def hydrate(name: str, txid: int | None = None, timestamp: str | None = None, source: str | None = None,
            failover_from: str | None = None, dead_since: str | None = None) -> dict:
    """Hydrate one tenant (with ``source``, fork it from that tenant's replica) for an API call
    waiting for this result, or for the failover plan (``failover_from``: the dead host, last
    seen at ``dead_since``);
    unreachable storage backs off as the admission policy does (a caller waits, so no
    once-key). ``timestamp`` is RFC 3339 text, as JSON carries it."""
    when = None if timestamp is None else parse_timestamp(timestamp)
    try:
        return as_dict(ondemand().hydrate(name, txid=txid, timestamp=when, source=source, failover_from=failover_from,
                                          dead_since=dead_since))
    finally:
        if failover_from is not None:  # the failover plan's once-key (scheduler/schedule.py)
            key = job_key("hydrate", {"failover_from": failover_from, "dead_since": dead_since})
            dispatcher().store.release(key, [name])


@app.task(name="tenantsync.release_idle", ignore_result=True)
def release_idle() -> list[str]:
    return fleet().release_idle()


@app.task(name="tenantsync.plan")
def plan(key) -> int:
    """Beat entry point: enqueue one schedule's jobs (see scheduler/schedule.py)."""
    return schedule().run(key)


@singleton
def schedule() -> Schedule:
    f = fleet()
    return Schedule(f.config, f.catalogue, dispatcher(), storage_plans(f.config))
