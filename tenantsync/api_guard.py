"""Who may call the fleet's API: a bearer token, and no browser acting for another site.

The API archives and hydrates tenants, so it must not answer whoever reaches its port.
Over TCP every route that changes state needs ``Authorization: Bearer <token>``, and every
route does when the API listens beyond loopback (``serve`` refuses to, without a token).
The token is compared in constant time. On the control socket (a 0600 socket in a 0700
directory) the kernel already allows only the fleet's own user, so no token is asked.

Beyond loopback a browser signs in once at ``/login`` with the token and gets a session
cookie derived from it (HttpOnly, SameSite=Strict), which admits the page's reads only.

Browsers are the other way in: a page on any site can POST to ``127.0.0.1`` (a
``text/plain`` POST needs no preflight), and DNS rebinding gives a foreign name a
loopback address. So a request whose ``Origin`` is not this API's own is refused, and on
loopback the ``Host`` must be a loopback name.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from urllib.parse import quote, urlsplit

from starlette.responses import JSONResponse, RedirectResponse

log = logging.getLogger(__name__)

#: Methods that change nothing; every other one needs the token.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: Beyond loopback a browser cannot send the token with a page's GETs: it signs in here once
#: (status_page.login) and gets SESSION_COOKIE (HttpOnly, SameSite=Strict), which admits reads.
LOGIN_PATH = "/login"
SESSION_COOKIE = "tenantsync_session"
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, without port) is this machine only."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_file_token(path: str) -> str:
    """The token kept at ``path`` (0600), made on first use: a loopback API with no
    configured token still requires one, which local scripts read from this file."""
    try:
        with open(path, encoding="ascii") as f:
            token = f.read().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(token + "\n")
    os.replace(path + ".tmp", path)
    return token


@dataclass(frozen=True)
class Policy:
    """``token``: the one accepted bearer token (None on the control socket: nothing is
    checked). ``loopback``: the API listens on loopback only (GETs need no token there)."""

    token: str | None
    loopback: bool

    def refusal(self, scope: dict) -> tuple[int, str] | None:
        """(status, why) if this request is refused, else None."""
        if self.token is None:  # the control socket: the kernel let only our own user in
            return None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        host = headers.get("host", "")
        if self.loopback and not is_loopback(urlsplit("//" + host).hostname or ""):
            return 403, f"Host {host!r} is not a loopback name (this API listens on loopback only)"
        origin = headers.get("origin")
        if origin is not None and origin != "null" and urlsplit(origin).netloc != host:
            return 403, f"a cross-site request (Origin {origin}) is refused"
        if origin == "null" or headers.get("sec-fetch-site") == "cross-site":
            return 403, "a cross-site request is refused"
        if scope["method"] in SAFE_METHODS and (self.loopback or scope["path"] == LOGIN_PATH
                                                or self.session_cookie_in(headers.get("cookie", ""))):
            return None
        if scope["method"] == "POST" and scope["path"] == LOGIN_PATH:
            return None  # the login form checks the token it is sent (status_page.login)
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            return 401, "this route needs Authorization: Bearer <token> (the fleet's api-token)"
        if not self.is_token(given.strip()):
            return 401, "wrong token"
        return None

    def is_token(self, given: str) -> bool:
        return self.token is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def session(self) -> str:
        """The status page's session cookie value: derived from the token, never the token."""
        return hmac.new(self.token.encode(), b"tenantsync status page", hashlib.sha256).hexdigest()

    def session_cookie_in(self, cookies: str) -> bool:
        """Whether ``cookies`` (a Cookie header) hold the page's session. It admits reads
        only: a POST always needs the token itself in its Authorization header."""
        if self.token is None:
            return False
        jar = SimpleCookie()
        try:
            jar.load(cookies)
        except CookieError:
            return False
        given = jar.get(SESSION_COOKIE)
        return given is not None and hmac.compare_digest(given.value.encode(), self.session().encode())


class Guard:
    """ASGI middleware applying a Policy to every HTTP request before the app sees it."""

    def __init__(self, app, policy: Policy):  # noqa: ANN001 - any ASGI app
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send):  # noqa: ANN001 - ASGI
        if scope["type"] == "http":
            refused = self.policy.refusal(scope)
            if refused is not None:
                status, why = refused
                log.warning("refused %s %s: %s", scope["method"], scope["path"], why)
                if status == 401 and scope["method"] == "GET" and _wants_html(scope):
                    await RedirectResponse(f"{LOGIN_PATH}?next={quote(scope['path'])}", 303)(scope, receive, send)
                    return
                headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
                await JSONResponse({"error": why, "type": "Refused"}, status, headers=headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _wants_html(scope: dict) -> bool:
    """A browser navigating (Accept: text/html), not a script or a scraper."""
    accept = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == b"accept"), "")
    return "text/html" in accept
