"""Shared fixtures. Keep them generic: one section per concern, test-specific fixtures
belong in the test module that uses them."""

from __future__ import annotations

import logging
import socket
import uuid

import pytest

# -- object storage ----------------------------------------------------------------


@pytest.fixture(scope="session")
def aws_env():
    """Fake AWS credentials for the whole session, isolated from the developer's own
    AWS configuration (profiles, endpoint overrides, config files)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ACCESS_KEY_ID", "test")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "test")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    mp.setenv("AWS_CONFIG_FILE", "/dev/null")
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CA_BUNDLE"):
        mp.delenv(name, raising=False)
    yield
    mp.undo()


@pytest.fixture(scope="session")
def s3_server(aws_env):
    """A moto S3 server on a free loopback port for the session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # it logs every request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def s3_client(s3_server):
    """A raw boto3 client for the test server, to set up or inspect what the code under test cannot."""
    import boto3

    return boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")


@pytest.fixture
def s3_url(s3_server, s3_client):
    """URL of a replica root in a fresh, empty bucket."""
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=bucket)
    return f"s3://{bucket}/replica?endpoint={s3_server}&region=us-east-1&forcePathStyle=true"


@pytest.fixture
def file_url(tmp_path):
    """URL of a replica root in a fresh directory (which does not exist yet)."""
    return (tmp_path / "replica").as_uri()


@pytest.fixture(params=["file", "s3"])
def storage_url(request):
    """The URL of a fresh replica root, once per backend."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def storage(storage_url):
    """A fresh, empty Storage, once per backend."""
    from tenantsync.storage import open_storage

    return open_storage(storage_url)
