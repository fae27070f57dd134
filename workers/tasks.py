"""Task wrappers: arguments in, one core call, result out.

Every task is idempotent (a sync re-reads its position from the catalogue; compaction
and snapshots write with write-if-absent; retention deletes idempotently), so Celery's
redelivery after a crash and its retries are safe. Transient storage errors retry with
exponential backoff; anything else is recorded and fails the job visibly in Flower.
"""

from __future__ import annotations

import random

from tenantsync.errors import StorageUnavailable

from .app import app
from .runtime import dispatcher, fleet, ondemand, singleton

RETRY = dict(autoretry_for=(StorageUnavailable,), retry_backoff=1, retry_backoff_max=60, retry_jitter=True,
             max_retries=20)


# A sync that found the tenant's lease held by another process (or its next TXID already
# written) shipped nothing, so it runs again, on whichever worker takes it, after about
# CONTENDED_DELAY seconds; a dead holder's lease expires after lease-ttl (30 s).
CONTENDED_DELAY = 1.0
CONTENDED_RETRIES = 120


# Passes one sync job may run for writes that arrived while it ran, before it hands the
# tenant back to the queue (so one hot tenant cannot hold a thread for long).
AGAIN_ROUNDS = 4


@app.task(name="tenantsync.sync", bind=True, ignore_result=True, **RETRY)
def sync(self, name: str) -> dict:
    from scheduler.queue import finish_sync, take_dirty

    retrying = False
    try:
        result = fleet().sync(name)
        rounds = 0
        while not result.get("retry") and rounds < AGAIN_ROUNDS and take_dirty(dispatcher(), name):
            result, rounds = fleet().sync(name), rounds + 1
        if result.get("retry") and self.request.retries < CONTENDED_RETRIES:
            retrying = True  # the tenant stays pending (its writes only mark it dirty) until the retry runs
            raise self.retry(countdown=CONTENDED_DELAY * (0.5 + random.random()), max_retries=CONTENDED_RETRIES)
        return result
    except StorageUnavailable:
        retrying = self.request.retries < self.max_retries  # else autoretry gives up: finish below
        raise
    finally:
        if not retrying:
            finish_sync(dispatcher(), name)


def _storage_job(job: str, name: str, **kwargs) -> dict:
    """One storage job; whatever its outcome, the schedule may offer it again afterwards
    (its once-key, set when it was submitted, is cleared)."""
    try:
        return getattr(fleet(), job)(name, **kwargs)
    finally:
        dispatcher().finish(job, name, **kwargs)


@app.task(name="tenantsync.compact", ignore_result=True, **RETRY)
def compact(name: str, level: int = 1) -> dict:
    return _storage_job("compact", name, level=level)


@app.task(name="tenantsync.snapshot", ignore_result=True, **RETRY)
def snapshot(name: str) -> dict:
    return _storage_job("snapshot", name)


@app.task(name="tenantsync.retain", ignore_result=True, **RETRY)
def retain(name: str) -> dict:
    return _storage_job("retain", name)


@app.task(name="tenantsync.archive")
def archive(name: str) -> dict:
    from tenantsync.ondemand import ArchiveAborted

    try:
        return ondemand().archive(name)
    except ArchiveAborted as e:  # the tenant is in use: a normal outcome, not a failure
        return {"tenant": name, "archived": False, "skipped": str(e)}
    finally:
        dispatcher().finish("archive", name)


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
