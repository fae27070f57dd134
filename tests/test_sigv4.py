"""SigV4 as the S3 backend signs: AWS's published examples, and botocore's signer on
requests like ours (query strings, odd keys, session tokens)."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials

from tenantsync.storage.sigv4 import EMPTY_SHA256, Credentials, Signer, canonical_query, quote

# https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html
AWS_EXAMPLE = Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
EXAMPLE_TIME = datetime(2013, 5, 24, tzinfo=timezone.utc)
EXAMPLE_HOST = "examplebucket.s3.amazonaws.com"


def signature(headers: dict[str, str]) -> str:
    return headers["authorization"].rsplit("Signature=", 1)[1]


def test_aws_examples():
    signer = Signer("us-east-1")
    get = signer.headers(AWS_EXAMPLE, "GET", EXAMPLE_HOST, "/test.txt", "", {"Range": "bytes=0-9"},
                         EMPTY_SHA256, EXAMPLE_TIME)
    assert signature(get) == "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    assert "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date," in get["authorization"]

    put = signer.headers(
        AWS_EXAMPLE, "PUT", EXAMPLE_HOST, "/" + quote("test$file.text", safe="-_.~/"), "",
        {"Date": "Fri, 24 May 2013 00:00:00 GMT", "x-amz-storage-class": "REDUCED_REDUNDANCY"},
        hashlib.sha256(b"Welcome to Amazon S3.").hexdigest(), EXAMPLE_TIME)
    assert signature(put) == "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"

    listing = signer.headers(AWS_EXAMPLE, "GET", EXAMPLE_HOST, "/",
                             canonical_query([("prefix", "J"), ("max-keys", "2")]), {}, EMPTY_SHA256, EXAMPLE_TIME)
    assert signature(listing) == "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"


@pytest.mark.parametrize("token", [None, "FQoGZXIvYXdzEJr//////////wEaDOSESSIONTOKEN+/="])
@pytest.mark.parametrize(("method", "key", "query", "headers"), [
    ("GET", "fleet/t-1.db/0000/0000000000000001-0000000000000001.ltx", [], {"range": "bytes=8-100"}),
    ("GET", None, [("list-type", "2"), ("prefix", "fleet/a b+c/"), ("encoding-type", "url"),
                   ("continuation-token", "1/x+y==")], {}),
    ("PUT", "fleet/t.db/lock.json", [], {"if-none-match": "*", "x-amz-meta-litestream-timestamp": "2026-12-06T01:02:03.4Z"}),
    ("POST", None, [("delete", "")], {"content-md5": "1B2M2Y8AsgTpgAmY7PhCfg==", "content-type": "application/xml"}),
    ("HEAD", "odd/~name_(1)!*'.db/lock.json", [], {}),
])
def test_same_signature_as_botocore(token, method, key, query, headers):
    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    host = "127.0.0.1:9000"
    path = "/bucket" + ("/" + quote(key, safe="-_.~/") if key is not None else "")
    body = b"<Delete/>" if method in ("PUT", "POST") else b""
    digest = hashlib.sha256(body).hexdigest()
    now = datetime(2026, 12, 6, 4, 5, 6, tzinfo=timezone.utc)
    ours = Signer("eu-west-3").headers(creds, method, host, path, canonical_query(query), headers, digest, now)

    qs = canonical_query(query)
    request = AWSRequest(method, f"http://{host}{path}" + (f"?{qs}" if qs else ""), data=body,
                         headers={**headers, "X-Amz-Date": "20261206T040506Z", "X-Amz-Content-SHA256": digest})
    auth = S3SigV4Auth(BotoCredentials(creds.access_key, creds.secret_key, token), "s3", "eu-west-3")
    # add_auth's steps, with botocore's clock (read inside add_auth) pinned to ours.
    request.context["timestamp"] = "20261206T040506Z"
    auth._modify_request_before_signing(request)
    canonical = auth.canonical_request(request)
    expected = auth.signature(auth.string_to_sign(request, canonical), request)
    assert signature(ours) == expected
    assert f"SignedHeaders={auth.signed_headers(auth.headers_to_sign(request))}," in ours["authorization"]
    assert ours.get("x-amz-security-token") == request.headers.get("X-Amz-Security-Token")
