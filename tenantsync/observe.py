"""What operators' tools read from the fleet's API: ``/metrics`` (Prometheus) and ``/readyz``.

``/healthz`` says the process answers. ``/readyz`` says the fleet can do its work: the
catalogue answers, the object store answers, the broker answers (Celery mode), and no
tenant's replication lag is above ``max-lag`` (LiteFS's health check fails the same way
past its ``max-lag``); otherwise 503, naming what failed and the most lagging tenants.
The store is asked at most once per ``STORE_CHECK_EVERY``, however often a probe asks, and
waited for at most ``CHECK_WAIT``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import metrics
from .server import answering

#: Seconds a store check's answer is reused for.
STORE_CHECK_EVERY = 5.0
#: Seconds /readyz waits for a check before answering that it did not answer.
CHECK_WAIT = 2.0
#: Most lagging tenants named by an unready /readyz.
WORST_NAMED = 10


class CachedCheck:
    """``check()`` (raises when the thing checked does not answer), run at most once per
    ``every`` seconds (default STORE_CHECK_EVERY) on a thread of its own, and waited for at
    most CHECK_WAIT: a probe answers in seconds even when the store holds requests for
    longer. ``error()`` is the last failure as one line, or None."""

    def __init__(self, check: Callable[[], object], every: float | None = None):
        self.check, self.every = check, STORE_CHECK_EVERY if every is None else every
        self._at, self._error = -self.every, None
        self._running: threading.Thread | None = None
        self._lock = threading.Lock()

    def error(self) -> str | None:
        with self._lock:
            if self._running is None and time.monotonic() - self._at >= self.every:
                self._running = threading.Thread(target=self._run, name="tenantsync-check", daemon=True)
                self._running.start()
            running = self._running
        if running is not None:
            running.join(CHECK_WAIT)
            if running.is_alive():
                return f"no answer within {CHECK_WAIT:g} s"
        return self._error

    def _run(self) -> None:
        try:
            self.check()
            error = None
        except Exception as e:  # noqa: BLE001 - any failure is the answer
            error = str(e).splitlines()[0] if str(e) else type(e).__name__
        with self._lock:
            self._error, self._at, self._running = error, time.monotonic(), None


def observe_routes(catalogue, max_lag: float, checks: dict[str, CachedCheck],  # noqa: ANN001
                   collectors: tuple = ()) -> list[Route]:
    """``/metrics`` and ``/readyz`` over ``catalogue``; ``checks`` names what else must answer
    ("store", "broker"), ``collectors`` what else /metrics reports (the broker's queues)."""

    async def scrape(request: Request) -> Response:
        text, content_type = await run_in_threadpool(metrics.exposition, catalogue, max_lag, collectors)
        return Response(text, media_type=content_type)

    def ready() -> tuple[int, dict]:
        failed = {}
        try:
            view = catalogue.fleet_view(datetime.now(timezone.utc))
        except Exception as e:  # noqa: BLE001 - the catalogue not answering is the answer
            return 503, {"ready": False, "failed": {"catalogue": str(e).splitlines()[0]}}
        for what, check in checks.items():
            if (error := check.error()) is not None:
                failed[what] = error
        worst = view.worst(WORST_NAMED, above=max_lag)
        if worst:
            over = sum(1 for lag in view.lags.values() if lag > max_lag)
            failed["lag"] = f"{over} tenant(s) lag more than {max_lag:g} s"
        body = {"ready": not failed, "tenants": view.tenants, "max_lag": max_lag,
                "worst_lag": max(view.lags.values(), default=0.0)}
        if failed:
            body["failed"] = failed
            body["lagging"] = [{"name": n, "lag": round(v, 3)} for n, v in worst]
        return (503 if failed else 200), body

    async def readyz(request: Request) -> JSONResponse:
        status, body = await run_in_threadpool(ready)
        return JSONResponse(body, status)

    return [Route("/metrics", answering(scrape), methods=["GET"]), Route("/readyz", answering(readyz), methods=["GET"])]
