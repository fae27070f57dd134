"""A job's outcome as the runtimes see it: whatever the job returned or raised becomes one
``tenantsync.outcome`` value per tenant, logged once here if it failed, so the admission
policy (admission.py) decides what comes next from its type alone in both runtimes."""

from __future__ import annotations

import logging
from typing import Any, Callable

from tenantsync.errors import log_failure
from tenantsync.outcome import Failed, Outcome, failed

log = logging.getLogger(__name__)


def outcome_of(job: str, name: str, call: Callable[..., Any], **kwargs: Any) -> Outcome:
    """Run ``call(name, **kwargs)`` (one tenant's job) and return its outcome; an exception
    (a bug, or a child process that died) is a ``Failed`` outcome like any other."""
    try:
        outcome = call(name, **kwargs)
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
    outcomes = dict(results)
    for outcome in outcomes.values():
        _log_failed(job, outcome)
    return outcomes


def _log_failed(job: str, outcome: Outcome) -> None:
    if isinstance(outcome, Failed):
        log_failure(log, f"{job} {outcome.tenant}", outcome.error)
