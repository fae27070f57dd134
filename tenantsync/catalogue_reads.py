"""The catalogue's queries: one tenant, many by state or host, and the tenants each
periodic plan has work for (lagging, failing, idle, recently synced).

Its own module because these are what the schedulers and the HTTP API ask, and none of
them writes. Mixed into ``Catalogue`` (``tenantsync.catalogue``), which provides ``fleet``,
``_mine`` (the condition that scopes a statement to the fleet's rows) and ``_tx``.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from .catalogue_schema import _BY_NAME, TENANTS, TenantRecord, TenantState, _chunks, _utc


# Never synced first (NULLS FIRST, which SQLite and PostgreSQL both take), then the
# oldest last sync: the tenant whose unshipped writes have waited longest.
_MOST_LAGGING_FIRST = (TENANTS.c.last_sync_at.asc().nulls_first(), TENANTS.c.name)


class CatalogueReads:
    """Reads of one fleet's tenants, each one short read transaction."""

    def get(self, name: str) -> TenantRecord | None:
        with self._tx(write=False) as s:
            row = s.execute(_BY_NAME, {"fleet": self.fleet, "name": name}).first()
            return TenantRecord(*row) if row is not None else None

    def _select(self, stmt: sa.Select) -> list[TenantRecord]:
        # Plain rows, not ORM objects: no per-object bookkeeping for thousands of tenants.
        with self._tx(write=False) as s:
            return [TenantRecord(*row) for row in s.execute(stmt)]

    def _names(self, stmt: sa.Select) -> list[str]:
        with self._tx(write=False) as s:
            return list(s.scalars(stmt))

    def positions(self, names: Iterable[str]) -> dict[str, dict[str, Any] | None]:
        """``{name: stored capture position}`` of those ``names`` in the catalogue, in one
        transaction: the watcher's rescan asks for the tenants whose main file changed."""
        names = sorted(set(names))
        with self._tx(write=False) as s:
            return {name: position for chunk in _chunks(names)
                    for name, position in s.execute(sa.select(TENANTS.c.name, TENANTS.c.position)
                                                    .where(self._mine, TENANTS.c.name.in_(chunk)))}

    def records(self, state: TenantState | None = None, host: str | None = None) -> list[TenantRecord]:
        """Tenants by name, optionally only those in ``state`` and/or on ``host``."""
        stmt = sa.select(*TENANTS.c).where(self._mine).order_by(TENANTS.c.name)
        if state is not None:
            stmt = stmt.where(TENANTS.c.state == TenantState(state))
        if host is not None:
            stmt = stmt.where(TENANTS.c.host == host)
        return self._select(stmt)

    def count_by_state(self) -> dict[str, int]:
        """``{state value: tenants}``, with every state present (0 when none)."""
        counts = {s.value: 0 for s in TenantState}
        with self._tx(write=False) as s:
            for state, n in s.execute(sa.select(TENANTS.c.state, sa.func.count()).where(self._mine)
                                      .group_by(TENANTS.c.state)):
                counts[TenantState(state).value] = n
        return counts

    def lagging(self, now: datetime, older_than: timedelta, host: str | None = None) -> list[TenantRecord]:
        """Tenants written since their last sync (or never synced) whose last write is
        more than ``older_than`` before ``now``: writes a watcher's event should have
        shipped by now. Most lagging first: never synced, then by oldest last sync (the
        writes since have waited longest), so after an outage the catch-up plan queues
        the tenants furthest behind before the others."""
        stmt = (
            sa.select(*TENANTS.c)
            .where(
                self._mine,
                TENANTS.c.last_write_at < _utc(now, "now") - older_than,
                sa.or_(TENANTS.c.last_sync_at.is_(None), TENANTS.c.last_write_at > TENANTS.c.last_sync_at),
            )
            .order_by(*_MOST_LAGGING_FIRST)
        )
        if host is not None:
            stmt = stmt.where(TENANTS.c.host == host)
        return self._select(stmt)

    def failing(self, before: datetime, host: str | None = None) -> list[str]:
        """Names of tenants in state error whose row has not changed since ``before``: a
        failed sync (a transient EMFILE, a locked file, a storage outage) is retried by the
        catch-up schedule then, instead of waiting for the tenant's next write, which may
        never come. Most lagging first, as :meth:`lagging`."""
        stmt = (sa.select(TENANTS.c.name)
                .where(self._mine, TENANTS.c.state == TenantState.error, TENANTS.c.updated_at < _utc(before, "before"))
                .order_by(*_MOST_LAGGING_FIRST))
        if host is not None:
            stmt = stmt.where(TENANTS.c.host == host)
        return self._names(stmt)

    def shipped_since(self, since: datetime) -> list[str]:
        """Names of tenants that shipped files at or after ``since``: the only ones a
        periodic compaction, snapshot or retention pass can have work for. Filtered in SQL
        by an index: a pass over an idle fleet reads no rows into Python."""
        return self._names(sa.select(TENANTS.c.name).where(self._mine, TENANTS.c.shipped_at >= _utc(since, "since"))
                           .order_by(TENANTS.c.name))
