"""The HTTP API as a hostile client meets it: malformed requests, slow clients, other sites'
pages, missing or wrong tokens. A real embedded fleet serves it (test_server's ``served``)."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from tenantsync import server
from tenantsync.config import Config

from .dbutil import app_db, wait_for, write_rows
from .test_server import TOKEN, call, embedded_fleet, free_port, served  # noqa: F401 - served is a fixture


def raw(base: str, request: bytes, timeout: float = 15.0) -> tuple[int, bytes, float]:
    """Send ``request`` as it is; (status, body, seconds until the answer)."""
    host, port = urllib.parse.urlsplit(base).netloc.split(":")
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        got = b""
        while b"\r\n\r\n" not in got or len(got.partition(b"\r\n\r\n")[2]) < _length(got):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body, time.monotonic() - t0


def _length(got: bytes) -> int:
    for line in got.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def post(path: str, headers: str = "", body: bytes = b"", length: int | None = None) -> bytes:
    length = len(body) if length is None else length
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\n{headers}Content-Length: {length}\r\n\r\n").encode() + body


def test_every_malformed_request_gets_an_answer_in_bounded_time(served, monkeypatch):
    cfg, base, data = served
    monkeypatch.setattr(server, "BODY_TIMEOUT", 1.0)  # the served app reads it at each request
    write_rows(conn := app_db(data / "a.db"), 3)
    conn.close()
    cases = [
        ("a 100 GB Content-Length with 2 bytes", post("/tenants/a.db/hydrate", body=b"{}", length=100_000_000_000), 413),
        ("a negative Content-Length", post("/tenants/a.db/hydrate", body=b"{}", length=-1), 400),
        ("a short body under a longer Content-Length", post("/tenants/a.db/hydrate", body=b"{}", length=50), 408),
        ("a timestamp that is a number", post("/tenants/a.db/hydrate", body=b'{"timestamp": 12345}'), 400),
        ("a body that is not JSON", post("/tenants/a.db/hydrate", body=b"{nope"), 400),
        ("a JSON body that is not an object", post("/tenants/a.db/hydrate", body=b"[1]"), 400),
        ("an unknown field", post("/tenants/a.db/hydrate", body=b'{"tx": 1}'), 400),
        ("a hostile name", post("/tenants/..%2F..%2Fetc%2Fpasswd/hydrate", body=b"{}"), 400),
        ("archiving an unknown tenant", post("/tenants/nobody.db/archive"), 404),
        ("an unknown action", post("/tenants/a.db/explode", body=b"{}"), 405),
        # Not ended: the server refuses once it holds more than it buffers, while the client
        # has nothing left to send (a client still sending would meet a reset, not the answer).
        ("a head larger than the server buffers", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
         + b"x" * 64_000, 400),
        ("a request line that is not HTTP", b"HELLO\r\n\r\n", 400),
    ]
    for what, request, expected in cases:
        status, body, took = raw(base, request)
        assert status == expected, (what, status, body)
        assert took < 5.0, (what, took)
        if status != 400 or body.startswith(b"{"):  # the HTTP parser's own 400s are plain text
            assert json.loads(body)["error"], (what, body)


def test_fifty_slow_clients_do_not_stop_others_being_answered(served, monkeypatch):
    cfg, base, data = served
    monkeypatch.setattr(server, "BODY_TIMEOUT", 5.0)
    host, port = urllib.parse.urlsplit(base).netloc.split(":")
    slow = []
    for i in range(50):  # half send a head slowly, half a body that never ends
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(post("/tenants/a.db/hydrate", body=b"{", length=1000) if i % 2 else b"GET /healthz HTTP/1.1\r\nHo")
        slow.append(sock)
    try:
        t0 = time.monotonic()
        with ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(lambda _: call(base + "/healthz"), range(20)))
        assert all(status == 200 for status, _ in answers)
        assert time.monotonic() - t0 < 3.0
    finally:
        for sock in slow:
            sock.close()


@pytest.mark.parametrize(("headers", "why"), [
    ({"Origin": "http://evil.example"}, "cross-site"),
    ({"Origin": "null"}, "cross-site"),
    ({"Sec-Fetch-Site": "cross-site"}, "cross-site"),
    ({"Host": "rebound.example:8080"}, "not a loopback name"),
])
def test_browsers_acting_for_other_sites_are_refused(served, headers, why):
    cfg, base, data = served
    for method, path in (("POST", "/tenants/a.db/archive"), ("GET", "/healthz")):
        req = urllib.request.Request(base + path, method=method, data=b"" if method == "POST" else None,
                                     headers={"Authorization": f"Bearer {TOKEN}", **headers})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 403 and why in json.loads(e.value.read())["error"]
    # The API's own page (same origin) is not refused.
    status, _ = call(base + "/healthz")
    req = urllib.request.Request(base + "/healthz", headers={"Origin": base})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == status == 200


def test_every_state_changing_route_needs_the_token(served):
    cfg, base, data = served
    write_rows(conn := app_db(data / "b.db"), 3)
    conn.close()
    assert wait_for(lambda: call(f"{base}/tenants/b.db")[0] == 200, 30)
    for action, body in (("archive", None), ("hydrate", {}), ("fork", {"source": "b.db"})):
        url = f"{base}/tenants/{'c.db' if action == 'fork' else 'b.db'}/{action}"
        assert call(url, "POST", body, token=None)[0] == 401
        assert call(url, "POST", body, token="wrong" + TOKEN)[0] == 401
    assert call(f"{base}/tenants/b.db", token=None)[0] == 200  # on loopback a read needs none
    for action, body in (("archive", None), ("hydrate", {}), ("fork", {"source": "b.db"})):
        url = f"{base}/tenants/{'c.db' if action == 'fork' else 'b.db'}/{action}"
        status, answer = call(url, "POST", body)
        assert status == 200, (action, answer)


def test_serve_beyond_loopback_without_a_token_exits_with_one_line(tmp_path, file_url):
    env = {k: v for k, v in os.environ.items() if k != "TENANTSYNC_API_TOKEN"}
    proc = subprocess.run(
        [sys.executable, "-m", "tenantsync", "serve", f"{tmp_path}/*.db", "--replica", file_url,
         "--catalogue", f"sqlite:///{tmp_path}/cat.db", "--listen", f"0.0.0.0:{free_port()}"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "beyond loopback needs an API token" in lines[0], proc.stderr


def test_beyond_loopback_every_route_needs_the_token(tmp_path, file_url):
    """Listening on a wildcard address (the tests only ever connect through loopback)."""
    (tmp_path / "data").mkdir()
    cfg = Config(replica=file_url, globs=(f"{tmp_path}/data/*.db",), catalogue=f"sqlite:///{tmp_path}/cat.db",
                 host="h1", idle_after=timedelta(seconds=1), api_token=TOKEN)
    with embedded_fleet(cfg, host="0.0.0.0") as base:
        assert call(base + "/healthz", token=None)[0] == 401
        assert call(base + "/tenants/x.db", token=None)[0] == 401
        status, body = call(base + "/healthz")
        assert status == 200 and body["ok"]
        # A foreign Host is fine here: the token, not the name, decides.
        req = urllib.request.Request(base + "/healthz", headers={"Authorization": f"Bearer {TOKEN}",
                                                                 "Host": "fleet.example:443"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200


def test_on_loopback_without_a_configured_token_one_is_kept_in_a_private_file(tmp_path, file_url, monkeypatch):
    from tenantsync import control, serving

    monkeypatch.setattr(control, "FLEETS_DIR", str(tmp_path / "state"))
    cfg = Config(replica=file_url, globs=(f"{tmp_path}/*.db",), catalogue=f"sqlite:///{tmp_path}/cat.db", host="h1")
    token = serving.api_token(cfg, loopback=True)
    path = control.token_path(cfg)
    assert open(path).read().strip() == token and len(token) >= 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert serving.api_token(cfg, loopback=True) == token  # kept across restarts


def test_the_openapi_description_names_every_route(served):
    cfg, base, data = served
    status, doc = call(base + "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {"/tenants/{name}", "/tenants/{name}/hydrate", "/tenants/{name}/fork",
                                 "/tenants/{name}/archive", "/healthz"}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert ("security" in op) == (method == "post"), (path, method)


def test_no_credential_signature_or_token_reaches_the_log_at_any_verbosity(tmp_path, s3_url):
    """``serve -vv`` on S3, written to, asked with the right and a wrong token: its whole log
    holds none of the AWS keys, no request signature and neither token."""
    secrets = {"AWS_ACCESS_KEY_ID": "AKIALOGSECRETTEST01", "AWS_SECRET_ACCESS_KEY": "s3cr3t-log-value-9f2",
               "AWS_SESSION_TOKEN": "sess-token-log-7c1", "TENANTSYNC_API_TOKEN": "api-token-log-5e8"}
    data = tmp_path / "data"
    data.mkdir()
    write_rows(conn := app_db(data / "a.db"), 3)
    port = free_port()
    env = dict(os.environ, **secrets, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tenantsync", "-vv", "serve", f"{data}/*.db", "--replica", s3_url,
                                 "--catalogue", f"sqlite:///{tmp_path}/cat.db", "--listen", f"127.0.0.1:{port}"],
                                env=env, cwd=tmp_path, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        token = secrets["TENANTSYNC_API_TOKEN"]
        assert wait_for(lambda: _synced(base, "a.db"), 30), (tmp_path / "serve.log").read_text()[-3000:]
        write_rows(conn, 2)
        assert call(base + "/tenants/nobody.db/hydrate", "POST", {}, token=token)[0] == 404
        assert call(base + "/tenants/a.db/archive", "POST", None, token="wrong-" + token)[0] == 401
    finally:
        proc.terminate()
        proc.wait(30)
        conn.close()
    text = (tmp_path / "serve.log").read_text()
    assert "PUT" in text or "sync" in text  # -vv did log the work
    for name, value in [*secrets.items(), ("a signature", "Signature="), ("an Authorization header", "AWS4-HMAC")]:
        assert value not in text, f"{name} is in the log"


def _synced(base: str, name: str) -> bool:
    try:
        status, body = call(f"{base}/tenants/{name}")
    except OSError:
        return False
    return status == 200 and body["txid"] != "0" * 16


def test_beyond_loopback_a_browser_signs_in_once_and_reads_the_page_with_its_cookie(tmp_path, file_url):
    (tmp_path / "data").mkdir()
    cfg = Config(replica=file_url, globs=(f"{tmp_path}/data/*.db",), catalogue=f"sqlite:///{tmp_path}/cat.db",
                 host="h1", api_token=TOKEN)
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(), _NoRedirect())
    html = {"Accept": "text/html"}
    with embedded_fleet(cfg, host="0.0.0.0") as base:
        with pytest.raises(urllib.error.HTTPError) as e:  # a browser is sent to sign in
            opener.open(urllib.request.Request(base + "/?q=x", headers=html), timeout=10)
        assert e.value.code == 303 and e.value.headers["Location"] == "/login?next=/"
        with opener.open(urllib.request.Request(base + "/login", headers=html), timeout=10) as resp:
            assert b"type=password" in resp.read()
        for token, status in (("wrong", 401), (TOKEN, 303)):
            form = urllib.parse.urlencode({"token": token, "next": "https://evil.example/"}).encode()
            with pytest.raises(urllib.error.HTTPError) as e:
                opener.open(urllib.request.Request(base + "/login", data=form, headers=html), timeout=10)
            assert e.value.code == status
        assert e.value.headers["Location"] == "/"  # never a redirect to another site
        cookie = e.value.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and TOKEN not in cookie
        with opener.open(urllib.request.Request(base + "/", headers=html), timeout=10) as resp:
            assert resp.status == 200 and b"tenantsync" in resp.read()
        with pytest.raises(urllib.error.HTTPError) as e:  # the cookie admits reads, never a change
            opener.open(urllib.request.Request(base + "/tenants/a.db/archive", data=b"", method="POST"), timeout=10)
        assert e.value.code == 401


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - urllib's signature
        return None
