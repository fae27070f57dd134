"""A job's outcome as the runtimes see it: whatever the job returned or raised becomes one
``tenantsync.outcome`` value per tenant, logged once here if it failed, so the admission
policy (admission.py) decides what comes next from its type alone in both runtimes."""

from __future__ import annotations

import logging
from typing import Any, Callable

from tenantsync.errors import StorageUnavailable, log_failure
from tenantsync.outcome import (Archived, Contended, Contention, Deleted, Failed, Full, NothingNew, Outcome,
                                Shipped, Skip, Skipped, Written)

log = logging.getLogger(__name__)


def failed(name: str, error: BaseException) -> Failed:
    """A job's exception as its outcome: storage that cannot be reached is worth a retry."""
    return Failed(name, error, transient=isinstance(error, StorageUnavailable))


def outcome_of(job: str, name: str, call: Callable[..., Any], **kwargs: Any) -> Outcome:
    """Run ``call(name, **kwargs)`` (one tenant's job) and return its outcome; an exception
    (a bug, or a child process that died) is a ``Failed`` outcome like any other."""
    try:
        outcome = _legacy_outcome(job, name, call(name, **kwargs))
    except Exception as e:  # one tenant's failure must not stop the others
        outcome = failed(name, e)
    _log_failed(job, outcome)
    return outcome


def outcomes_of_batch(job: str, names: list[str], call: Callable[..., dict], **kwargs: Any) -> dict[str, Outcome]:
    """Run ``call(names, **kwargs)`` (a storage job for a batch of tenants: ``Fleet.for_each``)
    and return each tenant's outcome. A batch that fails as a whole (storage unreachable, the
    storage process died) is one log line and the same ``Failed`` for each of its tenants."""
    try:
        results = call(names, **kwargs)
    except Exception as e:  # noqa: BLE001 - the whole batch
        log_failure(log, f"{job} of {len(names)} tenants ({names[0]}, ...)", e)
        return {name: failed(name, e) for name in names}
    outcomes = {name: _legacy_outcome(job, name, result) for name, result in results.items()}
    for outcome in outcomes.values():
        _log_failed(job, outcome)
    return outcomes


def _log_failed(job: str, outcome: Outcome) -> None:
    if isinstance(outcome, Failed):
        log_failure(log, f"{job} {outcome.tenant}", outcome.error)


# Until fix/outcome: the seconds a contended sync waits (its dict does not say), and a
# full upload's reason (Capture's text) as a ``Full``; any other text is a WAL gap.
_LEGACY_CONTENDED_AFTER = 1.0
_LEGACY_FULL = {"new replica": Full.FIRST, "database file replaced": Full.CHANGED_OUTSIDE_WAL,
                "position not from a WAL": Full.REPLICA_MOVED}


# removed at merge with fix/outcome (Fleet's jobs then return outcomes themselves)
def _legacy_outcome(job: str, name: str, result: Any) -> Outcome:
    """This branch's Fleet jobs return dicts, and ``Fleet.for_each`` exceptions: their outcome.
    Outcomes pass through unchanged."""
    if isinstance(result, BaseException):
        return failed(name, result)
    if not isinstance(result, dict):
        return result
    if job == "sync":
        if result.get("retry"):
            why = Contention.TXID_TAKEN if result["skipped"] == "conflict" else Contention.LEASE_HELD
            return Contended(name, why, _LEGACY_CONTENDED_AFTER, result["skipped"])
        if result.get("txid"):
            reason = result["full"]
            full = None if reason is None else next(
                (f for text, f in _LEGACY_FULL.items() if reason.startswith(text)), Full.WAL_GAP)
            return Shipped(name, result["txid"], result["pages"], result["bytes"], full)
        return NothingNew(name) if "txid" in result else Skipped(name, Skip.NOT_REPLICABLE)
    if job in ("compact", "snapshot"):
        if result["file"] is None:
            return Skipped(name, Skip.NOTHING_TO_MERGE)
        return Written(name, job, result["file"], result.get("level"))
    if job == "retain":
        return Deleted(name, result["deleted"])
    if job == "archive":
        if not result["archived"]:
            return Skipped(name, Skip.IN_USE, result["skipped"])
        return Skipped(name, Skip.ALREADY_ARCHIVED) if result.get("skipped") else Archived(name, result["txid"])
    raise TypeError(f"{job} {name}: no outcome for {result!r}")
