"""Storage in an S3 bucket (AWS or any S3-compatible server), Litestream 0.5 compatible.

Conditional writes are S3's own: ``PutObject`` with ``If-None-Match: *`` (create only)
or ``If-Match: <etag>`` (compare and swap), so atomicity is the server's. Every botocore
error is translated into the project's error tree in one place (``_errors``) with a one
line message naming the URL and key.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import urllib.parse
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from typing import BinaryIO

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotoConnectionError,
    HTTPClientError,
    IncompleteReadError,
)

from ..errors import ObjectNotFound, PreconditionFailed, StorageError, StorageUnavailable
from .base import ObjectInfo, Storage, check_key, check_prefix, check_range, timestamp_ms

#: User metadata key under which Litestream stores an LTX file's timestamp.
METADATA_TIMESTAMP = "litestream-timestamp"

#: Most keys one DeleteObjects request accepts.
MAX_DELETE_KEYS = 1000

_PRECONDITION_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}
_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404"}
_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable", "InternalError",
}
# Failures to get any answer from the endpoint: refused, DNS, TLS, timeouts, cut streams.
_TRANSPORT_ERRORS = (BotoConnectionError, HTTPClientError, IncompleteReadError)


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
    ):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint = endpoint
        self.region = region
        self.force_path_style = force_path_style
        self.skip_verify = skip_verify
        config = Config(
            s3={"addressing_style": "path"} if force_path_style else None,
            # Few, quick retries: the replication loop retries a failed pass itself, and
            # an unreachable store must surface as StorageUnavailable in seconds.
            retries={"max_attempts": 3, "mode": "standard"},
            # No aws-chunked trailing checksums: many S3-compatible servers reject them
            # (Litestream disables them for custom endpoints for the same reason).
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            connect_timeout=5,
            read_timeout=30,
            # One client serves every tenant's child storage from many threads.
            max_pool_connections=32,
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
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._object_key(check_prefix(prefix))
        )
        with self._errors("list", prefix or "/"):
            for page in pages:
                for obj in page.get("Contents", ()):
                    yield ObjectInfo(
                        key=self._storage_key(obj["Key"]),
                        size=obj["Size"],
                        etag=_etag(obj["ETag"]),
                        modified=obj["LastModified"].astimezone(timezone.utc),
                    )

    def read(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        check_range(start, length)
        args = {"Bucket": self.bucket, "Key": self._object_key(check_key(key))}
        if start or length is not None:
            args["Range"] = f"bytes={start}-{'' if length is None else start + length - 1}"
        with self._errors("read", key, not_found=ObjectNotFound):
            try:
                body = self._client.get_object(**args)["Body"]
            except ClientError as e:
                if _code(e) == "InvalidRange":  # the object exists; start is at or past its end
                    return b""
                raise
            with contextlib.closing(body):
                return body.read()

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
        args = {"Bucket": self.bucket, "Key": self._object_key(check_key(key)), "Body": data, **condition}
        if timestamp is not None:
            args["Metadata"] = {METADATA_TIMESTAMP: format_timestamp(timestamp)}
        with self._errors("write", key, not_found=not_found):
            return _etag(self._client.put_object(**args)["ETag"])

    def delete(self, keys: Iterable[str]) -> None:
        objects = [{"Key": self._object_key(check_key(k))} for k in keys]
        for i in range(0, len(objects), MAX_DELETE_KEYS):
            batch = objects[i : i + MAX_DELETE_KEYS]
            first = self._storage_key(batch[0]["Key"])
            with self._errors("delete", first):
                out = self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if errors := out.get("Errors"):
                e = errors[0]
                error = StorageUnavailable if e.get("Code") in _TRANSIENT_CODES else StorageError
                raise error(
                    f"{self}: delete {self._storage_key(e['Key'])}: {e.get('Code')} {e.get('Message')}"
                    f" ({len(errors)} of {len(batch)} keys failed)"
                )

    # -- error translation ----------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, action: str, key: str, not_found: type[StorageError] | None = None) -> Iterator[None]:
        """Translate botocore errors raised inside into the project's error tree.

        ``not_found`` is what a missing key means for this call: ObjectNotFound on a
        read, PreconditionFailed on write-if-match, a plain StorageError elsewhere.
        """
        where = f"{self}: {action} {key}"
        try:
            yield
        except ClientError as e:
            code = _code(e)
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            message = e.response.get("Error", {}).get("Message") or code
            if code in _PRECONDITION_CODES or status == 412:
                raise PreconditionFailed(f"{where}: condition failed ({code})") from e
            if not_found is not None and code in _NOT_FOUND_CODES:
                raise not_found(f"{where}: object not found") from e
            if code in _TRANSIENT_CODES or status >= 500 or status == 429:
                raise StorageUnavailable(f"{where}: server error {status} {code}: {message}") from e
            raise StorageError(f"{where}: {status} {code}: {message}") from e
        except _TRANSPORT_ERRORS as e:
            raise StorageUnavailable(f"{where}: cannot reach {self.endpoint or 'S3'}: {e}") from e
        except BotoCoreError as e:
            raise StorageError(f"{where}: {e}") from e


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
