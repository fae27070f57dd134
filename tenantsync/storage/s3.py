"""Storage in an S3 bucket (AWS or any S3-compatible server), Litestream 0.5 compatible.

Conditional writes are S3's own: ``PutObject`` with ``If-None-Match: *`` (create only)
or ``If-Match: <etag>`` (compare and swap), so atomicity is the server's. Every answer
is translated into the project's error tree in one place (``_check``) with a one line
message naming the URL and key.

The requests are S3's REST calls made directly: signed by ``sigv4``, sent on urllib3
connection pools shared by every storage of the process, answers parsed with
ElementTree. botocore's client costs several times more CPU per request than the request
itself (docs/BENCHMARKS.md, "CPU of a fresh tenant"), and a fleet starting or catching up
many tenants is bound by that CPU, not by the round trips; botocore's credentials chain is
still what finds the keys. Every request is one ``_request``:
under the endpoint host's cap on requests in flight, tried by ``retry.Tries``, each try
bounded by the options' timeouts and, for bodies, by a deadline in proportion to their size.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import BinaryIO
from xml.etree import ElementTree
from xml.sax.saxutils import escape

import urllib3
from urllib3.exceptions import ConnectTimeoutError, HTTPError as URLLib3Error, NewConnectionError

from .. import metrics
from ..errors import ObjectNotFound, PreconditionFailed, StorageError, StorageUnavailable
from . import sigv4
from .base import ObjectInfo, Storage, check_key, check_prefix, check_range, timestamp_ms
from .options import StorageOptions
from .payload import Payload, TooSlow
from .retry import Transient, Tries

#: User metadata key under which Litestream stores an LTX file's timestamp.
METADATA_TIMESTAMP = "litestream-timestamp"

#: Most keys one DeleteObjects request accepts.
MAX_DELETE_KEYS = 1000
#: Most entries asked for in one ListObjectVersions page (S3's own maximum; some servers
#: default to fewer, so it is always sent).
MAX_LIST_KEYS = 1000

_PRECONDITION_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}
_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404"}
# The store is there but asks for fewer requests: backing off is the answer.
_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests"}
_TRANSIENT_CODES = _THROTTLE_CODES | {"RequestTimeout", "ServiceUnavailable", "InternalError"}
# Most bytes one read of a response body asks the socket for.
_READ_SIZE = 1024 * 1024


class S3Storage(Storage):
    """Objects under ``prefix`` in ``bucket``; the key ``a/b`` is the object ``prefix/a/b``.

    Credentials come from the standard AWS chain (environment, shared files, instance
    roles); they never appear in the URL.
    """

    kind = "s3"

    def __init__(
        self,
        bucket: str,
        prefix: str,
        endpoint: str | None = None,
        region: str | None = None,
        force_path_style: bool = False,
        skip_verify: bool = False,
        options: StorageOptions | None = None,
    ):
        self.options = options = options or StorageOptions()
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint = endpoint
        self.region = region
        self.force_path_style = force_path_style
        self.skip_verify = skip_verify
        # Like Litestream: a custom endpoint without a region means us-east-1; on AWS the
        # configured region, else us-east-1 until the bucket's answer names its own.
        self._route = _Route.of(bucket, endpoint, region or ("us-east-1" if endpoint else _configured_region()),
                                force_path_style, skip_verify, options)
        self._host = self._route.endpoint_host
        self._in_flight = _host_cap(self._host, options.max_in_flight)
        self._url: str | None = None

    @property
    def url(self) -> str:
        """The URL naming this storage (in every message: made once, not per request)."""
        if self._url is None:
            self._url = self._make_url()
        return self._url

    def _make_url(self) -> str:
        query = {}
        if self.endpoint:
            query["endpoint"] = self.endpoint
        if self.region:
            query["region"] = self.region
        if self.force_path_style:
            query["forcePathStyle"] = "true"
        if self.skip_verify:
            query["skipVerify"] = "true"
        path = "/" + urllib.parse.quote(self.prefix) if self.prefix else ""
        qs = "?" + urllib.parse.urlencode(query, safe=":/") if query else ""
        return f"s3://{self.bucket}{path}{qs}"

    def _child(self, prefix: str) -> S3Storage:
        clone = copy.copy(self)  # shares the route and its connections: cheap per tenant
        clone.prefix = self._object_key(prefix)
        clone._url = None
        return clone

    # -- the one place keys are mapped between storage keys and object keys ---------

    def _object_key(self, key: str) -> str:
        """Object key of a storage key (or of a list prefix, which may be empty or end in /)."""
        return f"{self.prefix}/{key}" if self.prefix else key

    def _storage_key(self, object_key: str) -> str:
        return object_key[len(self.prefix) + 1 :] if self.prefix else object_key

    # -- operations -----------------------------------------------------------------

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        query = [("list-type", "2"), ("prefix", self._object_key(check_prefix(prefix))), ("encoding-type", "url")]
        while True:  # page by page, each page one request: the cap is never held across a yield
            page = _xml(self._request("list", prefix or "/", "GET", None, query))
            for obj in _all(page, "Contents"):
                yield ObjectInfo(
                    key=self._storage_key(urllib.parse.unquote_plus(_text(obj, "Key"))),
                    size=int(_text(obj, "Size")),
                    etag=_etag(_text(obj, "ETag")),
                    modified=datetime.fromisoformat(_text(obj, "LastModified").replace("Z", "+00:00")),
                )
            if _text(page, "IsTruncated", "false") != "true":
                return
            query = [*query[:3], ("continuation-token", _text(page, "NextContinuationToken"))]

    def read(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        check_range(start, length)
        headers = {}
        if start or length is not None:
            headers["range"] = f"bytes={start}-{'' if length is None else start + length - 1}"
        try:
            return self._request("read", key, "GET", self._object_key(check_key(key)), headers=headers,
                                 not_found=ObjectNotFound)
        except _InvalidRange:  # the object exists; start is at or past its end
            return b""

    def _deadline(self, size: int) -> float:
        """When a transfer of ``size`` bytes starting now must be over: the time a small
        request may take, plus the size at the minimum transfer rate."""
        o = self.options
        return time.monotonic() + o.connect_timeout + o.read_timeout + size / o.min_transfer_rate

    def write_if_absent(self, key: str, data: bytes | BinaryIO, *, timestamp: datetime | None = None) -> str:
        return self._put(key, data, timestamp, {"if-none-match": "*"})

    def write_if_match(
        self, key: str, data: bytes | BinaryIO, etag: str, *, timestamp: datetime | None = None
    ) -> str:
        # S3 answers 404 NoSuchKey for If-Match on a missing key (some servers say 412):
        # either way there was nothing to compare with.
        return self._put(key, data, timestamp, {"if-match": f'"{_etag(etag)}"'}, not_found=PreconditionFailed)

    def _put(
        self,
        key: str,
        data: bytes | BinaryIO,
        timestamp: datetime | None,
        condition: dict[str, str],
        not_found: type[StorageError] | None = None,
    ) -> str:
        payload = Payload(data)
        headers = dict(condition)
        if timestamp is not None:
            headers["x-amz-meta-" + METADATA_TIMESTAMP] = format_timestamp(timestamp)
        object_key = self._object_key(check_key(key))
        tries = Tries(self.options, f"{self}: write {key}", self._host)
        try:
            answer = tries.run(lambda: self._attempt("write", key, "PUT", object_key, (), headers, payload, not_found))
            return _etag(answer.headers.get("etag", ""))
        except PreconditionFailed:
            if not tries.reached:
                raise
            # An earlier try may have been applied before its answer was lost: the 412 is
            # then our own write's. Whoever wrote, the store holds what it holds now.
            stored = self._stored(key)
            if stored is None or not payload.is_stored(stored.size, stored.etag, lambda s, n: self.read(key, s, n)):
                raise
            return stored.etag

    def _stored(self, key: str) -> ObjectInfo | None:
        """The object at ``key`` as HEAD describes it, or None if there is none."""
        try:
            head = self._request("read", key, "HEAD", self._object_key(key), not_found=ObjectNotFound, answer=True)
        except ObjectNotFound:
            return None
        modified = head.headers.get("last-modified")
        return ObjectInfo(key, int(head.headers.get("content-length", 0)), _etag(head.headers.get("etag", "")),
                          parsedate_to_datetime(modified) if modified else datetime.now(timezone.utc))

    def delete(self, keys: Iterable[str]) -> None:
        object_keys = [self._object_key(check_key(k)) for k in keys]
        for i in range(0, len(object_keys), MAX_DELETE_KEYS):
            batch = [_Version(k, None, False) for k in object_keys[i : i + MAX_DELETE_KEYS]]
            if refused := self._delete_objects("delete", batch):
                raise self._refusal("delete", refused, f"{len(batch)} keys")

    def delete_all_versions(self, prefix: str) -> int:
        """ListObjectVersions, and DeleteObjects naming each version, in two passes: every
        version first, then every delete marker. A refusal in the first pass (an object
        lock, a policy) raises before any marker goes, so no deleted object ever becomes
        current again by losing the marker on top of it. Each pass deletes page by page
        and holds back the entry a page's listing continues after until the next page is
        listed, so the listing's markers always name an entry that still exists. A final
        look catches what a pass could not see (versions written meanwhile); the passes
        repeat while they delete something."""
        object_prefix = self._object_key(check_prefix(prefix))
        where = self._storage_key(object_prefix) or "/"
        removed = 0
        while True:
            this_round = 0
            for markers in (False, True):
                deleted, refused, tried = self._delete_versions(object_prefix, markers)
                this_round += deleted
                if refused:
                    kept = ", the delete markers kept" if not markers else ""
                    raise self._refusal("delete version", refused, f"{tried} {'entries' if markers else 'versions'}",
                                        f"; {removed + this_round} deleted{kept}")
            removed += this_round
            left, _ = self._versions_page(object_prefix, None, 1)
            if not left:
                return removed
            if not this_round:
                raise StorageError(f"{self}: delete all versions {where}: {self._storage_key(left[0].key)} "
                                   f"(version {left[0].version_id}) is still listed after a pass that deleted nothing")

    def _delete_versions(self, object_prefix: str, markers: bool) -> tuple[int, list[tuple[_Version, str, str]], int]:
        """One pass over the versions under ``object_prefix``, deleting every ``Version``
        (and, with ``markers``, every ``DeleteMarker`` too). Returns how many were deleted,
        the refusals, and how many were tried."""
        deleted, refused, tried = 0, [], 0
        held, after = None, None
        while True:
            entries, after = self._versions_page(object_prefix, after)
            doomed = ([held] if held else []) + [v for v in entries if markers or not v.marker]
            held = None
            if after is not None:  # the next page is listed after this entry: it goes with that page
                for i, v in enumerate(doomed):
                    if (v.key, v.version_id) == after:
                        held = doomed.pop(i)
                        break
            for i in range(0, len(doomed), MAX_DELETE_KEYS):
                batch = doomed[i : i + MAX_DELETE_KEYS]
                failed = self._delete_objects("delete_versions", batch)
                deleted, tried = deleted + len(batch) - len(failed), tried + len(batch)
                refused += failed
            if after is None:
                return deleted, refused, tried

    def _versions_page(self, object_prefix: str, after: tuple[str, str] | None,
                       most: int | None = None) -> tuple[list[_Version], tuple[str, str] | None]:
        """One page of ListObjectVersions under ``object_prefix``, listed after the entry
        ``after`` (key and version id); the entries and the entry the next page follows
        (None on the last page)."""
        query = [("versions", ""), ("prefix", object_prefix), ("max-keys", str(most or MAX_LIST_KEYS)),
                 ("encoding-type", "url")]
        if after is not None:
            query.append(("key-marker", after[0]))
            if after[1]:
                query.append(("version-id-marker", after[1]))
        where = self._storage_key(object_prefix) or "/"
        page = _xml(self._request("list_versions", where, "GET", None, query))
        # Keys are URL-encoded only when the answer says so (some servers ignore the request).
        decode = urllib.parse.unquote_plus if _text(page, "EncodingType", "") == "url" else str
        entries = []
        for elem in page:
            kind = _local(elem.tag)
            if kind in ("Version", "DeleteMarker"):
                key = decode(_text(elem, "Key"))
                if not key.startswith(object_prefix):  # never delete what was not asked for
                    raise StorageError(f"{self}: list versions {where}: the answer holds {key!r}, outside the prefix")
                entries.append(_Version(key, _text(elem, "VersionId", "null"), kind == "DeleteMarker"))
        if _text(page, "IsTruncated", "false") != "true":
            return entries, None
        next_key, next_version = _text(page, "NextKeyMarker", ""), _text(page, "NextVersionIdMarker", "")
        if not next_key or not entries:
            raise StorageError(f"{self}: list versions {where}: a truncated answer without where the next page starts")
        return entries, (decode(next_key), next_version)

    def _delete_objects(self, action: str, batch: list[_Version]) -> list[tuple[_Version, str, str]]:
        """One DeleteObjects request (quiet: the answer lists only failures); the entries
        it did not delete, each with S3's code and message."""
        xml = "<Delete><Quiet>true</Quiet>" + "".join(
            f"<Object><Key>{escape(v.key)}</Key>"
            + (f"<VersionId>{escape(v.version_id)}</VersionId>" if v.version_id is not None else "")
            + "</Object>" for v in batch) + "</Delete>"
        body = xml.encode()
        headers = {"content-md5": base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode(),
                   "content-type": "application/xml"}
        out = _xml(self._request(action, self._storage_key(batch[0].key), "POST", None, [("delete", "")],
                                 headers, Payload(body)))
        failed = []
        for e in _all(out, "Error"):
            key, version = _text(e, "Key", ""), _text(e, "VersionId", "") or None
            if version is None:  # not every server says which version: the one asked for, if that is clear
                asked = {v.version_id for v in batch if v.key == key}
                version = asked.pop() if len(asked) == 1 else None
            failed.append((_Version(key, version, False), _text(e, "Code", "?"), _text(e, "Message", "")))
        return failed

    def _refusal(self, action: str, refused: list[tuple[_Version, str, str]], of: str, note: str = "") -> StorageError:
        """The error for entries DeleteObjects did not delete, naming the first that will not
        go by asking again (else the first): StorageUnavailable if all may go on a retry."""
        lasting = [r for r in refused if r[1] not in _TRANSIENT_CODES]
        (v, code, message), error = (lasting or refused)[0], StorageError if lasting else StorageUnavailable
        version = f" (version {v.version_id})" if v.version_id is not None else ""
        return error(f"{self}: {action} {self._storage_key(v.key)}{version}: {code} {message}"
                     f" ({len(refused)} of {of} failed{note})")

    # -- one request: capped, tried, translated ---------------------------------------

    def _request(self, action: str, key: str, method: str, object_key: str | None,
                 query: Iterable[tuple[str, str]] = (), headers: dict[str, str] | None = None,
                 payload: Payload | None = None, not_found: type[StorageError] | None = None,
                 answer: bool = False):
        """One operation, tried as the options allow: the answer's body, or with ``answer``
        the whole ``_Answer``; errors in the project's tree."""
        tries = Tries(self.options, f"{self}: {action} {key}", self._host)
        got = tries.run(lambda: self._attempt(action, key, method, object_key, query, headers or {}, payload,
                                              not_found))
        return got if answer else got.body

    def _attempt(self, action: str, key: str, method: str, object_key: str | None,
                 query: Iterable[tuple[str, str]], headers: dict[str, str], payload: Payload | None,
                 not_found: type[StorageError] | None) -> _Answer:
        """One try, holding one of the host's places in flight while it runs."""
        where = f"{self}: {action} {key}"
        with self._in_flight:
            started, result, got = time.monotonic(), "unreachable", None
            try:
                got = self._route.send(method, object_key, list(query), headers, payload, self._deadline)
                result = _result(got)
                return _check(got, where, not_found)
            except TooSlow as e:
                raise Transient(str(e)) from e
            except (NewConnectionError, ConnectTimeoutError) as e:  # refused, DNS, connect timeout: nothing sent
                raise Transient(f"cannot connect: {e}", reached=False) from e
            except (URLLib3Error, OSError) as e:  # sent, but no (whole) answer
                raise Transient(f"no answer: {e}") from e
            finally:
                metrics.store_request(action, result, time.monotonic() - started,
                                      payload.size if payload is not None else 0, len(got.body) if got else 0)


