"""The fleet owner's HTTP API (``tenantsync serve``, and the control socket), as a Starlette app.

    POST /tenants/{name}/hydrate   body {} or {"txid": N} / {"timestamp": "…"}  → 200 tenant JSON
    POST /tenants/{name}/fork      body {"source": "other.db"}, and a target      → 200 tenant JSON
    POST /tenants/{name}/archive                                               → 200 tenant JSON
    GET  /tenants/{name}                                                       → 200 tenant JSON
    GET  /healthz                                                              → 200 {"ok": true, …}
    GET  /openapi.json                                                         → this, described

Errors are JSON ``{"error": "<one line>", "type": "<its class>"}``, their status chosen by
the error's type (``STATUS``; ``error_from`` turns an answer back into the error): 400 (a
malformed body, a bad name or target), 401 (no or a wrong token), 403 (a cross-site or
foreign-host request), 404 (not a tenant of this fleet, or nothing in its replica), 408 (a
body not sent in time), 409 (busy, aborted, or the catalogue's row does not match the
fleet), 413 (a body too large), 502 (the replica failed), 503 (the broker or the catalogue
did not answer: ask again), 504 (the tenant's owner did not answer), 500 (a bug: its traceback goes to the log). A job that did nothing by design
answers by why (``SKIPPED``, its reason in ``skipped``): an archival refused because the
tenant is in use is a 409 too.

Who may call what is ``api_guard``'s; how it is served (uvicorn, TCP and the control
socket) is ``serving``'s. Handlers that wait for a job run on a bounded thread pool;
hydrations of one tenant coalesce in ``OnDemand``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.convertors import StringConvertor, register_url_convertor
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .catalogue import TenantRecord
from .errors import (BrokerUnavailable, CatalogueUnavailable, InvalidArgument, NoAnswer, NotATenant, ReplicaEmpty,
                     Shredded, StorageError, TenantSyncError)
from .outcome import Archived, Skip, Skipped
from .targets import parse_timestamp, parse_txid
from .tenants import check_name

if TYPE_CHECKING:  # the watcher serves this API without the restore code it never runs
    from .ondemand import OnDemand

log = logging.getLogger(__name__)

MAX_BODY = 64 << 10  # a hydrate body is a few bytes; anything larger is refused unread
# Seconds a client has to send its body: a short body under a long Content-Length must not
# hold its request (and a worker thread) for ever.
BODY_TIMEOUT = 10.0
# The most specific class wins (the first in an error's method resolution order).
STATUS = {InvalidArgument: 400, NotATenant: 404, ReplicaEmpty: 404, Shredded: 410, StorageError: 502,
          BrokerUnavailable: 503, CatalogueUnavailable: 503, NoAnswer: 504, TenantSyncError: 409}
# A Skipped outcome's status, by its reason: archived already is what was asked for.
SKIPPED = {Skip.ALREADY_ARCHIVED: 200, Skip.IN_USE: 409}
# An answer's error of a type this process does not know comes back as its status's most general one.
_BY_STATUS = {status: cls for cls, status in reversed(STATUS.items())}


def status_of(e: TenantSyncError) -> int:
    return next(STATUS[c] for c in type(e).__mro__ if c in STATUS)


def error_body(e: TenantSyncError) -> dict:
    return {"error": str(e), "type": type(e).__name__}


def error_from(status: int, body: dict) -> TenantSyncError:
    """The error an answer carries (``error_body``), as the type that was raised, so a caller
    of the API (client.py) catches what an in-process call raises. A type is known here if
    its module is loaded: one the caller names in an ``except`` always is."""
    cls = _error_classes().get(body.get("type")) or _BY_STATUS.get(status, TenantSyncError)
    return cls(body.get("error") or f"the API answered {status}")


def _error_classes() -> dict[str, type[TenantSyncError]]:
    found, todo = {}, [TenantSyncError]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.__name__, cls)
        todo.extend(cls.__subclasses__())
    return {name: cls for name, cls in found.items() if not name.startswith("_")}


def hydrate_target(body: dict) -> dict:
    """The hydrate body's restore target, checked before anything acts on it."""
    unknown = set(body) - {"txid", "timestamp"}
    if unknown:
        raise InvalidArgument(f"unknown field(s) {', '.join(sorted(unknown))} (expected txid or timestamp)")
    txid, ts = body.get("txid"), body.get("timestamp")
    return {"txid": None if txid is None else parse_txid(txid),
            "timestamp": None if ts is None else parse_timestamp(ts)}


