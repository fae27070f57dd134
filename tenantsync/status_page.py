"""The fleet's status page: ``/`` (the fleet at a glance and its tenants) and ``/t/NAME``.

Server-rendered HTML, one rendering path: search, sort and paging are a GET form and links
(the catalogue pages in SQL, so 10,000 tenants render as fast as 10), and a little script
refreshes the page's content every ``REFRESH`` seconds and sends hydrate and archive with
the API token the operator types in (kept in the tab's sessionStorage only). Every value
from the catalogue or the store is escaped; no resource comes from elsewhere.
"""

from __future__ import annotations

import html
import math
from datetime import datetime, timezone
from urllib.parse import parse_qs, quote, urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse
from starlette.routing import Route

from .api_guard import LOGIN_PATH, SESSION_COOKIE, Policy
from .catalogue_reads import PAGE_SORTS
from .catalogue_schema import lag_seconds
from .errors import InvalidArgument, NotATenant
from .replica import Replica
from .server import answering
from .tenants import check_name

PER_PAGE = 50
REFRESH = 5  # seconds
LEVEL_NAMES = {8: "8 (point in time)", 9: "9 (snapshots)"}
_COLUMNS = (("name", "Tenant"), ("state", "State"), ("txid", "TXID"), ("lag", "Lag"),
            ("last_write_at", "Last write"), ("last_sync_at", "Last sync"), ("wal_bytes", "WAL"),
            ("bytes_stored", "Stored"))

_STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}h1{font-size:1.4em;margin:0 0 .6em}
h1 small{font-weight:normal;color:#666;font-size:.7em}.cards{display:flex;flex-wrap:wrap;gap:.6em;margin-bottom:1em}
.card{border:1px solid #ddd;border-radius:6px;padding:.5em .8em;min-width:8em}.card b{display:block;font-size:1.3em}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.3em .5em;border-bottom:1px solid #eee}
th a{color:inherit}td.n{font-variant-numeric:tabular-nums}.error{color:#b00}.active{color:#070}
.archived,.frozen{color:#666}nav{margin:.6em 0}form.search input{width:18em}pre{white-space:pre-wrap}
#actions input{width:22em}#result{margin-left:1em}
"""

_SCRIPT = """
(() => {
  const refresh = () => fetch(location.href, {headers: {'X-Refresh': '1'}})
    .then(r => r.ok ? r.text() : null).then(text => {
      if (!text) return;
      const doc = new DOMParser().parseFromString(text, 'text/html');
      const fresh = doc.getElementById('content'), mine = document.getElementById('content');
      if (fresh && mine && !mine.contains(document.activeElement)) mine.replaceWith(fresh);
    }).catch(() => {});
  setInterval(refresh, REFRESH_MS);
  const token = document.getElementById('token');
  if (token) {
    token.value = sessionStorage.getItem('tenantsync-token') || '';
    token.addEventListener('change', () => sessionStorage.setItem('tenantsync-token', token.value));
    for (const button of document.querySelectorAll('button[data-action]')) {
      button.addEventListener('click', () => {
        const out = document.getElementById('result');
        out.textContent = button.dataset.action + '…';
        fetch(button.dataset.url, {method: 'POST', body: '{}', headers: {
          'Content-Type': 'application/json', 'Authorization': 'Bearer ' + token.value}})
          .then(r => r.json().then(body => {
            out.textContent = r.ok ? button.dataset.action + ': done (TXID ' + body.txid + ')'
                                   : r.status + ': ' + body.error;
            if (r.ok) refresh();
          })).catch(e => { out.textContent = String(e); });
      });
    }
  }
})();
""".replace("REFRESH_MS", str(REFRESH * 1000))


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _ago(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "–"
    return _duration((now - when).total_seconds()) + " ago"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def _bytes(n: int | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
            f"<meta name=viewport content='width=device-width'><link rel=icon href='data:,'>"
            f"<style>{_STYLE}</style></head>"
            f"<body>{body}<script>{_SCRIPT}</script></body></html>")


def login_routes(policy: Policy | None) -> list[Route]:
    """``/login``: beyond loopback, where a browser cannot send the token with its GETs, the
    operator types it once and gets the page's session cookie (api_guard)."""

    def form(message: str = "", status: int = 200, next_path: str = "/") -> HTMLResponse:
        body = (f"<h1>tenantsync</h1><form method=post action='{LOGIN_PATH}'>"
                f"<input type=hidden name=next value='{_e(next_path)}'>"
                f"<input type=password name=token placeholder='API token' autofocus autocomplete=off> "
                f"<button>Sign in</button></form><p class=error>{_e(message)}</p>")
        return HTMLResponse(_page("tenantsync: sign in", body), status)

    async def login(request: Request) -> HTMLResponse | RedirectResponse:
        if request.method == "GET":
            return form(next_path=_local_path(request.query_params.get("next", "/")))
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > 4096:
                return form("the form is too large", 413)
        fields = parse_qs(raw.decode("utf-8", "replace"))
        given, next_path = fields.get("token", [""])[0], _local_path(fields.get("next", ["/"])[0])
        if policy is None or policy.token is None or not policy.is_token(given):
            return form("wrong token", 401, next_path)
        answer = RedirectResponse(next_path, 303)
        answer.set_cookie(SESSION_COOKIE, policy.session(), httponly=True, samesite="strict", path="/")
        return answer

    return [Route(LOGIN_PATH, answering(login), methods=["GET", "POST"])]


def _local_path(path: str) -> str:
    """``path`` if it is a path of this site, else ``/`` (no redirect elsewhere)."""
    return path if path.startswith("/") and not path.startswith("//") and "\\" not in path else "/"


def status_routes(catalogue, store, fleet: str, host: str) -> list[Route]:  # noqa: ANN001
    """``/`` and ``/t/{name}`` over ``catalogue`` and the fleet's ``store``."""

    def fleet_page(query: dict[str, str]) -> str:
        search = query.get("q", "").strip()[:200]
        sort = query.get("sort", "name")
        if sort not in PAGE_SORTS:
            raise InvalidArgument(f"sort: one of {', '.join(PAGE_SORTS)}")
        descending = query.get("order") == "desc"
        try:
            page = max(1, int(query.get("page", "1")))
        except ValueError:
            raise InvalidArgument("page: a number") from None
        now = datetime.now(timezone.utc)
        view = catalogue.fleet_view(now)
        total, records = catalogue.page(search, sort, descending, (page - 1) * PER_PAGE, PER_PAGE)
        pages = max(1, math.ceil(total / PER_PAGE))
        summary = view.summary()
        lag = summary["lag_seconds"]
        cards = [("tenants", f"{view.tenants:,}")]
        cards += [(state, f"{n:,}") for state, n in view.states.items() if n]
        cards += [("lag p50", _duration(lag["p50"])), ("lag p99", _duration(lag["p99"])),
                  ("lag max", _duration(lag["max"])), ("WAL on disk", _bytes(view.wal_total)),
                  ("largest WAL", _bytes(view.wal_largest))]

        def link(**changes) -> str:
            params = {"q": search, "sort": sort, "order": "desc" if descending else "asc", "page": page} | changes
            return "?" + urlencode({k: v for k, v in params.items() if v not in ("", None)})

        head = "".join(
            f"<th><a href='{_e(link(sort=key, order='asc' if sort == key and descending else 'desc' if sort == key else 'asc', page=1))}'>"
            f"{label}{(' ▼' if descending else ' ▲') if sort == key else ''}</a></th>" for key, label in _COLUMNS)
        rows = []
        for r in records:
            lag = view.lags.get(r.name)
            rows.append(
                f"<tr><td><a href='/t/{_e(quote(r.name))}'>{_e(r.name)}</a></td>"
                f"<td class='{_e(r.state.value)}'>{_e(r.state.value)}</td><td class=n>{r.txid or 0:016x}</td>"
                f"<td class=n>{_duration(lag) if lag is not None else '0'}</td>"
                f"<td>{_ago(r.last_write_at, now)}</td><td>{_ago(r.last_sync_at, now)}</td>"
                f"<td class=n>{_bytes(r.wal_bytes)}</td><td class=n>{_bytes(r.bytes_stored)}</td></tr>")
        previous = f"<a href='{_e(link(page=page - 1))}'>‹ previous</a> " if page > 1 else ""
        following = f" <a href='{_e(link(page=page + 1))}'>next ›</a>" if page < pages else ""
        nav = f"<nav>{previous}page {page} of {pages} ({total:,} tenants{' matching' if search else ''}){following}</nav>"
        body = (f"<h1>tenantsync <small>fleet {_e(fleet)} · host {_e(host)}</small></h1>"
                f"<form class=search method=get><input name=q value='{_e(search)}' placeholder='search tenants' "
                f"id=q><input type=hidden name=sort value='{_e(sort)}'><button>Search</button></form>"
                f"<div id=content><div class=cards>"
                + "".join(f"<div class=card>{_e(k)}<b>{_e(v)}</b></div>" for k, v in cards)
                + f"</div>{nav}<table id=tenants><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody>"
                f"</table></div>")
        return _page("tenantsync", body)

    def tenant_page(name: str) -> str:
        record = catalogue.get(name)
        if record is None:
            raise NotATenant(f"tenant {name}: unknown")
        now = datetime.now(timezone.utc)
        levels = Replica(store.child(name)).all_files()
        files = [f for level in sorted(levels) for f in levels[level]]
        window = (min((f.created_at for f in files), default=None), max((f.created_at for f in files), default=None))
        lag = lag_seconds(record.pending_since, now) if record.pending_since else None
        facts = [
            ("State", record.state.value), ("TXID", f"{record.txid or 0:016x}"),
            ("Lag", _duration(lag) if lag is not None else "0 (current)"),
            ("Last write", _ago(record.last_write_at, now)), ("Last sync", _ago(record.last_sync_at, now)),
            ("Point-in-time window", f"{window[0].isoformat()} → {window[1].isoformat()}" if files else "–"),
            ("Lease holder", record.lease_holder or "–"), ("WAL", _bytes(record.wal_bytes)),
            ("Stored", _bytes(record.bytes_stored)), ("Path", record.path), ("Last error", record.last_error or "–"),
        ]
        table = "".join(f"<tr><th>{_e(k)}</th><td id='{_e(k.lower().replace(' ', '-'))}'>{_e(v)}</td></tr>"
                        for k, v in facts)
        level_rows = "".join(
            f"<tr><td>{_e(LEVEL_NAMES.get(level, level))}</td><td class=n>{len(fs)}</td>"
            f"<td class=n>{fs[0].min_txid:016x}–{fs[-1].max_txid:016x}</td><td class=n>{_bytes(sum(f.size for f in fs))}</td>"
            f"<td>{_e(fs[-1].created_at.isoformat())}</td></tr>"
            for level, fs in sorted(levels.items()) if fs)
        api = f"/tenants/{quote(name)}"
        body = (f"<h1><a href='/'>tenantsync</a> › {_e(name)}</h1><div id=content>"
                f"<table id=facts>{table}</table><h2>Replica</h2><table id=levels><thead><tr><th>Level</th>"
                f"<th>Files</th><th>TXIDs</th><th>Size</th><th>Newest</th></tr></thead><tbody>{level_rows}</tbody>"
                f"</table></div><h2>Actions</h2><div id=actions><input id=token type=password "
                f"placeholder='API token' autocomplete=off> "
                f"<button data-action=hydrate data-url='{_e(api)}/hydrate'>Hydrate</button> "
                f"<button data-action=archive data-url='{_e(api)}/archive'>Archive</button>"
                f"<span id=result></span></div>")
        return _page(f"tenantsync › {name}", body)

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(await run_in_threadpool(fleet_page, dict(request.query_params)))

    async def tenant(request: Request) -> HTMLResponse:
        name = check_name(request.path_params["name"])
        return HTMLResponse(await run_in_threadpool(tenant_page, name))

    return [Route("/", answering(index), methods=["GET"]), Route("/t/{name:tenant}", answering(tenant), methods=["GET"])]