@dataclass(frozen=True)
class _Version:
    """One entry of ListObjectVersions: an object key (with the storage's prefix), its
    version id (None: the current object, as ``delete`` names it) and whether it is a
    delete marker."""

    key: str
    version_id: str | None
    marker: bool


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: urllib3.HTTPHeaderDict
    body: bytes


def _result(got: _Answer) -> str:
    """An answer's result label in the request metrics: a handful of values, never a code
    a server made up."""
    if got.status < 300:
        return "ok"
    return {404: "not_found", 412: "precondition", 416: "not_found", 429: "throttled",
            503: "throttled"}.get(got.status, "server_error" if got.status >= 500 else "refused")


class _InvalidRange(Exception):
    """A ranged read starting at or past the object's end (S3's 416)."""


def _check(got: _Answer, where: str, not_found: type[StorageError] | None) -> _Answer:
    """``got`` if it is a success; else the project's error for it, or Transient for a
    failure another try may not meet (retry.Tries then decides).

    ``not_found`` is what a missing key means for this call: ObjectNotFound on a read,
    PreconditionFailed on write-if-match, a plain StorageError elsewhere."""
    status = got.status
    if status < 300:
        return got
    code, message = _error_of(got)
    if region := got.headers.get("x-amz-bucket-region"):
        if status in (301, 307, 400):  # AWS: the bucket lives in another region than we signed for
            raise StorageError(f"{where}: the bucket is in region {region}: add ?region={region} to the URL")
    if status == 416 or code == "InvalidRange":
        raise _InvalidRange()
    if code in _PRECONDITION_CODES or status == 412:
        raise PreconditionFailed(f"{where}: condition failed ({code})")
    if not_found is not None and (code in _NOT_FOUND_CODES or status == 404):
        raise not_found(f"{where}: object not found")
    if code in _TRANSIENT_CODES or status >= 500 or status == 429:
        throttled = code in _THROTTLE_CODES or status in (429, 503)
        raise Transient(
            f"server error {status} {code}: {message}", throttled=throttled,
            # A throttle is a refusal; a 500 may come after the write was applied.
            retry_after=_retry_after(got.headers), reached=not throttled,
        )
    raise StorageError(f"{where}: {status} {code}: {message}")


