"""The admission policy's marks in Redis, so every watcher and worker of a fleet sees them.

*Pending* is a per-tenant key set with ``SET NX``; a request that finds it sets the
tenant's *dirty* key instead. Each batch (one watcher tick, one sync message's end) is one
Lua script: one round trip, and atomic per tenant, so a request cannot fail its ``SET NX``
just before the job's finish clears the key and then leave its dirty mark for nobody (it
would wait for the catch-up check). Every key expires after PENDING_TTL, so a worker
killed mid-job cannot wedge a tenant; the catch-up check re-requests anything that lags,
admitting it again if its pending mark is older than ``stale_after`` (a sync held by a
worker that was killed, such as a retry waiting out its countdown, comes back only after
the broker's visibility timeout).
"""

from __future__ import annotations

import hashlib

import redis

from .routing import HOST_JOBS

PENDING_TTL = 300

# Per tenant (KEYS: pending, dirty, pending, dirty, ...): admit a sync, else mark it dirty
# (if ARGV[3] is 1). A pending key holds the server time it was set at; one older than
# ARGV[2] seconds (if above 0) is taken as orphaned and the sync admitted again.
_REQUEST = """
local now = tonumber(redis.call('TIME')[1])
local stale = tonumber(ARGV[2])
local admitted = {}
for i = 1, #KEYS, 2 do
  if redis.call('SET', KEYS[i], now, 'NX', 'EX', ARGV[1]) then
    admitted[#admitted + 1] = 1
  elseif stale > 0 and now - (tonumber(redis.call('GET', KEYS[i])) or 0) >= stale then
    redis.call('SET', KEYS[i], now, 'EX', ARGV[1])
    admitted[#admitted + 1] = 1
  else
    if ARGV[3] == '1' then
      redis.call('SET', KEYS[i + 1], 1, 'EX', ARGV[1])
    end
    admitted[#admitted + 1] = 0
  end
end
return admitted
"""
# Per tenant (KEYS: pending, dirty, ...): the sync ended; clear pending and say whether a
# write came in meanwhile.
_FINISH = """
local dirty = {}
for i = 1, #KEYS, 2 do
  redis.call('DEL', KEYS[i])
  dirty[#dirty + 1] = redis.call('GETDEL', KEYS[i + 1]) and 1 or 0
end
return dirty
"""
# Per tenant (KEYS: once-keys): admit a maintenance job unless one is queued or running.
_CLAIM = """
local admitted = {}
for i = 1, #KEYS do
  admitted[i] = redis.call('SET', KEYS[i], 1, 'NX', 'EX', ARGV[1]) and 1 or 0
end
return admitted
"""


def sync_keys(name: str, scope: str = "") -> tuple[str, str]:
    """The tenant's *pending* and *dirty* keys (``scope``: see :class:`RedisStore`)."""
    return f"tenantsync:sync:pending:{scope}{name}", f"tenantsync:sync:dirty:{scope}{name}"


def once_key(keyed: str, name: str, scope: str = "") -> str:
    return f"tenantsync:{keyed}:pending:{scope}{name}"


class RedisStore:
    """An :class:`~scheduler.admission.AdmissionStore` in Redis: one round trip per batch.

    A tenant's keys name its fleet (a short hash of the replica root: fleets may share a
    Redis, and tenant names) and, for jobs on a host's own files (syncs, archival, ...), the
    host: two hosts may each hold a file of one name (after a failover, the old host's copy,
    which its sync fences), and one host's pending sync must not swallow the other's.
    Storage jobs (compaction, snapshots, retention) are the fleet's, whichever host asks."""

    def __init__(self, client: redis.Redis, fleet: str = "", host: str = ""):
        self.redis = client
        tag = hashlib.sha1(fleet.encode()).hexdigest()[:10] if fleet else ""
        self.fleet_scope = f"{tag}/" if fleet else ""
        self.host_scope = f"{self.fleet_scope}{host}/" if fleet or host else ""
        self._request = client.register_script(_REQUEST)
        self._finish = client.register_script(_FINISH)
        self._claim = client.register_script(_CLAIM)

    def sync_keys(self, name: str) -> tuple[str, str]:
        return sync_keys(name, self.host_scope)

    def request(self, names: list[str], stale_after: float | None = None, dirty: bool = True) -> list[bool]:
        args = [PENDING_TTL, int(stale_after or 0), 1 if dirty else 0]
        return [bool(ok) for ok in self._request(keys=self._sync_keys(names), args=args)]

    def finish(self, names: list[str]) -> list[bool]:
        return [bool(dirty) for dirty in self._finish(keys=self._sync_keys(names))]

    def take_dirty(self, name: str) -> bool:
        return bool(self.redis.getdel(self.sync_keys(name)[1]))

    def claim(self, keyed: str, names: list[str]) -> list[bool]:
        return [bool(ok) for ok in self._claim(keys=self._once_keys(keyed, names), args=[PENDING_TTL])]

    def release(self, keyed: str, names: list[str]) -> None:
        if names:
            self.redis.delete(*self._once_keys(keyed, names))

    def _once_keys(self, keyed: str, names: list[str]) -> list[str]:
        scope = self.host_scope if f"tenantsync.{keyed.split(':', 1)[0]}" in HOST_JOBS else self.fleet_scope
        return [once_key(keyed, name, scope) for name in names]

    def _sync_keys(self, names: list[str]) -> list[str]:
        return [key for name in names for key in self.sync_keys(name)]
