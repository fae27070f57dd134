"""The application's handle: ``Client(config).hydrate("acme.db")`` returns a local path.

Given a Config, each call goes to the process owning the fleet's tenants on this host (a
``tenantsync watch`` or ``serve``), over its control socket (control.py); with no owner
listening, it runs in this process, as ``OnDemand`` (:func:`through_owner`, which the CLI's
archive, hydrate and fork use too). Given the URL of a ``tenantsync serve`` endpoint it
calls the HTTP API, so an application process never needs the catalogue or the replica
credentials itself. Either way an answer comes back as what ``OnDemand`` returns or raises
(:class:`Api`): the same outcomes, the same error types.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import quote

from . import control
from .config import Config
from .errors import NoAnswer, TenantSyncError
from .outcome import Archived, Hydrated, Skip, Skipped
from .server import archive_answer, error_from

if TYPE_CHECKING:
    from .ondemand import OnDemand

log = logging.getLogger(__name__)

# Sends one request: (method, path, JSON body) -> (status, JSON answer).
Send = Callable[[str, str, dict], tuple[int, dict]]
T = TypeVar("T")


class Api:
    """``OnDemand``'s calls over the HTTP API, wherever it is served: each answer mapped back
    to the outcome ``OnDemand`` returns, each error to the type it raises (server.error_from)."""

    def __init__(self, send: Send):
        self.send = send

    def hydrate(self, name: str, *, txid: int | None = None, timestamp: datetime | None = None,
                source: str | None = None, progress: object = None) -> Hydrated:
        """As ``OnDemand.hydrate``; a fork (``source``) is ``POST .../fork``. Its ``txid`` is the
        tenant's in the catalogue, which for a fork is 0 until it ships its first file.
        ``progress`` is not told anything: the restore's progress stays with the owner."""
        body = {} if source is None else {"source": source}
        if txid is not None:
            body["txid"] = txid
        if timestamp is not None:
            body["timestamp"] = timestamp.isoformat()
        answer = self.post(name, "fork" if source is not None else "hydrate", body)
        return Hydrated(answer["name"], answer["path"], int(answer["txid"], 16), answer["restored"],
                        answer.get("moved_aside"))

    def archive(self, name: str) -> Archived | Skipped:
        """As ``OnDemand.archive``: a refusal answered 409 with its reason is a Skipped outcome."""
        status, answer = self.send("POST", _path(name, "archive"), {})
        if "skipped" in answer:
            return Skipped(name, Skip(answer["skipped"]), answer.get("error", ""))
        answer = checked(status, answer)
        return Archived(name, int(answer["txid"], 16), answer["freed"])

    def post(self, name: str, action: str, body: dict) -> dict:
        """The answer to ``POST /tenants/NAME/ACTION``; an error answer raised as its error."""
        return checked(*self.send("POST", _path(name, action), body))


def checked(status: int, answer: dict) -> dict:
    if status >= 400:
        raise error_from(status, answer)
    return answer


def _path(name: str, action: str) -> str:
    return f"/tenants/{quote(name, safe='/')}/{action}"


def over_http(url: str, timeout: float, token: str | None = None) -> Send:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"

    def send(method: str, path: str, body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            try:
                return e.code, json.loads(e.read())
            except ValueError:
                return e.code, {"error": str(e)}
        except urllib.error.URLError as e:
            raise TenantSyncError(f"{url}: cannot reach tenantsync: {e.reason}") from None

    return send


def over_socket(path: str | None, timeout: float | None) -> Send:
    """Requests to the owner listening at ``path``, one connection each. NoOwner (nothing
    sent) if nobody listens; once connected, a lost or late answer is NoAnswer, never a
    fallback: the owner may have acted on the request."""

    def send(method: str, target: str, body: dict) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("localhost", timeout=timeout)
        conn.sock = control.connect(path, timeout)
        try:
            conn.request(method, target, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        except TimeoutError:
            raise NoAnswer(f"{method} {target}: the fleet's owner at {path} did not answer within {timeout:g} s") \
                from None
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise NoAnswer(f"{method} {target}: the fleet's owner at {path} did not answer: {e}") from None
        finally:
            conn.close()

    return send


def through_owner(config: Config, call: Callable[[Api | OnDemand], T], *, timeout: float | None = None,
                  local: Callable[[], OnDemand] | None = None) -> T:
    """``call(owner)`` by the owner of the fleet's tenants on this host: an :class:`Api` over
    its control socket if one listens, else ``local()`` (default: a new ``OnDemand``), which
    makes this process the owner for the call."""
    path = control.socket_path(config)
    try:
        result = call(Api(over_socket(path, timeout)))
    except control.NoOwner as e:
        log.info("%s: in this process", e)
        return call(local() if local is not None else _ondemand(config))
    log.info("answered by the fleet's owner at %s", path)
    return result


def _ondemand(config: Config) -> OnDemand:
    from .fleet import Fleet
    from .ondemand import OnDemand

    return OnDemand(Fleet(config))


class Client:
    """``Client(config)`` or ``Client(url)`` (module docstring). ``timeout``: seconds to wait for
    an answer from the ``serve`` endpoint or the fleet's owner (NoAnswer after that; the call
    goes on there, and a repeated hydration joins it). ``token``: the API's bearer token for
    a URL (default ``$TENANTSYNC_API_TOKEN``); the control socket needs none."""

    def __init__(self, target: Config | str, timeout: float = 60.0, token: str | None = None):
        self.timeout = timeout
        self._ondemand: OnDemand | None = None  # built at the first call no owner answered
        if isinstance(target, str):
            token = token or os.environ.get("TENANTSYNC_API_TOKEN")
            self.config, self._api = None, Api(over_http(target.rstrip("/"), timeout, token))
        else:
            self.config, self._api = target, None

    def hydrate(self, name: str, *, txid: int | None = None) -> str:
        """The tenant's local path, once it is present, complete and replicated again."""
        return self._reach(lambda owner: owner.hydrate(name, txid=txid)).path

    def archive(self, name: str) -> dict:
        """The HTTP API's answer (the tenant's row, ``archived``, ``freed``), whoever archived it."""
        def call(owner: Api | OnDemand) -> dict:
            if isinstance(owner, Api):
                return owner.post(name, "archive", {})
            return checked(*archive_answer(owner.archive(name), owner.catalogue.get(name)))

        return self._reach(call)

    def _reach(self, call: Callable[[Api | OnDemand], T]) -> T:
        if self._api is not None:
            return call(self._api)
        return through_owner(self.config, call, timeout=self.timeout, local=self._local)

    def _local(self) -> OnDemand:
        if self._ondemand is None:
            self._ondemand = _ondemand(self.config)
        return self._ondemand
