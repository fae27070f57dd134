"""One admission policy for both runtimes: which job may start now, and what comes after it.

At most one sync per tenant is queued or running. A request for a tenant that already has
one marks it *dirty* instead; the running sync then runs again at once while it is dirty
(at most AGAIN_ROUNDS times, so one hot tenant cannot hold a thread), and when it ends the
tenant is admitted once more if a write came in meanwhile. So a hot tenant costs one job at
a time, and a write that lands during a sync is never left behind.

At most one maintenance job per (job, tenant, arguments) is queued or running (its
*once-key*): the schedule offers compactions every interval and archival candidates every
run, and a round of compactions at 10,000 tenants outlasted the interval; without this the
queue only grew.

What comes after a job is decided from its outcome alone (tenantsync/outcome.py): a
``Contended`` tenant is offered again after its ``retry_after``, a transient ``Failed`` one
(storage unreachable) with exponential backoff, each still admitted meanwhile (its writes
only mark it dirty); everything else is done.

The policy keeps its marks in an :class:`AdmissionStore`: in memory for the embedded
runtime (:class:`MemoryStore`), in Redis for the Celery fleet, where every watcher and worker
must see them (admission_redis.py). A runtime subclasses :class:`AdmittingDispatcher` with how
it starts admitted jobs (threads, or Celery messages) and runs them through
:meth:`~AdmittingDispatcher.run_syncs` and :meth:`~AdmittingDispatcher.run_jobs`.
"""

from __future__ import annotations

import random
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

from tenantsync.outcome import Contended, Failed, Outcome

from .job_outcome import outcome_of, outcomes_of_batch

# Tenants per storage job handed over at once (a Celery message, a call into the embedded
# storage process): one hand-over per tenant cost more Python time, in the process that
# also syncs, than the compactions themselves at a plan boundary (docs/BENCHMARKS.md).
STORAGE_BATCH = 32
# Tenants per sync message: enough that Celery's per-message cost is shared, few enough
# that a burst (start-up: every tenant at once) is spread over every worker thread.
SYNC_BATCH = 8
# Passes one sync may run for writes that arrived while it ran, before it hands the tenant
# back to the queue (so one hot tenant cannot hold a thread for long).
AGAIN_ROUNDS = 4
# Re-offers of a contended tenant (a dead holder's lease expires after lease-ttl, 30 s),
# and of a transient failure, before the job gives up and leaves it to the catch-up plan.
CONTENDED_RETRIES = 120
TRANSIENT_RETRIES = 20
BACKOFF_MAX = 60.0


class AdmissionStore(Protocol):
    """The marks behind the policy. Each call covers a batch, atomically per tenant: as
    separate steps a request could miss the pending mark that a finishing job is clearing,
    and its dirty mark then be lost."""

    def request(self, names: list[str], stale_after: float | None = None, dirty: bool = True) -> list[bool]:
        """Per tenant: admitted (now pending), else marked dirty (unless ``dirty`` is
        false). With ``stale_after``, a tenant pending for that many seconds is admitted
        again (its job may be lost)."""

    def finish(self, names: list[str]) -> list[bool]:
        """Per tenant: clear pending; whether it was marked dirty (the mark is cleared)."""

    def take_dirty(self, name: str) -> bool:
        """Whether ``name`` was marked dirty (the mark is cleared)."""

    def claim(self, keyed: str, names: list[str]) -> list[bool]:
        """Per tenant: whether the once-key ``(keyed, tenant)`` was free (it is now taken)."""

    def release(self, keyed: str, names: list[str]) -> None:
        """Free the once-keys ``(keyed, tenant)``."""


class MemoryStore:
    """The marks of one process (the embedded runtime)."""

    def __init__(self) -> None:
        self._pending: set[str] = set()
        self._dirty: set[str] = set()
        self._once: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def request(self, names: list[str], stale_after: float | None = None, dirty: bool = True) -> list[bool]:
        # ``stale_after`` does not apply: this process's marks end with its jobs, whose
        # processes' deaths it sees (WorkerDied).
        with self._lock:
            admitted = [name not in self._pending for name in names]
            if dirty:
                self._dirty.update(name for name, ok in zip(names, admitted) if not ok)
            self._pending.update(names)
            return admitted

    def finish(self, names: list[str]) -> list[bool]:
        with self._lock:
            self._pending.difference_update(names)
            dirty = [name in self._dirty for name in names]
            self._dirty.difference_update(names)
            return dirty

    def take_dirty(self, name: str) -> bool:
        with self._lock:
            dirty = name in self._dirty
            self._dirty.discard(name)
            return dirty

    def claim(self, keyed: str, names: list[str]) -> list[bool]:
        with self._lock:
            free = [(keyed, name) not in self._once for name in names]
            self._once.update((keyed, name) for name in names)
            return free

    def release(self, keyed: str, names: list[str]) -> None:
        with self._lock:
            self._once.difference_update((keyed, name) for name in names)

    def pending(self) -> int:
        """How many syncs are queued or running."""
        with self._lock:
            return len(self._pending)


def job_key(job: str, kwargs: dict) -> str:
    """A maintenance job's name with its arguments, the once-key's first part."""
    return ":".join([job, *(f"{k}={kwargs[k]}" for k in sorted(kwargs))])


def batches(names: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(names), size):
        yield names[i:i + size]


def _jitter(seconds: float) -> float:
    """Spread over half to one and a half times: re-offers of one batch do not come back as one."""
    return seconds * (0.5 + random.random())


