"""Task wrappers: arguments in, one core call, result out.

Every task is idempotent (a sync re-reads its position from the catalogue; compaction
and snapshots write with write-if-absent; retention deletes idempotently), so Celery's
redelivery after a crash and its retries are safe. Transient storage errors retry with
exponential backoff; anything else is recorded and fails the job visibly in Flower.
"""

from __future__ import annotations

import logging
import random

from tenantsync.errors import StorageUnavailable, log_failure
from tenantsync.outcome import Contended, Failed, NothingNew, Shipped, as_dict

from .app import app
from .runtime import dispatcher, fleet, ondemand, singleton

log = logging.getLogger(__name__)

RETRY = dict(autoretry_for=(StorageUnavailable,), retry_backoff=1, retry_backoff_max=60, retry_jitter=True,
             max_retries=20)


# A sync that found the tenant's lease held by another process (or its next TXID already
# written) shipped nothing, so it runs again, on whichever worker takes it, after about
# the outcome's retry_after seconds; a dead holder's lease expires after lease-ttl (30 s).
CONTENDED_RETRIES = 120


# Passes one sync job may run for writes that arrived while it ran, before it hands the
# tenant back to the queue (so one hot tenant cannot hold a thread for long).
AGAIN_ROUNDS = 4


@app.task(name="tenantsync.sync", bind=True, ignore_result=True)
def sync(self, names: list[str] | str) -> dict:
    """Sync a batch of this host's tenants (the dispatcher sends up to SYNC_BATCH at once).

    Tenants whose lease is held elsewhere, or whose storage is unreachable, are sent
    again by themselves (the others are done), after their retry_after or a backoff; until
    then they stay pending, so their writes only mark them dirty.
    """
    from scheduler.queue import finish_syncs

    names = [names] if isinstance(names, str) else list(names)
    results: dict[str, object] = {}
    again: list[str] = []
    unavailable = False
    contended_after = 0.0
    failed: list[Exception] = []
    retrying: list[str] = []
    try:
        for name in names:
            try:
                outcome = results[name] = _sync_one(name)
            except Exception as e:  # the rest of the batch goes on
                log_failure(log, f"sync {name}", e)
                failed.append(e)
                continue
            if isinstance(outcome, Contended):
                contended_after = max(contended_after, outcome.retry_after)
                again.append(name)
            elif isinstance(outcome, Failed) and outcome.transient:
                unavailable = True
                again.append(name)
            elif isinstance(outcome, Failed):  # recorded in the catalogue
                log_failure(log, f"sync {name}", outcome.error)
                failed.append(outcome.error)
        limit = RETRY["max_retries"] if unavailable else CONTENDED_RETRIES
        retrying = again if self.request.retries < limit else []
    finally:
        finish_syncs(dispatcher(), [n for n in names if n not in retrying])
    if retrying:
        delay = min(RETRY["retry_backoff_max"], 2 ** self.request.retries) if unavailable else contended_after
        raise self.retry(args=[retrying], countdown=delay * (0.5 + random.random()), max_retries=None)
    if failed:
        raise failed[0]  # the job shows as failed in Flower, with the first tenant's error
    return results


def _sync_one(name: str) -> dict:
    """One tenant's sync, again at once while writes arrived during it (AGAIN_ROUNDS)."""
    from scheduler.queue import take_dirty

    result = fleet().sync(name)
    rounds = 0
    while isinstance(result, (Shipped, NothingNew)) and rounds < AGAIN_ROUNDS and take_dirty(dispatcher(), name):
        result, rounds = fleet().sync(name), rounds + 1
    return result


def _storage_jobs(job: str, names: list[str] | str, **kwargs) -> dict:
    """One storage job for each of a batch of tenants (the dispatcher sends up to
    STORAGE_BATCH). One tenant's failure does not stop the others; an unreachable storage
    retries the whole batch (every job is idempotent). Whatever the outcome, the schedule
    may offer them again afterwards (their once-keys, set when submitted, are cleared)."""
    names = [names] if isinstance(names, str) else list(names)
    try:
        results = fleet().for_each(job, names, **kwargs)
    finally:
        dispatcher().finish(job, names, **kwargs)
    failed = {name: r.error for name, r in results.items() if isinstance(r, Failed)}
    for name, e in failed.items():
        log_failure(log, f"{job} {name}", e)
    if failed:
        raise next(iter(failed.values()))  # the job shows as failed in Flower, with the first tenant's error
    return results


@app.task(name="tenantsync.compact", ignore_result=True, **RETRY)
def compact(names: list[str] | str, level: int = 1) -> dict:
    return _storage_jobs("compact", names, level=level)


@app.task(name="tenantsync.snapshot", ignore_result=True, **RETRY)
def snapshot(names: list[str] | str) -> dict:
    return _storage_jobs("snapshot", names)


@app.task(name="tenantsync.retain", ignore_result=True, **RETRY)
def retain(names: list[str] | str) -> dict:
    return _storage_jobs("retain", names)


@app.task(name="tenantsync.archive")
def archive(name: str) -> dict:
    """Archived, or Skipped (in use, archived already), as outcome.as_dict's fields."""
    try:
        return as_dict(ondemand().archive(name))
    finally:
        dispatcher().finish("archive", [name])


@app.task(name="tenantsync.hydrate", **RETRY)
def hydrate(name: str, txid: int | None = None) -> dict:
    result = ondemand().hydrate(name, txid=txid)
    return {"tenant": name, "path": result.path, "txid": result.txid, "restored": result.restored}


@app.task(name="tenantsync.release_idle", ignore_result=True)
def release_idle() -> list[str]:
    return fleet().release_idle()


@app.task(name="tenantsync.plan")
def plan(key) -> int:
    """Beat entry point: enqueue one schedule's jobs (see scheduler/schedule.py)."""
    return schedule().run(key)


@singleton
def schedule():
    from scheduler.schedule import Schedule, storage_plans

    f = fleet()
    return Schedule(f.config, f.catalogue, dispatcher(), storage_plans(f.config))
