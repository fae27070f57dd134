"""How patient object storage requests are: timeouts, retries, requests in flight.

The defaults are written here once; ``config.py`` reads the ``storage:`` section of
tenantsync.yml into this, and only the S3 backend uses it (a file system neither times
out nor throttles). Kept free of boto3 so that reading a config does not load it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StorageOptions:
    """Seconds are floats; a rate is bytes per second."""

    # Opening a TCP (and TLS) connection: a store that does not accept in 2 s is away, and
    # the request is retried on another connection sooner than waiting longer on this one.
    connect_timeout: float = 2.0
    # Longest wait for any socket operation of a request: the answer of a small request, or
    # the next bytes of a body. S3 answers a small request within a few hundred ms even when
    # busy, so 4 s of silence means a held connection (a partition), not a slow server.
    read_timeout: float = 4.0
    # A transfer may take connect + read timeout + its size at this rate before it is cut and
    # retried: a trickle that never leaves a socket silent for read_timeout still ends.
    min_transfer_rate: int = 1_000_000
    # Requests in flight to one endpoint host from this process (and the HTTP connections
    # kept to it): 10,000 tenants catching up after an outage queue here, not at the store.
    max_in_flight: int = 64
    # Tries of one request when the store fails or cannot be reached (timeouts, resets, 5xx).
    attempts: int = 3
    # Tries when the store says it is overloaded (503 SlowDown, 429): it is there, and
    # backing off is exactly what it asks for, so it gets more of them.
    throttled_attempts: int = 20
    # Most time one operation spends on its tries, backoff included: the caller (a sync
    # pass, a restore) then gets StorageUnavailable and decides itself when to try again.
    retry_time: float = 30.0
