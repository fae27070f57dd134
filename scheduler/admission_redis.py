"""The admission policy's marks in Redis, so every watcher and worker of a fleet sees them.

*Pending* is a per-tenant key set with ``SET NX``; a request that finds it sets the
tenant's *dirty* key instead. Each batch (one watcher tick, one sync message's end) is one
Lua script: one round trip, and atomic per tenant, so a request cannot fail its ``SET NX``
just before the job's finish clears the key and then leave its dirty mark for nobody (it
would wait for the catch-up check). Every key expires after PENDING_TTL, so a worker
killed mid-job cannot wedge a tenant; the catch-up check re-requests anything that lags.
"""

from __future__ import annotations

import redis

PENDING_TTL = 300

# Per tenant (KEYS: pending, dirty, pending, dirty, ...): admit a sync, else mark it dirty.
_REQUEST = """
local admitted = {}
for i = 1, #KEYS, 2 do
  if redis.call('SET', KEYS[i], 1, 'NX', 'EX', ARGV[1]) then
    admitted[#admitted + 1] = 1
  else
    redis.call('SET', KEYS[i + 1], 1, 'EX', ARGV[1])
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


def sync_keys(name: str) -> tuple[str, str]:
    """The tenant's *pending* and *dirty* keys."""
    return f"tenantsync:sync:pending:{name}", f"tenantsync:sync:dirty:{name}"


def once_key(keyed: str, name: str) -> str:
    return f"tenantsync:{keyed}:pending:{name}"


class RedisStore:
    """An :class:`~scheduler.admission.AdmissionStore` in Redis: one round trip per batch."""

    def __init__(self, client: redis.Redis):
        self.redis = client
        self._request = client.register_script(_REQUEST)
        self._finish = client.register_script(_FINISH)
        self._claim = client.register_script(_CLAIM)

    def request(self, names: list[str]) -> list[bool]:
        return [bool(ok) for ok in self._request(keys=_sync_keys(names), args=[PENDING_TTL])]

    def finish(self, names: list[str]) -> list[bool]:
        return [bool(dirty) for dirty in self._finish(keys=_sync_keys(names))]

    def take_dirty(self, name: str) -> bool:
        return bool(self.redis.getdel(sync_keys(name)[1]))

    def claim(self, keyed: str, names: list[str]) -> list[bool]:
        return [bool(ok) for ok in self._claim(keys=[once_key(keyed, name) for name in names], args=[PENDING_TTL])]

    def release(self, keyed: str, names: list[str]) -> None:
        if names:
            self.redis.delete(*(once_key(keyed, name) for name in names))


def _sync_keys(names: list[str]) -> list[str]:
    return [key for name in names for key in sync_keys(name)]
