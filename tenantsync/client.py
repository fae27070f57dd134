"""The application's handle: ``Client(config).hydrate("acme.db")`` returns a local path.

Given a Config (embedded mode) it hydrates in-process; given the URL of a
``tenantsync serve`` endpoint it calls the HTTP API, so an application process never
needs the catalogue or the replica credentials itself.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from urllib.parse import quote

from .config import Config
from .errors import TenantSyncError


class Client:
    def __init__(self, target: Config | str, timeout: float = 60.0):
        self.timeout = timeout
        if isinstance(target, str):
            self.url, self._ondemand = target.rstrip("/"), None
        else:
            from .fleet import Fleet
            from .ondemand import OnDemand

            self.url, self._ondemand = None, OnDemand(Fleet(target))

    def hydrate(self, name: str, *, txid: int | None = None) -> str:
        """The tenant's local path, once it is present, complete and replicated again."""
        if self._ondemand is not None:
            return self._ondemand.hydrate(name, txid=txid).path
        return self._post(f"/tenants/{quote(name, safe='/')}/hydrate", {"txid": txid} if txid is not None else {})["path"]

    def archive(self, name: str) -> dict:
        if self._ondemand is not None:  # the HTTP API's answer, without the HTTP
            from .server import archive_answer

            status, body = archive_answer(self._ondemand.archive(name), self._ondemand.catalogue.get(name))
            if status >= 400:
                raise TenantSyncError(body["error"])
            return body
        return self._post(f"/tenants/{quote(name, safe='/')}/archive", {})

    def _post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read()).get("error", str(e))
            except ValueError:
                message = str(e)
            raise TenantSyncError(message) from None
        except urllib.error.URLError as e:
            raise TenantSyncError(f"{self.url}: cannot reach tenantsync: {e.reason}") from None
