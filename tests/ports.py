"""Loopback ports for the servers the tests and benchmarks start (moto, SeaweedFS, Redis,
PostgreSQL)."""

from __future__ import annotations

import socket


def free_loopback_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