def archive_answer(outcome: Archived | Skipped, record: TenantRecord | None) -> tuple[int, dict]:
    """An archival's HTTP status and body: the tenant's row, ``archived``, the bytes ``freed``
    and the archived ``txid``, or, if it was Skipped, why (an error body when that is a refusal)."""
    if isinstance(outcome, Archived):
        return 200, tenant_json(record, archived=True, freed=outcome.freed, txid=f"{outcome.txid:016x}")
    status = SKIPPED[outcome.reason]
    if status >= 400:
        return status, {"error": str(outcome), "skipped": outcome.reason.value}
    return status, tenant_json(record, archived=outcome.reason is Skip.ALREADY_ARCHIVED, skipped=outcome.reason.value)


def tenant_json(record: TenantRecord | None, **extra) -> dict:
    if record is None:
        return extra
    out = {
        "name": record.name,
        "path": record.path,
        "state": record.state.value,
        "txid": f"{record.txid or 0:016x}",
        "last_write_at": record.last_write_at.isoformat() if record.last_write_at else None,
        "last_sync_at": record.last_sync_at.isoformat() if record.last_sync_at else None,
        "lease_holder": record.lease_holder,
        "bytes_stored": record.bytes_stored,
        "wal_bytes": record.wal_bytes,
        "last_error": record.last_error,
    }
    out.update(extra)
    return out


def fork_source(body: dict) -> str:
    """The fork body's source tenant, taken out of ``body`` (the rest is a hydrate target)."""
    source = body.pop("source", None)
    if not isinstance(source, str):
        raise InvalidArgument("a fork needs the name of its source tenant: {\"source\": \"NAME\"}")
    return check_name(source)


class BodyRefused(InvalidArgument):
    """A body too large (413) or not sent in time (408); nothing was read into memory past
    MAX_BODY."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


async def json_body(request: Request) -> dict:
    """The request's JSON object body ({} if empty), read within MAX_BODY and BODY_TIMEOUT."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        raise BodyRefused(f"a body of {declared} bytes (at most {MAX_BODY})", 413)
    chunks, size = [], 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise BodyRefused(f"a body of more than {MAX_BODY} bytes", 413)
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), BODY_TIMEOUT)
    except asyncio.TimeoutError:
        raise BodyRefused(f"the body was not sent within {BODY_TIMEOUT:g} s", 408) from None
    except ClientDisconnect:
        raise BodyRefused("the client went away before its body ended", 400) from None
    raw = b"".join(chunks)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"the body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise InvalidArgument("the body must be a JSON object")
    return body


def answer_error(request: Request, e: Exception) -> JSONResponse:
    """Every failure gets an answer: our errors by their type, a bug as a 500."""
    if isinstance(e, BodyRefused):
        return JSONResponse(error_body(e), e.status)
    if isinstance(e, TenantSyncError):
        return JSONResponse(error_body(e), status_of(e))
    log.error("%s %s failed", request.method, request.url.path, exc_info=e)
    return JSONResponse({"error": f"internal error: {type(e).__name__}"}, 500)


def answering(endpoint):  # noqa: ANN001, ANN201 - a Starlette endpoint
    """``endpoint`` answering every failure itself (``answer_error``): an exception left to
    Starlette would be answered and then raised again into the server's log."""

    async def answered(request: Request) -> JSONResponse:
        try:
            return await endpoint(request)
        except Exception as e:  # noqa: BLE001 - every failure is answered; a bug is logged there
            return answer_error(request, e)

    return answered


