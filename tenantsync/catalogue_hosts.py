"""Hosts: when each host of a fleet last said it was alive, and the tenants of the dead.

In a catalogue several hosts share, a host that is gone leaves its tenants' rows naming it.
Its leases lapse, but so do an idle tenant's on a live host: a lapsed lease does not say
the host is dead. So every host's watcher writes ``seen_at`` here every few seconds
(``heartbeat``), and a host configured for automatic failover (``failover-after``) hydrates
the active tenants of hosts not seen for that long (``orphaned``), each tenant by one of the
live hosts (``Schedule`` shares them out). A host never seen here is never taken for dead.
Mixed into ``Catalogue`` (``tenantsync.catalogue``), which provides ``_tx``,
``_dialect_insert``, ``_select`` and ``_mine``.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa

from .catalogue_schema import METADATA, TENANTS, TenantRecord, TenantState, UTCDateTime, _utc

HOSTS = sa.Table(
    "hosts",
    METADATA,
    sa.Column("fleet", sa.String(1024), primary_key=True, server_default=""),
    sa.Column("host", sa.String(255), primary_key=True),
    sa.Column("seen_at", UTCDateTime, nullable=False),
)


class Hosts:
    """The hosts of one fleet and when each was last seen."""

    def heartbeat(self, host: str, at: datetime) -> None:
        """``host`` is alive at ``at`` (one upsert)."""
        row = {"fleet": self.fleet, "host": host, "seen_at": _utc(at, "at")}
        stmt = self._dialect_insert(HOSTS).values(row)
        stmt = stmt.on_conflict_do_update(index_elements=[HOSTS.c.fleet, HOSTS.c.host], set_={"seen_at": stmt.excluded.seen_at})
        with self._tx(write=True) as s:
            s.execute(stmt)

    def hosts_seen(self) -> dict[str, datetime]:
        """Every host of the fleet that ever said it was alive, with when it last did."""
        with self._tx(write=False) as s:
            rows = s.execute(sa.select(HOSTS.c.host, HOSTS.c.seen_at).where(HOSTS.c.fleet == self.fleet))
            return {host: seen for host, seen in rows}

    def orphaned(self, dead: list[str]) -> list[TenantRecord]:
        """The active tenants of the ``dead`` hosts: those worth hydrating elsewhere at once
        (an idle or archived one waits for a hydration on demand)."""
        if not dead:
            return []
        c = TENANTS.c
        return self._select(sa.select(*TENANTS.c).where(self._mine, c.host.in_(dead), c.state == TenantState.active)
                            .order_by(c.name))