def _error_of(got: _Answer) -> tuple[str, str]:
    """S3's error code and message from an error answer's XML (a HEAD has no body: the
    status stands for the code then)."""
    try:
        root = _xml(got.body)
    except StorageError:  # no body, or not S3's XML (a proxy's page)
        return str(got.status), got.body[:200].decode("utf-8", "replace").strip() or str(got.status)
    return _text(root, "Code", str(got.status)), _text(root, "Message", "")


class _Route:
    """Where requests for one bucket go and how: the endpoint's connection pool (shared
    by every storage of the process that talks to that endpoint), path or virtual-host
    addressing, the signer and the credentials."""

    _pools: dict[tuple, urllib3.connectionpool.HTTPConnectionPool] = {}
    _lock = threading.Lock()

    def __init__(self, bucket: str, base: urllib.parse.SplitResult, host: str, region: str, path_style: bool,
                 pool: urllib3.connectionpool.HTTPConnectionPool):
        self.bucket, self.host, self.path_style, self._pool = bucket, host, path_style, pool
        self.endpoint_host = base.netloc
        self.https = base.scheme == "https"
        self.signer = sigv4.Signer(region)

    @classmethod
    def of(cls, bucket: str, endpoint: str | None, region: str, path_style: bool, skip_verify: bool,
           options: StorageOptions) -> _Route:
        base = urllib.parse.urlsplit(endpoint or f"https://s3.{region}.amazonaws.com")
        if base.scheme not in ("http", "https") or not base.hostname:
            raise StorageError(f"s3: endpoint {endpoint!r} is not an http(s) URL")
        host = base.netloc if path_style else f"{bucket}.{base.netloc}"
        key = (base.scheme, host, skip_verify, options.connect_timeout, options.read_timeout, options.max_in_flight)
        with cls._lock:
            pool = cls._pools.get(key)
            if pool is None:
                tls = {}
                if base.scheme == "https":
                    tls = {"cert_reqs": "CERT_NONE"} if skip_verify else {"ca_certs": _ca_bundle()}
                pool = cls._pools[key] = urllib3.connection_from_url(
                    f"{base.scheme}://{host}", maxsize=options.max_in_flight, block=False, retries=False,
                    timeout=urllib3.Timeout(connect=options.connect_timeout, read=options.read_timeout), **tls)
        return cls(bucket, base, host, region, path_style, pool)

    def send(self, method: str, object_key: str | None, query: list[tuple[str, str]], headers: dict[str, str],
             payload: Payload | None, deadline_of: Callable[[int], float]) -> _Answer:
        """One signed request and its whole answer, the body read within the deadline of
        its size. A connection whose answer was not read to its end is closed, never
        handed back to the pool in an unknown state."""
        path = "/" + sigv4.quote(self.bucket) if self.path_style else ""
        if object_key is not None:
            path += "/" + sigv4.quote(object_key, safe="-_.~/")
        path = path or "/"
        qs = sigv4.canonical_query(query)
        size = payload.size if payload is not None else 0
        headers = dict(headers)
        if payload is not None:
            headers["content-length"] = str(size)
        digest = (sigv4.UNSIGNED_PAYLOAD if self.https and payload is not None
                  else payload.sha256() if payload is not None else sigv4.EMPTY_SHA256)
        signed = self.signer.headers(_credentials(), method, self.host, path, qs, headers, digest,
                                     datetime.now(timezone.utc))
        deadline = deadline_of(size)
        body = payload.sending(deadline) if payload is not None else None
        response = self._pool.urlopen(method, path + ("?" + qs if qs else ""), body=body, headers=signed,
                                      retries=False, redirect=False, preload_content=False,
                                      assert_same_host=False)
        try:
            length = response.headers.get("content-length")
            data = b"" if method == "HEAD" else _read_body(response, None if length is None else int(length),
                                                          deadline_of)
        except BaseException:
            response.close()  # closes the connection: the pool opens a new one in its place
            response.release_conn()
            raise
        response.release_conn()
        return _Answer(response.status, response.headers, data)


