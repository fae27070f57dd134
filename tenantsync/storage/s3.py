"""Storage in an S3 bucket (AWS or any S3-compatible server), Litestream 0.5 compatible.

Conditional writes are S3's own: ``PutObject`` with ``If-None-Match: *`` (create only)
or ``If-Match: <etag>`` (compare and swap), so atomicity is the server's. Every botocore
error is translated into the project's error tree in one place (``_errors``) with a one
line message naming the URL and key.

Every request is one ``_request``: under the endpoint host's cap on requests in flight,
tried by ``retry.Tries`` (botocore's own retries are off), each try bounded by the
options' timeouts and, for bodies, by a deadline in proportion to their size.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from typing import BinaryIO, TypeVar

import boto3
import botocore.handlers
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotoConnectionError,
    HTTPClientError,
    IncompleteReadError,
)
from urllib3.exceptions import HTTPError as URLLib3Error

from ..errors import ObjectNotFound, PreconditionFailed, StorageError, StorageUnavailable
from .base import ObjectInfo, Storage, check_key, check_prefix, check_range, timestamp_ms
from .options import StorageOptions
from .payload import Payload, TooSlow
from .retry import Transient, Tries

T = TypeVar("T")

#: User metadata key under which Litestream stores an LTX file's timestamp.
METADATA_TIMESTAMP = "litestream-timestamp"

#: Most keys one DeleteObjects request accepts.
MAX_DELETE_KEYS = 1000

_PRECONDITION_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}
_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404"}
# The store is there but asks for fewer requests: backing off is the answer.
_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests"}
_TRANSIENT_CODES = _THROTTLE_CODES | {"RequestTimeout", "ServiceUnavailable", "InternalError"}
# Most bytes one read of a response body asks the socket for.
_READ_SIZE = 1024 * 1024
# Bodies above this are sent with ``Expect: 100-continue``: the store can refuse a big
# upload (a failed condition, a denied key) before its bytes cross the network. Below it
# the header costs more than it saves, a whole round trip per PUT waiting for "100
# Continue". aws-sdk-go-v2's threshold, so Litestream's too; botocore adds the header to
# every file-like body, and ours always are (payload.Payload.sending).
EXPECT_CONTINUE_ABOVE = 2 * 1024 * 1024


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
        config = Config(
            s3={"addressing_style": "path"} if force_path_style else None,
            # Off: retry.Tries decides (and knows which tries may have been applied).
            retries={"total_max_attempts": 1},
            # No aws-chunked trailing checksums: many S3-compatible servers reject them
            # (Litestream disables them for custom endpoints for the same reason).
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            connect_timeout=options.connect_timeout,
            read_timeout=options.read_timeout,
            # One client serves every tenant's child storage from many threads; a request
            # in flight holds one connection, so the pool is the cap on them.
            max_pool_connections=options.max_in_flight,
        )
        self._client = _new_client(
            "s3",
            endpoint_url=endpoint,
            # Like Litestream: a custom endpoint without a region means us-east-1; on AWS
            # itself botocore follows the bucket's region redirects.
            region_name=region or ("us-east-1" if endpoint else None),
            verify=not skip_verify,
            config=config,
        )
        events = self._client.meta.events  # the client's own copy of the session's handlers
        events.unregister("before-call.s3", botocore.handlers.add_expect_header)
        events.register("before-call.s3", _expect_continue_if_large)
        self._host = urllib.parse.urlsplit(self._client.meta.endpoint_url).netloc
        self._in_flight = _host_cap(self._host, options.max_in_flight)

    @property
    def url(self) -> str:
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
        clone = copy.copy(self)  # shares the boto3 client: cheap per tenant, thread-safe
        clone.prefix = self._object_key(prefix)
        return clone

    # -- the one place keys are mapped between storage keys and object keys ---------

    def _object_key(self, key: str) -> str:
        """Object key of a storage key (or of a list prefix, which may be empty or end in /)."""
        return f"{self.prefix}/{key}" if self.prefix else key

    def _storage_key(self, object_key: str) -> str:
        return object_key[len(self.prefix) + 1 :] if self.prefix else object_key

    # -- operations -----------------------------------------------------------------

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        args = {"Bucket": self.bucket, "Prefix": self._object_key(check_prefix(prefix))}
        while True:  # page by page, each page one request: the cap is never held across a yield
            page = self._request("list", prefix or "/", lambda: self._client.list_objects_v2(**args))
            for obj in page.get("Contents", ()):
                yield ObjectInfo(
                    key=self._storage_key(obj["Key"]),
                    size=obj["Size"],
                    etag=_etag(obj["ETag"]),
                    modified=obj["LastModified"].astimezone(timezone.utc),
                )
            if not page.get("IsTruncated"):
                return
            args["ContinuationToken"] = page["NextContinuationToken"]

    def read(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        check_range(start, length)
        args = {"Bucket": self.bucket, "Key": self._object_key(check_key(key))}
        if start or length is not None:
            args["Range"] = f"bytes={start}-{'' if length is None else start + length - 1}"

        def attempt() -> bytes:
            try:
                answer = self._client.get_object(**args)
            except ClientError as e:
                if _code(e) == "InvalidRange":  # the object exists; start is at or past its end
                    return b""
                raise
            return self._body(answer["Body"], answer["ContentLength"])

        return self._request("read", key, attempt, not_found=ObjectNotFound)

    def _body(self, body, size: int) -> bytes:  # noqa: ANN001 - botocore's StreamingBody
        """The ``size`` bytes of a response body, within the transfer deadline of ``size``.

        botocore's read_timeout bounds each socket read, not the body: a trickle that never
        stays silent that long would hold the request for as long as it trickles, and
        closing the body from another thread does not wake a blocked read. So the body is
        read with read1 (one socket read per call, each bounded by read_timeout) and the
        deadline checked between reads. On any failure the connection is closed, never
        handed back to the pool in an unknown state."""
        deadline = self._deadline(size)
        raw = body._raw_stream  # urllib3's response: botocore's StreamingBody has no read1
        chunks, got = [], 0
        with contextlib.closing(body):
            while got < size:
                if time.monotonic() > deadline:
                    raise TooSlow(f"body of {size} bytes not received by its deadline ({got} bytes came)")
                try:
                    chunk = raw.read1(min(_READ_SIZE, size - got))
                except (URLLib3Error, OSError) as e:
                    raise Transient(f"body cut after {got} of {size} bytes: {e}") from e
                if not chunk:
                    raise Transient(f"body cut after {got} of {size} bytes")
                chunks.append(chunk)
                got += len(chunk)
            raw.release_conn()  # read to its end: the connection is good for the next request
        return b"".join(chunks)

    def _deadline(self, size: int) -> float:
        """When a transfer of ``size`` bytes starting now must be over: the time a small
        request may take, plus the size at the minimum transfer rate."""
        o = self.options
        return time.monotonic() + o.connect_timeout + o.read_timeout + size / o.min_transfer_rate

    def write_if_absent(self, key: str, data: bytes | BinaryIO, *, timestamp: datetime | None = None) -> str:
        return self._put(key, data, timestamp, IfNoneMatch="*")

    def write_if_match(
        self, key: str, data: bytes | BinaryIO, etag: str, *, timestamp: datetime | None = None
    ) -> str:
        # S3 answers 404 NoSuchKey for If-Match on a missing key (some servers say 412):
        # either way there was nothing to compare with.
        return self._put(key, data, timestamp, IfMatch=f'"{_etag(etag)}"', not_found=PreconditionFailed)

    def _put(
        self,
        key: str,
        data: bytes | BinaryIO,
        timestamp: datetime | None,
        not_found: type[StorageError] | None = None,
        **condition: str,
    ) -> str:
        payload = Payload(data)
        args = {"Bucket": self.bucket, "Key": self._object_key(check_key(key)), **condition}
        if timestamp is not None:
            args["Metadata"] = {METADATA_TIMESTAMP: format_timestamp(timestamp)}

        def attempt() -> str:
            body = payload.sending(self._deadline(payload.size))
            return _etag(self._client.put_object(Body=body, ContentLength=payload.size, **args)["ETag"])

        tries = Tries(self.options, f"{self}: write {key}", self._host)
        try:
            return tries.run(lambda: self._attempt("write", key, attempt, not_found))
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
        args = {"Bucket": self.bucket, "Key": self._object_key(key)}
        try:
            head = self._request("read", key, lambda: self._client.head_object(**args), not_found=ObjectNotFound)
        except ObjectNotFound:
            return None
        return ObjectInfo(key, head["ContentLength"], _etag(head["ETag"]), head["LastModified"])

    def delete(self, keys: Iterable[str]) -> None:
        objects = [{"Key": self._object_key(check_key(k))} for k in keys]
        for i in range(0, len(objects), MAX_DELETE_KEYS):
            batch = objects[i : i + MAX_DELETE_KEYS]
            first = self._storage_key(batch[0]["Key"])
            out = self._request("delete", first, lambda b=batch: self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": b, "Quiet": True}))
            if errors := out.get("Errors"):
                e = errors[0]
                error = StorageUnavailable if e.get("Code") in _TRANSIENT_CODES else StorageError
                raise error(
                    f"{self}: delete {self._storage_key(e['Key'])}: {e.get('Code')} {e.get('Message')}"
                    f" ({len(errors)} of {len(batch)} keys failed)"
                )

    # -- one request: capped, tried, translated ---------------------------------------

    def _request(self, action: str, key: str, call: Callable[[], T],
                 not_found: type[StorageError] | None = None) -> T:
        """``call()`` tried as the options allow; errors in the project's tree."""
        tries = Tries(self.options, f"{self}: {action} {key}", self._host)
        return tries.run(lambda: self._attempt(action, key, call, not_found))

    def _attempt(self, action: str, key: str, call: Callable[[], T], not_found: type[StorageError] | None) -> T:
        """One try, holding one of the host's places in flight while it runs."""
        with self._in_flight, self._errors(action, key, not_found):
            return call()

    # -- error translation ----------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, action: str, key: str, not_found: type[StorageError] | None = None) -> Iterator[None]:
        """Translate botocore errors raised inside into the project's error tree, or into
        Transient for a failure another try may not meet (retry.Tries then decides).

        ``not_found`` is what a missing key means for this call: ObjectNotFound on a
        read, PreconditionFailed on write-if-match, a plain StorageError elsewhere.
        """
        where = f"{self}: {action} {key}"
        try:
            yield
        except ClientError as e:
            code = _code(e)
            meta = e.response.get("ResponseMetadata", {})
            status = meta.get("HTTPStatusCode", 0)
            message = e.response.get("Error", {}).get("Message") or code
            if code in _PRECONDITION_CODES or status == 412:
                raise PreconditionFailed(f"{where}: condition failed ({code})") from e
            if not_found is not None and code in _NOT_FOUND_CODES:
                raise not_found(f"{where}: object not found") from e
            if code in _TRANSIENT_CODES or status >= 500 or status == 429:
                throttled = code in _THROTTLE_CODES or status in (429, 503)
                raise Transient(
                    f"server error {status} {code}: {message}", throttled=throttled,
                    # A throttle is a refusal; a 500 may come after the write was applied.
                    retry_after=_retry_after(meta.get("HTTPHeaders", {})), reached=not throttled,
                ) from e
            raise StorageError(f"{where}: {status} {code}: {message}") from e
        except BotoConnectionError as e:  # refused, DNS, connect timeout: nothing was sent
            raise Transient(f"cannot connect: {e}", reached=False) from e
        except (HTTPClientError, IncompleteReadError) as e:  # sent, but no (whole) answer
            raise Transient(f"no answer: {e}") from e
        except TooSlow as e:
            raise Transient(str(e)) from e
        except BotoCoreError as e:
            raise StorageError(f"{where}: {e}") from e


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


def _retry_after(headers: dict) -> float | None:
    """Retry-After in seconds, if the store sent it as a number (S3 does not send the date form)."""
    value = headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _expect_continue_if_large(model, params, **kwargs) -> None:  # noqa: ANN001 - botocore's event arguments
    """botocore's ``add_expect_header``, for bodies above EXPECT_CONTINUE_ABOVE only."""
    if model.http.get("method") not in ("PUT", "POST"):
        return
    length = params["headers"].get("Content-Length")
    if length is not None and int(length) > EXPECT_CONTINUE_ABOVE:
        params["headers"]["Expect"] = "100-continue"


_session: boto3.session.Session | None = None
_session_lock = threading.Lock()


def _new_client(*args: object, **kwargs: object):  # noqa: ANN202 - botocore's client type is generated
    """A client from one process-wide session: building the first client loads the S3
    service model, later ones reuse it, so a process opening thousands of tenants' URLs
    pays for the loading once. Sessions are not thread-safe, hence the lock."""
    global _session
    with _session_lock:
        if _session is None:
            _session = boto3.session.Session()
        return _session.client(*args, **kwargs)


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


def _code(error: ClientError) -> str:
    return error.response.get("Error", {}).get("Code", "")