def tenant_routes(ondemand: OnDemand) -> list[Route]:
    """The tenant API's routes over ``ondemand`` (OnDemand, or OnDemandVia its owner)."""
    catalogue = ondemand.catalogue

    async def get_tenant(request: Request) -> JSONResponse:
        name = check_name(request.path_params["name"])
        record = await run_in_threadpool(catalogue.get, name)
        if record is None:
            raise NotATenant(f"tenant {name}: unknown")
        return JSONResponse(tenant_json(record))

    async def act(request: Request) -> JSONResponse:
        name, action = check_name(request.path_params["name"]), request.path_params["action"]
        body = await json_body(request)
        status, answer = await run_in_threadpool(_act, name, action, body)
        return JSONResponse(answer, status)

    def _act(name: str, action: str, body: dict) -> tuple[int, dict]:
        if action == "archive":
            if body:
                raise InvalidArgument("archive takes no body")
            outcome = ondemand.archive(name)
            return archive_answer(outcome, catalogue.get(name))
        source = fork_source(body) if action == "fork" else None
        result = ondemand.hydrate(name, source=source, **hydrate_target(body))
        extra = {"restored": result.restored}
        if result.moved_aside:
            extra["moved_aside"] = result.moved_aside
        return 200, tenant_json(catalogue.get(name), **extra)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True, "tenants": await run_in_threadpool(catalogue.count_by_state)})

    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(OPENAPI)

    return [
        Route("/healthz", answering(healthz), methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/tenants/{name:tenant}/{action:action}", answering(act), methods=["POST"]),
        Route("/tenants/{name:tenant}", answering(get_tenant), methods=["GET"]),
    ]


def make_app(ondemand: OnDemand, routes: list[Route] = ()) -> Starlette:
    """The API as an ASGI app: the tenant routes and ``routes`` (metrics, pages); a route
    that is not there is a JSON 404 (or 405) too."""
    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": f"no route {request.method} {request.url.path}"},
                            getattr(exc, "status_code", 404))

    handlers = {404: not_found, 405: not_found}
    return Starlette(routes=[*tenant_routes(ondemand), *routes], exception_handlers=handlers)


class _Action(StringConvertor):
    """``{action:action}`` matches the three POST actions only, so a tenant name may hold
    slashes (``a/b.db``) and ``GET /tenants/a/b.db`` is a tenant, not an action."""

    regex = "hydrate|archive|fork"


class _Name(StringConvertor):
    """``{name:tenant}``: any characters, line breaks included, so that a hostile name
    reaches ``check_name`` and its 400 instead of falling through to "no route"."""

    regex = "[\\s\\S]+"


register_url_convertor("action", _Action())
register_url_convertor("tenant", _Name())


_TENANT = {"type": "object", "properties": {
    "name": {"type": "string"}, "path": {"type": "string"}, "state": {"type": "string"},
    "txid": {"type": "string", "description": "16 hex digits"},
    "last_write_at": {"type": ["string", "null"], "format": "date-time"},
    "last_sync_at": {"type": ["string", "null"], "format": "date-time"},
    "lease_holder": {"type": ["string", "null"]}, "bytes_stored": {"type": ["integer", "null"]},
    "wal_bytes": {"type": ["integer", "null"]}, "last_error": {"type": ["string", "null"]}}}
_ERROR = {"type": "object", "required": ["error"],
          "properties": {"error": {"type": "string"}, "type": {"type": "string"}, "skipped": {"type": "string"}}}
_TARGET = {"type": "object", "additionalProperties": False, "properties": {
    "txid": {"oneOf": [{"type": "integer"}, {"type": "string"}]},
    "timestamp": {"type": "string", "format": "date-time"}}}


def _op(summary: str, body: dict | None = None, secured: bool = True) -> dict:
    op = {"summary": summary, "parameters": [{"name": "name", "in": "path", "required": True,
                                              "schema": {"type": "string"}}],
          "responses": {"200": {"description": "the tenant",
                                "content": {"application/json": {"schema": _TENANT}}},
                        "default": {"description": "an error, its status by its type",
                                    "content": {"application/json": {"schema": _ERROR}}}}}
    if body is not None:
        op["requestBody"] = {"required": False, "content": {"application/json": {"schema": body}}}
    if secured:
        op["security"] = [{"bearer": []}]
    return op


#: The API described (OpenAPI 3.1); tests/test_api.py checks it names every route.
OPENAPI = {
    "openapi": "3.1.0",
    "info": {"title": "tenantsync", "version": "1"},
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    "paths": {
        "/tenants/{name}": {"get": _op("A tenant's catalogue row", secured=False)},
        "/tenants/{name}/hydrate": {"post": _op("Bring an archived tenant back (to a TXID or time)", _TARGET)},
        "/tenants/{name}/fork": {"post": _op("A new tenant from another's replica", {
            **_TARGET, "required": ["source"], "properties": {**_TARGET["properties"], "source": {"type": "string"}}})},
        "/tenants/{name}/archive": {"post": _op("Ship, verify and remove a tenant's local files")},
        "/healthz": {"get": {"summary": "Alive, with tenants by state", "responses": {"200": {"description": "ok"}}}},
    },
}