def _read_body(response: urllib3.HTTPResponse, size: int | None, deadline_of: Callable[[int], float]) -> bytes:
    """The answer's body within the transfer deadline of its size. The read timeout bounds
    each socket read, not the body: a trickle that never stays silent that long would hold
    the request for as long as it trickles, so the deadline is checked between reads."""
    deadline = deadline_of(size or 0)
    chunks, got = [], 0
    while size is None or got < size:
        if time.monotonic() > deadline:
            raise TooSlow(f"body of {size} bytes not received by its deadline ({got} bytes came)")
        try:
            chunk = response.read1(_READ_SIZE if size is None else min(_READ_SIZE, size - got))
        except (URLLib3Error, OSError) as e:
            raise Transient(f"body cut after {got} of {size} bytes: {e}") from e
        if not chunk:
            if size is None:
                break
            raise Transient(f"body cut after {got} of {size} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _xml(body: bytes) -> ElementTree.Element:
    try:
        return ElementTree.fromstring(body)
    except ElementTree.ParseError as e:
        raise StorageError(f"s3: an answer that is not XML ({e}): {body[:200]!r}") from e


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _all(elem: ElementTree.Element, name: str) -> list[ElementTree.Element]:
    """Children named ``name`` in any namespace (S3 answers in its 2006-03-01 namespace,
    some servers in none)."""
    return [child for child in elem if _local(child.tag) == name]


def _text(elem: ElementTree.Element, name: str, default: str | None = None) -> str:
    found = _all(elem, name)
    if found:
        return found[0].text or ""
    if default is None:
        raise StorageError(f"s3: answer without <{name}>")
    return default


_host_caps: dict[str, threading.BoundedSemaphore] = {}
_host_caps_lock = threading.Lock()


def _host_cap(host: str, most: int) -> threading.BoundedSemaphore:
    """The process's one semaphore for ``host``: every storage (and every child) talking to
    one endpoint shares it, whichever URL or tenant opened it. The first storage opened for
    a host sets its size; a process reads one configuration, so they all agree."""
    with _host_caps_lock:
        if host not in _host_caps:
            _host_caps[host] = threading.BoundedSemaphore(most)
        return _host_caps[host]


def _retry_after(headers) -> float | None:  # noqa: ANN001 - urllib3's header dict
    """Retry-After in seconds, if the store sent it as a number (S3 does not send the date form)."""
    value = headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


_session = None
_session_lock = threading.Lock()


def _botocore_session():  # noqa: ANN202 - botocore's session
    """One botocore session per process, for the AWS credentials chain and the configured
    region (environment, shared config and credentials files, instance roles). Sessions
    are not thread-safe, hence the lock."""
    global _session
    with _session_lock:
        if _session is None:
            import botocore.session

            _session = botocore.session.get_session()
        return _session


_chain_credentials = None


def _credentials() -> sigv4.Credentials:
    """The chain's credentials, as of now (refreshable ones refresh themselves). Found
    once per process, as botocore's client would."""
    global _chain_credentials
    if _chain_credentials is None:
        found = _botocore_session().get_credentials()
        if found is None:
            raise StorageError("s3: no AWS credentials found (environment, ~/.aws files or an instance role)")
        _chain_credentials = found
    frozen = _chain_credentials.get_frozen_credentials()
    return sigv4.Credentials(frozen.access_key, frozen.secret_key, frozen.token)


def _configured_region() -> str:
    return _botocore_session().get_config_variable("region") or "us-east-1"


def _ca_bundle() -> str | None:
    """The CA bundle botocore would use (AWS_CA_BUNDLE, the config file's ca_bundle, else
    certifi's)."""
    from botocore.httpsession import get_cert_path

    return _botocore_session().get_config_variable("ca_bundle") or get_cert_path(True)


def format_timestamp(timestamp: datetime) -> str:
    """The timestamp exactly as Litestream writes ``litestream-timestamp``.

    Litestream formats ``time.UnixMilli(header.Timestamp).UTC()`` with Go's
    ``time.RFC3339Nano``: the fraction has its trailing zeros removed and is omitted
    when zero (``…T07:08:09.12Z``, ``…T07:08:09Z``); it is not fixed-width milliseconds.
    """
    ms = timestamp_ms(timestamp)
    seconds, frac = divmod(ms, 1000)
    text = datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        text += "." + f"{frac:03d}".rstrip("0")
    return text + "Z"


def _etag(raw: str) -> str:
    """ETags without their HTTP quotes, the form every method takes and returns."""
    return raw.strip('"')