def retry_after(outcome: Outcome, attempt: int) -> float | None:
    """When to offer a tenant again after ``outcome`` (its ``attempt``-th re-offer, from 0),
    in seconds; None if it is done, or has been re-offered enough."""
    if isinstance(outcome, Contended):
        return _jitter(outcome.retry_after) if attempt < CONTENDED_RETRIES else None
    if isinstance(outcome, Failed) and outcome.transient:
        return _jitter(min(BACKOFF_MAX, 2.0 ** attempt)) if attempt < TRANSIENT_RETRIES else None
    return None


@dataclass
class Ended:
    """What a runtime does after a batch of jobs: ``retry`` names the tenants to run again
    (still admitted) and after how long; ``outcomes`` holds what each job did."""

    outcomes: dict[str, Outcome]
    retry: dict[str, float] = field(default_factory=dict)

    @property
    def retry_delay(self) -> float:
        """One delay for the whole re-offered batch (the longest asked for)."""
        return max(self.retry.values(), default=0.0)


class AdmittingDispatcher(ABC):
    """The policy with its store; subclasses start what it admits (:meth:`_start_syncs`,
    :meth:`_start_jobs`) and run it with :meth:`run_syncs` / :meth:`run_jobs`."""

    def __init__(self, store: AdmissionStore, on_result: Callable[[str, Outcome], None] | None = None):
        self.store = store
        self.on_result = on_result or (lambda job, outcome: None)

    def request_sync(self, name: str) -> bool:
        """Ask for a sync of ``name``; False if one was already pending (now marked dirty)."""
        return self.request_syncs([name]) == 1

    def request_syncs(self, names, stale_after: float | None = None, writes: bool = True) -> int:
        """Admit a sync for each of ``names`` without one pending (or pending for longer
        than ``stale_after`` seconds), mark the others dirty; how many were admitted (and
        started).

        ``writes`` false: the request is not for writes seen just now but for tenants found
        behind (the catch-up plan), so one with a sync pending is left as it is: that sync
        reads the WAL when it runs. Marked dirty, each would run a second, empty pass after
        it, and in a large start most tenants wait in the queue longer than the plan's
        5 s."""
        names = list(dict.fromkeys(names))
        if not names:
            return 0
        admitted = [name for name, ok in zip(names, self.store.request(names, stale_after, writes)) if ok]
        if admitted:
            try:
                self._start_syncs(admitted)
            except BaseException:
                # Not sent: no mark may say they are (it would swallow every later request).
                self.store.finish(admitted)
                raise
        return len(admitted)

    def submit(self, job: str, names, **kwargs) -> int:
        """Admit a maintenance job (compact, snapshot, retain, archive) for each of ``names``
        that has none with these arguments queued or running; how many were admitted."""
        names = list(dict.fromkeys(names))
        if not names:
            return 0
        admitted = [name for name, ok in zip(names, self.store.claim(job_key(job, kwargs), names)) if ok]
        if admitted:
            try:
                self._start_jobs(job, admitted, kwargs)
            except BaseException:
                self.store.release(job_key(job, kwargs), admitted)  # not sent: free to ask again
                raise
        return len(admitted)

    def run_syncs(self, names: list[str], sync: Callable[[str], Any], attempt: int = 0) -> Ended:
        """Sync each of ``names`` (admitted), again at once while marked dirty (AGAIN_ROUNDS);
        then end the syncs that are done, admitting again those marked dirty since. The
        caller re-runs ``Ended.retry`` after its delay, as attempt ``attempt + 1``."""
        outcomes = {}
        try:
            for name in names:
                outcome, rounds = outcome_of("sync", name, sync), 0
                while (not isinstance(outcome, (Contended, Failed)) and rounds < AGAIN_ROUNDS
                       and self.store.take_dirty(name)):
                    self.on_result("sync", outcome)
                    outcome, rounds = outcome_of("sync", name, sync), rounds + 1
                outcomes[name] = outcome
                self.on_result("sync", outcome)
        finally:  # whatever broke off the batch (a lost store, a failing callback): none stays pending
            ended = _ended(outcomes, attempt)
            done = [name for name in names if name not in ended.retry]
            if done:
                self.request_syncs([name for name, dirty in zip(done, self.store.finish(done)) if dirty])
        return ended

    def run_jobs(self, job: str, names: list[str], call: Callable[..., Any], kwargs: dict, *,
                 batched: bool, attempt: int = 0) -> Ended:
        """Run maintenance job ``job`` for ``names`` (admitted): ``call(names, **kwargs)`` for a
        batched (storage) job, else ``call(name, **kwargs)`` for each; free the once-keys of
        those that are done. The caller re-runs ``Ended.retry`` as for syncs."""
        outcomes: dict[str, Outcome] = {}
        try:
            if batched:
                outcomes = outcomes_of_batch(job, names, call, **kwargs)
            else:
                outcomes = {name: outcome_of(job, name, call, **kwargs) for name in names}
            for outcome in outcomes.values():
                self.on_result(job, outcome)
        finally:  # as for syncs: no once-key stays taken by a job that broke off
            ended = _ended(outcomes, attempt)
            self.store.release(job_key(job, kwargs), [name for name in names if name not in ended.retry])
        return ended

    @abstractmethod
    def _start_syncs(self, names: list[str]) -> None:
        """Start syncs of ``names``, just admitted."""

    @abstractmethod
    def _start_jobs(self, job: str, names: list[str], kwargs: dict) -> None:
        """Start maintenance job ``job`` for ``names``, just admitted."""


def _ended(outcomes: dict[str, Outcome], attempt: int) -> Ended:
    retry = {name: delay for name, outcome in outcomes.items()
             if (delay := retry_after(outcome, attempt)) is not None}
    return Ended(outcomes, retry)
