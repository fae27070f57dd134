"""``tenantsync serve``: the hydration API over HTTP, for applications in any language.

    POST /tenants/{name}/hydrate   body {} or {"txid": N} / {"timestamp": "…"}  → 200 tenant JSON
    POST /tenants/{name}/archive                                               → 200 result JSON
    GET  /tenants/{name}                                                       → 200 tenant JSON
    GET  /healthz                                                              → 200 {"ok": true, …}

Errors are JSON ``{"error": "<one line>"}`` with 404 (unknown tenant), 409 (busy or
aborted) or 502 (the replica failed). Requests are served by threads; hydrations of one
tenant coalesce in ``OnDemand``.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime
from typing import TYPE_CHECKING
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

from .catalogue import TenantRecord
from .errors import ArchiveAborted, RestoreError, StorageError, TenantSyncError

if TYPE_CHECKING:  # the watcher serves this API without the restore code it never runs
    from .ondemand import OnDemand

log = logging.getLogger(__name__)

_ROUTE = re.compile(r"^/tenants/(?P<name>[^?]+?)(?:/(?P<action>hydrate|archive))?/?$")


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
        "last_error": record.last_error,
    }
    out.update(extra)
    return out


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
            length = int(self.headers.get("Content-Length") or 0)
            if not length:
                return {}
            body = json.loads(self.rfile.read(length))
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            return body

        def do_GET(self):
            if self.path.rstrip("/") == "/healthz":
                return self._send(200, {"ok": True, "tenants": catalogue.count_by_state()})
            m = _ROUTE.match(self.path)
            if not m or m["action"]:
                return self._send(404, {"error": f"no route {self.path}"})
            record = catalogue.get(unquote(m["name"]))
            if record is None:
                return self._send(404, {"error": f"tenant {unquote(m['name'])}: unknown"})
            self._send(200, tenant_json(record))

        def do_POST(self):
            m = _ROUTE.match(self.path)
            if not m or not m["action"]:
                return self._send(404, {"error": f"no route {self.path}"})
            name = unquote(m["name"])
            try:
                body = self._body()
                if m["action"] == "hydrate":
                    ts = body.get("timestamp")
                    result = ondemand.hydrate(
                        name,
                        txid=body.get("txid"),
                        timestamp=datetime.fromisoformat(ts) if ts else None,
                    )
                    return self._send(200, tenant_json(catalogue.get(name), restored=result.restored))
                return self._send(200, ondemand.archive(name))
            except (ValueError, json.JSONDecodeError) as e:
                return self._send(400, {"error": f"bad request: {e}"})
            except ArchiveAborted as e:
                return self._send(409, {"error": str(e)})
            except RestoreError as e:
                return self._send(404 if "no LTX files" in str(e) else 409, {"error": str(e)})
            except StorageError as e:
                return self._send(502, {"error": str(e)})
            except TenantSyncError as e:
                return self._send(409, {"error": str(e)})

    return Handler


def serve(ondemand: OnDemand, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
    """A started-but-not-running server; call ``serve_forever()`` (or use a thread)."""
    server = _Server((host, port), make_handler(ondemand))
    server.daemon_threads = True
    return server


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the default 5 resets bursts of concurrent hydrations
