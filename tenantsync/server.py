"""``tenantsync serve``: the hydration API over HTTP, for applications in any language.

    POST /tenants/{name}/hydrate   body {} or {"txid": N} / {"timestamp": "…"}  → 200 tenant JSON
    POST /tenants/{name}/fork      body {"source": "other.db"}, and a target      → 200 tenant JSON
    POST /tenants/{name}/archive                                               → 200 tenant JSON
    GET  /tenants/{name}                                                       → 200 tenant JSON
    GET  /healthz                                                              → 200 {"ok": true, …}

Errors are JSON ``{"error": "<one line>", "type": "<its class>"}``, their status chosen by
the error's type (``STATUS``; ``error_from`` turns an answer back into the error): 400 (a
malformed body, a bad name or target), 404 (not a tenant of this fleet, or nothing in its
replica), 409 (busy, aborted, or the catalogue's row does not match the fleet), 502 (the
replica failed), 504 (the tenant's owner did not answer), 500 (a bug: its traceback goes
to the log). A job that did nothing by design answers by why (``SKIPPED``, its reason in
``skipped``): an archival refused because the tenant is in use is a 409 too.
Requests are served by threads; hydrations of one tenant coalesce in ``OnDemand``. The owner
of a fleet's tenants serves the same API on its control socket (``serve_owner``, control.py).
"""

from __future__ import annotations

import json
import logging
import re
import socket
import socketserver
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

from . import control
from .catalogue import TenantRecord
from .errors import InvalidArgument, NoAnswer, NotATenant, ReplicaEmpty, StorageError, TenantSyncError
from .outcome import Archived, Skip, Skipped
from .targets import parse_timestamp, parse_txid
from .tenants import check_name

if TYPE_CHECKING:  # the watcher serves this API without the restore code it never runs
    from .config import Config
    from .ondemand import OnDemand

log = logging.getLogger(__name__)

MAX_BODY = 64 << 10  # a hydrate body is a few bytes; anything larger is refused unread

_ROUTE = re.compile(r"^/tenants/(?P<name>[^?]+?)(?:/(?P<action>hydrate|archive|fork))?/?$")
# The most specific class wins (the first in an error's method resolution order).
STATUS = {InvalidArgument: 400, NotATenant: 404, ReplicaEmpty: 404, StorageError: 502, NoAnswer: 504,
          TenantSyncError: 409}
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


def make_handler(ondemand: OnDemand):
    catalogue = ondemand.catalogue

    class Handler(BaseHTTPRequestHandler):
        server_version = "tenantsync"

        def log_message(self, fmt, *args):  # route through logging, not stderr
            log.info("%s %s", self.address_string(), fmt % args)

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise InvalidArgument("Content-Length is not a number") from None
            if not length:
                return {}
            if not 0 < length <= MAX_BODY:
                raise InvalidArgument(f"a body of {length} bytes (at most {MAX_BODY})")
            try:
                body = json.loads(self.rfile.read(length))
            except (ValueError, UnicodeDecodeError) as e:
                raise InvalidArgument(f"the body is not JSON: {e}") from None
            if not isinstance(body, dict):
                raise InvalidArgument("the body must be a JSON object")
            return body

        def _tenant(self, m) -> str:
            return check_name(unquote(m["name"]))

        def do_GET(self):
            if self.path.rstrip("/") == "/healthz":
                return self._send(200, {"ok": True, "tenants": catalogue.count_by_state()})
            m = _ROUTE.match(self.path)
            if not m or m["action"]:
                return self._send(404, {"error": f"no route {self.path}"})
            self._answer(lambda: self._get(self._tenant(m)))

        def _get(self, name: str) -> tuple[int, dict]:
            record = catalogue.get(name)
            if record is None:
                raise NotATenant(f"tenant {name}: unknown")
            return 200, tenant_json(record)

        def do_POST(self):
            m = _ROUTE.match(self.path)
            if not m or not m["action"]:
                return self._send(404, {"error": f"no route {self.path}"})
            self._answer(lambda: self._post(self._tenant(m), m["action"], self._body()))

        def _post(self, name: str, action: str, body: dict) -> tuple[int, dict]:
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

        def _answer(self, handle) -> None:
            """Every request gets an answer: our errors by their type, a bug as a 500."""
            try:
                status, body = handle()
            except TenantSyncError as e:
                status, body = status_of(e), error_body(e)
            except Exception as e:  # noqa: BLE001 - a bug: logged with its traceback, answered
                log.exception("%s %s failed", self.command, self.path)
                status, body = 500, {"error": f"internal error: {type(e).__name__}"}
            self._send(status, body)

    return Handler


def serve(ondemand: OnDemand, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
    """A started-but-not-running server; call ``serve_forever()`` (or use a thread)."""
    server = _Server((host, port), make_handler(ondemand))
    server.daemon_threads = True
    return server


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the default 5 resets bursts of concurrent hydrations


def serve_unix(ondemand: OnDemand, path: str) -> socketserver.UnixStreamServer:
    """The same API on a Unix domain socket bound at ``path``; started-but-not-running, as
    :func:`serve`'s. Its log names each caller by its pid (the kernel's peer credentials)."""

    class LocalHandler(make_handler(ondemand)):
        def address_string(self) -> str:  # a Unix socket's client_address is an empty str
            pid, _, _ = struct.unpack("3i", self.connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                       struct.calcsize("3i")))
            return f"pid {pid}"

    return _UnixServer(path, LocalHandler)


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = _Server.request_queue_size


def serve_owner(ondemand: OnDemand, config: Config, http: tuple[str, int] | None = None,
                report: Callable[[str], None] | None = None) -> Callable[[], None]:
    """Serve the API of the process owning the fleet's tenants on this host: on the fleet's
    control socket (control.py) and, with ``http`` (host, port), over HTTP. Returns the
    function that stops both. The one place that chooses the server, so replacing
    http.server stays local to this module."""
    report = report or (lambda line: log.warning("%s", line))
    server = None if http is None else serve(ondemand, *http)  # a port in use fails here, first
    try:
        local = control.listen(lambda path: serve_unix(ondemand, path), config, report)
    except BaseException:
        if server is not None:
            server.server_close()
        raise
    if server is not None:
        threading.Thread(target=server.serve_forever, name="tenantsync-http", daemon=True).start()

    def stop() -> None:
        if local is not None:
            local.close()
        if server is not None:
            server.shutdown()

    return stop
