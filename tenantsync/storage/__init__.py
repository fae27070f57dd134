"""Object storage: one narrow interface (``base.Storage``), a file and an S3 backend.

``open_storage`` turns a replica URL into a backend. It accepts the URLs Litestream 0.5
accepts for these two backends, so one URL names the same replica for both tools.
Backends are imported lazily: the S3 backend (urllib3, botocore's credentials chain) is
only loaded for ``s3://`` URLs.
"""

from __future__ import annotations

import os
import re
import urllib.parse

from ..errors import StorageError
from .base import ObjectInfo, Storage
from .options import StorageOptions

__all__ = ["ObjectInfo", "Storage", "StorageOptions", "fleet_id", "open_storage"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_TRUE = {"true", "1", "t", "yes"}
_FALSE = {"false", "0", "f", "no"}


def open_storage(url: str, options: StorageOptions | None = None) -> Storage:
    """Open ``file:///abs/path``, a plain path, or ``s3://BUCKET/PATH?query``.

    ``options`` (timeouts, retries, requests in flight; the defaults if None) apply to S3.

    S3 query parameters (Litestream's names; the kebab-case spellings work too):
    ``endpoint`` (scheme optional: http for local addresses, https otherwise),
    ``region``, ``forcePathStyle`` (defaults to true when an endpoint is given),
    ``skipVerify``. Others Litestream knows (``signPayload``, ``storageClass``, …) are
    ignored. Raises StorageError for an unknown scheme or a missing bucket or path.
    """
    match = _SCHEME.match(url)
    if match is None:
        if not url:
            raise StorageError("storage URL is empty: give a path, file:///path or s3://bucket/path")
        from .file import FileStorage

        return FileStorage(url)
    scheme = match.group(1).lower()
    if scheme == "file":
        return _open_file(url)
    if scheme == "s3":
        return _open_s3(url, options)
    raise StorageError(f"unsupported storage URL scheme {scheme!r} in {url!r}: use file:// or s3://")


def fleet_id(url: str) -> str:
    """The identity of the replica root ``url``, the same for every spelling of it: a
    fleet's catalogue rows are keyed by it, so two fleets (two apps on one machine, each
    with its own replica) never share a row, whatever their tenants are called.

    ``file://``: the real path of the directory (symbolic links resolved, so two
    spellings of one directory are one fleet). ``s3://``: the bucket, the cleaned prefix
    and the endpoint (one bucket name on two servers is two fleets). Computed without
    any I/O on the store and without importing a backend."""
    match = _SCHEME.match(url)
    if match is not None and match.group(1).lower() == "s3":
        parts = urllib.parse.urlsplit(url)
        endpoint = _endpoint((urllib.parse.parse_qs(parts.query).get("endpoint") or [""])[0]).rstrip("/")
        key = f"s3://{parts.netloc}/{_clean_path(urllib.parse.unquote(parts.path))}"
        return f"{key}?endpoint={endpoint}" if endpoint else key
    root = open_storage(url).root  # a FileStorage, or the error an unusable URL gets
    return "file://" + urllib.parse.quote(os.path.realpath(root))


def _open_file(url: str) -> Storage:
    from .file import FileStorage

    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise StorageError(f"file URL {url!r} names host {parts.netloc!r}: use file:///absolute/path")
    path = urllib.parse.unquote(parts.path)
    if not path:
        raise StorageError(f"file URL {url!r} has no path: use file:///absolute/path")
    return FileStorage(path)


def _open_s3(url: str, options: StorageOptions | None) -> Storage:
    parts = urllib.parse.urlsplit(url)
    bucket = parts.netloc
    if not bucket:
        raise StorageError(f"s3 URL {url!r} has no bucket: use s3://BUCKET/PATH")
    query = urllib.parse.parse_qs(parts.query)

    def param(*names: str) -> str | None:
        for name in names:
            if values := query.get(name):
                return values[0]
        return None

    def flag(*names: str) -> bool | None:
        value = param(*names)
        if value is None:
            return None
        if value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise StorageError(f"s3 URL {url!r}: {names[0]}={value!r} is not a boolean (true/false)")

    endpoint = _endpoint(param("endpoint"))
    force_path_style = flag("forcePathStyle", "force-path-style")
    from .s3 import S3Storage

    return S3Storage(
        bucket,
        _clean_path(urllib.parse.unquote(parts.path)),
        endpoint=endpoint,
        region=param("region"),
        # Litestream: custom endpoints (MinIO, moto, …) use path style unless told not to.
        force_path_style=bool(endpoint) if force_path_style is None else force_path_style,
        skip_verify=bool(flag("skipVerify", "skip-verify")),
        options=options,
    )


def _endpoint(endpoint: str | None) -> str | None:
    """Litestream's rule for an endpoint without a scheme: http for local addresses, https otherwise."""
    if endpoint and "://" not in endpoint:
        return ("http://" if _is_local(endpoint) else "https://") + endpoint
    return endpoint


def _clean_path(path: str) -> str:
    """The object key prefix, cleaned as Litestream cleans it (Go ``path.Clean`` of the
    rooted path, leading slash removed): ``//a/./b/`` → ``a/b``, ``/a/../b`` → ``b``."""
    out: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if out:
                out.pop()
        elif segment not in ("", "."):
            out.append(segment)
    return "/".join(out)


def _is_local(endpoint: str) -> bool:
    """Litestream's IsLocalEndpoint: loopback and private addresses default to http."""
    host = endpoint.split("/", 1)[0].rsplit(":", 1)[0].lower()
    private = ("192.168.", "10.", "172.16.", "172.17.", "172.18.", "172.19.", "172.2", "172.30.", "172.31.")
    return host in ("localhost", "127.0.0.1") or host.startswith(private)
