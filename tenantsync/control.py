"""The owner's control socket: how any entry point on this host reaches the process that owns
a fleet's open tenants.

``tenantsync watch`` and ``serve`` (either runtime) own the host's open tenants: their
captures, read marks and leases live there (scheduler/owner.py routes each job to the one
process of its shard). A hydration or archival run by another process would race them
through the catalogue, so the owner answers the HTTP API (server.py, served by serving.py) on a Unix
domain socket in the fleet's state directory, and ``tenantsync archive``/``hydrate``/``fork``
and ``Client(config)`` send their call there first (client.py). Nobody listening means no
owner runs on this host: the caller acts in-process, and is the owner for that call.

Only this user can connect: the directory is 0700 and the socket 0600 (connecting needs
write permission on it). One socket per fleet and host name, so two "hosts" sharing a
machine (TENANTSYNC_HOST) each have their own.

A socket file outlives a SIGKILLed owner. A starting owner tells a stale one from a live one
by connecting: refused, it is replaced; accepted, another live owner of the same fleet and
host holds it (a second watcher, which the replica leases keep from writing alongside this
one), and it is left alone: the newcomer says so and runs without a socket. The check and
the bind happen under a lock on the directory, so two owners starting together do not both
take it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from contextlib import contextmanager

from .config import FLEETS_DIR, Config, fleet_slug
from .errors import TenantSyncError

log = logging.getLogger(__name__)

# sun_path holds 108 bytes with its terminating NUL: a longer path cannot be bound.
SUN_PATH_MAX = 107
# A live owner accepts at once (the kernel queues the connection even while it is busy);
# waiting longer would only delay a start-up next to a stopped (SIGSTOP) owner.
PROBE_TIMEOUT = 2.0
# The errors of a connect that mean nobody listens: no socket file (nor a directory that could
# hold one), or a file left by a dead process.
NOBODY_LISTENS = (errno.ENOENT, errno.ENOTDIR, errno.ECONNREFUSED)


class NoOwner(TenantSyncError):
    """No process listens on the fleet's control socket: nothing was sent, the caller runs
    the call itself."""


def _key(config: Config) -> str:
    return hashlib.sha256(f"{config.fleet}\n{config.host}".encode()).hexdigest()[:12]


def token_path(config: Config) -> str | None:
    """``FLEETS_DIR/<slug>-<hash of fleet and host>.token``: the HTTP API's token when none
    is configured (api_guard.token_file_token), in the same private directory as the
    socket; None if that directory cannot be made."""
    try:
        _private_directory(FLEETS_DIR)
    except OSError:
        return None
    return os.path.join(FLEETS_DIR, f"{fleet_slug(config.fleet)}-{_key(config)}.token")


def metrics_path(config: Config) -> str:
    """``FLEETS_DIR/<slug>-<hash of fleet and host>.metrics``: where every process of this
    fleet on this host counts its metrics (metrics.use_directory)."""
    return os.path.join(FLEETS_DIR, f"{fleet_slug(config.fleet)}-{_key(config)}.metrics")


def socket_path(config: Config) -> str | None:
    """``FLEETS_DIR/<slug>-<hash of fleet and host>.sock``, its slug shortened to fit a
    socket address; None if the state directory itself is too deep for one."""
    key = _key(config)
    room = SUN_PATH_MAX - len(os.fsencode(os.path.join(FLEETS_DIR, f"-{key}.sock")))
    if room < 0:
        return None
    slug = fleet_slug(config.fleet)[:room].rstrip("._-")
    return os.path.join(FLEETS_DIR, f"{slug}-{key}.sock" if slug else f"{key}.sock")


def connect(path: str | None, timeout: float | None) -> socket.socket:
    """A connection to the owner listening at ``path``; NoOwner if nobody does."""
    if path is None:
        raise NoOwner("no control socket: the state directory's path is too long for one")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        if e.errno in NOBODY_LISTENS:
            raise NoOwner(f"{path}: no owner listens ({e.strerror})") from None
        raise TenantSyncError(f"{path}: cannot reach the fleet's owner: {e.strerror}") from None
    return sock


class ControlSocket:
    """The owner's listening socket, served on a thread until :meth:`close`."""

    def __init__(self, server, path: str):
        self.server, self.path = server, path
        self._inode = os.stat(path).st_ino
        self._thread = threading.Thread(target=server.serve_forever, name="tenantsync-control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Unlink the socket first (a call arriving now finds no owner and runs in its own
        process, instead of waiting in a backlog nobody reads), unless a successor's socket
        took its place; then stop serving."""
        with _locked(os.path.dirname(self.path)):
            try:
                if os.stat(self.path).st_ino == self._inode:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()


def listen(serve: Callable[[str], object], config: Config,
           report: Callable[[str], None]) -> ControlSocket | None:
    """Serve the owner's API on the fleet's control socket: ``serve(path)`` binds a server
    there (serving.Served over serving.unix_listener). None, said through ``report``, if another live owner holds it
    or there is no path for one: this process then runs without."""
    path = socket_path(config)
    if path is None:
        report(f"no control socket: {FLEETS_DIR} is too long a path for one; "
               "archive, hydrate and fork from other processes run in their own process")
        return None
    try:
        server = _take(serve, path)
    except OSError as e:  # a read-only or foreign state directory: the fleet still runs
        report(f"no control socket at {path}: {e.strerror}; archive, hydrate and fork from other "
               "processes run in their own process")
        return None
    if server is None:
        report(f"another live owner of this fleet on host {config.host} listens at {path}: "
               "running without a control socket")
        return None
    log.info("control socket at %s", path)
    return ControlSocket(server, path)


def _take(serve: Callable[[str], object], path: str):
    """The server ``serve`` bound at ``path``, replacing a stale socket there; None if a live
    owner listens on it."""
    directory = os.path.dirname(path)
    _private_directory(directory)
    with _locked(directory):
        if _answers(path):
            return None
        try:
            os.unlink(path)  # stale: its process is gone
        except FileNotFoundError:
            pass
        server = serve(path)
        os.chmod(path, 0o600)
        return server


def _answers(path: str) -> bool:
    try:
        connect(path, PROBE_TIMEOUT).close()
    except NoOwner:
        return False
    except TenantSyncError:  # there, though not accepting now (busy, stopped, or not ours): alive
        return True
    return True


def _private_directory(path: str) -> None:
    """Create ``path`` as 0700, or narrow it to 0700 (the catalogue may have created it)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    if os.stat(path).st_mode & 0o077:
        os.chmod(path, 0o700)


@contextmanager
def _locked(directory: str):
    """An exclusive flock on the directory itself, held across a check and a bind (or an unlink)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
