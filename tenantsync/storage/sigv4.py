"""AWS Signature Version 4 for S3 requests, in the form the S3 backend sends them.

botocore signs the same way, but only as one step of a request pipeline (event hooks,
endpoint rules, models, parsers) whose CPU is what a fleet bringing up many tenants at once
waits for (docs/BENCHMARKS.md). Signing itself is two SHA-256s and four HMACs. Credentials still come from botocore's chain (environment, shared files,
instance roles, their refresh), so nothing of how users give them changes.

The algorithm: https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html
(tests/test_sigv4.py checks it against that page's example and against botocore's signer).
"""

from __future__ import annotations

import hashlib
import hmac
import urllib.parse
from dataclasses import dataclass
from datetime import datetime

#: The payload hash of a request whose body is not signed (allowed over TLS only).
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    token: str | None = None


def quote(text: str, safe: str = "-_.~") -> str:
    """URI-encode as SigV4 asks: every byte but the unreserved characters (and ``safe``)."""
    return urllib.parse.quote(text, safe=safe)


def canonical_query(params: list[tuple[str, str]]) -> str:
    """The query string in SigV4's canonical form, which is also the one we send."""
    return "&".join(f"{quote(k)}={quote(v)}" for k, v in sorted(params))


class Signer:
    """Signs requests for one region. The signing key depends only on the secret, the
    date and the region, so it is derived once a day, not per request."""

    def __init__(self, region: str):
        self.region = region
        self._key: tuple[tuple[str, str], bytes] | None = None

    def headers(self, creds: Credentials, method: str, host: str, path: str, query: str,
                headers: dict[str, str], payload_hash: str, now: datetime) -> dict[str, str]:
        """``headers`` plus Host, X-Amz-Date, X-Amz-Content-Sha256, the session token and
        Authorization, for a request whose ``path`` is already URI-encoded and whose
        ``query`` is canonical (``canonical_query``). ``now`` is UTC."""
        amz_date = now.strftime("%Y%m%dT%H%M%SZ")
        day = amz_date[:8]
        out = dict(headers)
        out["host"] = host
        out["x-amz-date"] = amz_date
        out["x-amz-content-sha256"] = payload_hash
        if creds.token:
            out["x-amz-security-token"] = creds.token
        signed = sorted((k.lower(), " ".join(str(v).split())) for k, v in out.items())
        signed_names = ";".join(k for k, _v in signed)
        canonical = "\n".join([
            method, path, query, *(f"{k}:{v}" for k, v in signed), "", signed_names, payload_hash,
        ])
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        signature = hmac.new(self._signing_key(creds.secret_key, day), to_sign.encode(), hashlib.sha256).hexdigest()
        out["authorization"] = (f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, "
                                f"SignedHeaders={signed_names}, Signature={signature}")
        return out

    def _signing_key(self, secret: str, day: str) -> bytes:
        cached = self._key
        if cached is not None and cached[0] == (secret, day):
            return cached[1]
        key = ("AWS4" + secret).encode()
        for part in (day, self.region, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        self._key = ((secret, day), key)
        return key
