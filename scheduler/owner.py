"""One owner per open tenant, and one way for any entry point to reach it.

A tenant's open capture (descriptors, read mark, lease) lives in exactly one process: the
one of its shard (``tenants.shard``, the same stable hash everywhere). In embedded mode
that is this process (shard 0) or a ``JobProcess`` child (:class:`ShardRoute`); in fleet
mode, the worker of its host queue (``queue.HostQueueRoute``). A job on a tenant's local
files runs there: an archival elsewhere would find the owner's handles and refuse ("open by
pid N"), and a hydration elsewhere would race the owner's syncs, which its tenant lock keeps
out. A *route* runs ``job`` for a tenant in its owner and returns the result, errors with
their type; :class:`OnDemandVia` gives the HTTP API ``OnDemand``'s interface over one. The
API is served on the fleet's control socket too (tenantsync/control.py), so the CLI and
``Client(config)`` of another process reach the owner the same way.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from tenantsync.tenants import shard

from .job_process import JobProcess


class Route(Protocol):
    def __call__(self, job: str, name: str, **kwargs: Any) -> Any:
        """Run ``job`` for tenant ``name`` in its owner's process and return its result."""


class OnDemandVia:
    """``OnDemand``'s interface for the HTTP API (``hydrate``, ``archive``, ``catalogue``),
    each call run by the tenant's owner: the process that holds it open and syncs it, so a
    hydration or archival never races that process's capture."""

    def __init__(self, catalogue, route: Route):
        self.catalogue = catalogue
        self.route = route

    def hydrate(self, name: str, *, txid: int | None = None, timestamp=None, source: str | None = None):
        """Hydrate ``name``, or with ``source`` fork it from that tenant's replica: either way
        the new local file is ``name``'s, so its owner makes it."""
        return self.route("hydrate", name, txid=txid, timestamp=timestamp, source=source)

    def archive(self, name: str):
        return self.route("archive", name)


class ShardRoute:
    """The embedded mode's owners: ``local[job]`` here for shard 0, else the shard's child
    process (``JobProcess.run``: its exception is raised here with its type)."""

    def __init__(self, local: dict[str, Callable[..., Any]], shards: list[JobProcess]):
        self.local = local
        self.shards = shards

    def __call__(self, job: str, name: str, **kwargs: Any) -> Any:
        i = shard(name, len(self.shards) + 1)
        return self.local[job](name, **kwargs) if i == 0 else self.shards[i - 1].run(job, name, **kwargs)
