"""A job's outcome as the runtimes see it: whatever the job returned or raised becomes one
``tenantsync.outcome`` value per tenant, so the admission policy (admission.py) decides what
comes next from its type alone in both runtimes.

A failure is logged when it starts, and again when the job works again: not at every retry.
An outage of the store fails every tenant's sync for as long as it lasts, and a line per
attempt would bury the one line per tenant that says what happened (``FAILING``)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
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
    FAILING.note(job, outcome)
    return outcome


def outcomes_of_batch(job: str, names: list[str], call: Callable[..., dict], **kwargs: Any) -> dict[str, Outcome]:
    """Run ``call(names, **kwargs)`` (a storage job for a batch of tenants: ``Fleet.for_each``)
    and return each tenant's outcome. A batch that fails as a whole (storage unreachable, the
    storage process died) is one log line and the same ``Failed`` for each of its tenants."""
    try:
        results = call(names, **kwargs)
    except Exception as e:  # noqa: BLE001 - the whole batch
        outcomes = {name: failed(name, e) for name in names}
        if FAILING.started(job, outcomes.values()):
            log_failure(log, f"{job} of {len(names)} tenants ({names[0]}, ...)", e)
        return outcomes
    outcomes = dict(results)
    for outcome in outcomes.values():
        FAILING.note(job, outcome)
    return outcomes


@dataclass
class _Failure:
    kind: type
    since: float  # monotonic
    attempts: int = 1


class FailureLog:
    """The (job, tenant) pairs whose last run failed in this process, with the kind of
    error and since when: memory for the failing tenants only, none for the others."""

    def __init__(self) -> None:
        self._failing: dict[tuple[str, str], _Failure] = {}
        self._lock = threading.Lock()

    def note(self, job: str, outcome: Outcome) -> None:
        """Log ``outcome`` if it starts or changes a failure, or ends one."""
        if isinstance(outcome, Failed):
            if not self.started(job, [outcome]):
                return
            if outcome.transient:  # StorageUnavailable: one line of ours, never a traceback
                log.error("%s %s failed: %s (retried with backoff; logged again once it works or fails "
                          "otherwise)", job, outcome.tenant, outcome.error)
            else:
                log_failure(log, f"{job} {outcome.tenant}", outcome.error)
            return
        with self._lock:
            ended = self._failing.pop((job, outcome.tenant), None)
        if ended is not None:
            log.warning("%s %s works again, after %d failed attempt(s) in %.0f s", job, outcome.tenant,
                        ended.attempts, time.monotonic() - ended.since)

    def started(self, job: str, outcomes) -> bool:
        """Record these Failed outcomes; whether any of them is new or of another kind."""
        new = False
        with self._lock:
            for outcome in outcomes:
                key, kind = (job, outcome.tenant), type(outcome.error)
                known = self._failing.get(key)
                if known is not None and known.kind is kind:
                    known.attempts += 1
                else:
                    self._failing[key] = _Failure(kind, time.monotonic())
                    new = True
        return new


FAILING = FailureLog()
