"""Serving the fleet owner's API: uvicorn on a thread, over TCP and the control socket.

http.server, which this replaced, is not meant for production (Python's documentation
says so): it gave each connection a thread with no timeout, so a client sending a short
body under a long Content-Length held a thread for ever, and one announcing 100 GB made
it allocate. uvicorn serves from one event loop: a slow client costs a coroutine, headers
are bounded (``MAX_HEADER_BYTES``), connections are capped (``MAX_CONNECTIONS``; past it, a
503), bodies are bounded in size and time by ``server.json_body``, and handlers that wait
for a job run on at most ``API_THREADS`` threads.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from . import control
from .api_guard import Guard, Policy, is_loopback, token_file_token
from .errors import TenantSyncError
from .observe import CachedCheck, observe_routes
from .server import make_app
from .status_page import login_routes, status_routes
from .storage import open_storage

if TYPE_CHECKING:
    from .config import Config
    from .ondemand import OnDemand

log = logging.getLogger(__name__)
# uvicorn's start and stop lines say nothing our own log does not; its warnings stay.
logging.getLogger("uvicorn.error").setLevel(logging.WARNING)

#: Threads running handlers that wait for a job (a hydration, an archival) at once.
API_THREADS = 16
#: Open connections per listener; past this uvicorn answers 503 at once.
MAX_CONNECTIONS = 1000
#: Largest request head (line and headers) buffered before the request is refused.
MAX_HEADER_BYTES = 16 * 1024
#: Seconds an idle keep-alive connection stays open.
KEEP_ALIVE = 5


class NoToken(TenantSyncError):
    """``serve`` was asked to listen beyond loopback without an API token."""


class AccessLog:
    """One log line per request, as ``CLIENT "METHOD PATH HTTP/1.1" STATUS``; on the control
    socket CLIENT is ``pid N``, the caller's pid from the kernel (``_PeerPid``). Written when
    the status is sent, before the body: a caller that has its answer finds the line."""

    def __init__(self, app):  # noqa: ANN001 - any ASGI app
        self.app = app

    async def __call__(self, scope, receive, send):  # noqa: ANN001 - ASGI
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        logged = False

        def line(status: int) -> None:
            nonlocal logged
            logged = True
            client = scope.get("client") or ("-", 0)
            log.info('%s "%s %s HTTP/%s" %d', client[0], scope["method"], scope["path"],
                     scope.get("http_version", "1.1"), status)

        async def sending(message):  # noqa: ANN001 - ASGI
            if message["type"] == "http.response.start":
                line(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if not logged:
                line(0)  # no answer was started (the client went away)


class _PeerPid(H11Protocol):
    """uvicorn's HTTP/1.1 protocol naming a Unix-socket client by its pid (SO_PEERCRED)."""

    def connection_made(self, transport) -> None:  # noqa: ANN001 - asyncio's transport
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))
            self.client = (f"pid {pid}", 0)


class Served:
    """One uvicorn server over bound, listening ``sockets``. ``serve_forever`` runs it on the
    calling thread until ``shutdown`` (from another), which waits for it to end; the
    interface of socketserver's servers, which control.ControlSocket drives."""

    def __init__(self, app, sockets: list[socket.socket]):  # noqa: ANN001 - an ASGI app
        self.sockets = sockets
        config = uvicorn.Config(
            AccessLog(app), http=_PeerPid, ws="none", lifespan="off", log_config=None, access_log=False,
            limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=KEEP_ALIVE,
            h11_max_incomplete_event_size=MAX_HEADER_BYTES, server_header=False,
        )
        self._server = uvicorn.Server(config)
        self._ended = threading.Event()

    def serve_forever(self) -> None:
        async def main() -> None:
            import anyio.to_thread

            anyio.to_thread.current_default_thread_limiter().total_tokens = API_THREADS
            await self._server.serve(sockets=self.sockets)

        try:
            asyncio.run(main())
        finally:
            self._ended.set()

    def start(self, name: str) -> Served:
        threading.Thread(target=self.serve_forever, name=name, daemon=True).start()
        return self

    def shutdown(self) -> None:
        self._server.should_exit = True
        self._ended.wait(30)

    def server_close(self) -> None:
        for sock in self.sockets:
            sock.close()


def tcp_listener(host: str, port: int) -> socket.socket:
    """A listening socket at (host, port); an address in use fails here, before anything runs."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


def unix_listener(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(256)
    except OSError:
        sock.close()
        raise
    return sock


def api_token(config: Config, loopback: bool) -> str:
    """The token the TCP API requires: the configured ``api-token``; on loopback without
    one, the fleet's own token file (control.token_path), made on first use. Beyond
    loopback without one: NoToken, as anyone who reaches the port could act."""
    if config.api_token:
        return config.api_token
    if not loopback:
        raise NoToken("serve: listening beyond loopback needs an API token "
                      "(api-token in tenantsync.yml, or TENANTSYNC_API_TOKEN)")
    path = control.token_path(config)
    if path is None:
        raise NoToken("serve: no API token is configured and there is no state directory to keep one in "
                      "(set api-token in tenantsync.yml, or TENANTSYNC_API_TOKEN)")
    token = token_file_token(path)
    log.info("API token in %s (no api-token configured)", path)
    return token


def serve_owner(ondemand: OnDemand, config: Config, http: tuple[str, int] | None = None,
                report: Callable[[str], None] | None = None,
                checks: dict[str, CachedCheck] | None = None, collectors: tuple = ()) -> Callable[[], None]:
    """Serve the API of the process owning the fleet's tenants on this host: on the fleet's
    control socket (control.py) and, with ``http`` (host, port), over TCP behind the token.
    ``checks``: what /readyz asks besides the catalogue and the store (the broker);
    ``collectors``: what /metrics adds (the broker's queues).
    Returns the function that stops both."""
    report = report or (lambda line: log.warning("%s", line))
    store = open_storage(config.replica, config.storage)
    checks = {"store": CachedCheck(lambda: next(iter(store.list("readyz-probe/")), None)), **(checks or {})}
    routes = observe_routes(ondemand.catalogue, config.max_lag.total_seconds(), checks, collectors)
    routes += status_routes(ondemand.catalogue, store, config.fleet, config.host)
    policy = None
    if http is not None:
        loopback = is_loopback(http[0])
        policy = Policy(api_token(config, loopback), loopback)  # no token beyond loopback fails here, first
    app = make_app(ondemand, routes + login_routes(policy))
    tcp = None
    if http is not None:
        tcp = Served(Guard(app, policy), [tcp_listener(*http)])  # then a port in use
    try:
        local = control.listen(lambda path: Served(Guard(app, Policy(None, True)), [unix_listener(path)]),
                               config, report)
    except BaseException:
        if tcp is not None:
            tcp.server_close()
        raise
    if tcp is not None:
        tcp.start("tenantsync-http")

    def stop() -> None:
        if local is not None:
            local.close()
        if tcp is not None:
            tcp.shutdown()
            tcp.server_close()

    return stop
