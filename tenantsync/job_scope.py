"""Where one tenant's job starts and ends: its outcome and time counted in the metrics, and
every line it logs marked with the job and the tenant (logs.about).

Applied to the core's job entry points (``Fleet.sync``, each tenant of ``Fleet.for_each``,
``OnDemand.hydrate`` and ``archive``), so both runtimes and every process count and mark
the same way. The decorated callable's last positional argument is the tenant's name.
"""

from __future__ import annotations

import functools
import time

from . import logs, metrics


def tenant_job(job: str):  # noqa: ANN201 - a decorator
    def decorate(call):  # noqa: ANN001, ANN202
        @functools.wraps(call)
        def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            started = time.monotonic()
            with logs.about(job=job, tenant=args[-1] if args else None):
                try:
                    outcome = call(*args, **kwargs)
                except BaseException as e:
                    metrics.job_done(job, e, time.monotonic() - started)
                    raise
            metrics.job_done(job, outcome, time.monotonic() - started)
            return outcome

        return run

    return decorate
