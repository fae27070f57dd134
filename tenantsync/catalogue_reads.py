"""The catalogue's queries: one tenant, many by state or host, and the tenants each
periodic plan has work for (lagging, failing, idle, recently synced).

Its own module because these are what the schedulers and the HTTP API ask, and none of
them writes. Mixed into ``Catalogue`` (``tenantsync.catalogue``), which provides ``fleet``,
``_mine`` (the condition that scopes a statement to the fleet's rows) and ``_tx``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from .catalogue_schema import _BY_NAME, TENANTS, TenantRecord, TenantState, _chunks, _utc, lag_seconds


# Never synced first (NULLS FIRST, which SQLite and PostgreSQL both take), then the
# oldest last sync: the tenant whose unshipped writes have waited longest.
_MOST_LAGGING_FIRST = (TENANTS.c.last_sync_at.asc().nulls_first(), TENANTS.c.name)


@dataclass(frozen=True)
class FleetView:
    """The fleet at a glance, as of one read: tenants by state, the lag in seconds of each
    tenant with writes not in its replica (``pending_since``), and WAL bytes."""

    states: dict[str, int]
    lags: dict[str, float]
    wal_total: int
    wal_largest: int

    @property
    def tenants(self) -> int:
        return sum(self.states.values())

    def lag_percentile(self, p: float) -> float:
        """The lag below which ``p`` % of the tenants are (those with nothing pending lag 0)."""
        if not self.tenants:
            return 0.0
        rank = math.ceil(p / 100 * self.tenants)  # 1-based, in ascending order
        current = self.tenants - len(self.lags)
        if rank <= current:
            return 0.0
        return sorted(self.lags.values())[min(len(self.lags), rank - current) - 1]

    def summary(self, worst: int = 10) -> dict:
        """The fleet in one JSON object: the status page's cards and ``tenantsync status``."""
        return {"tenants": self.tenants, "states": self.states,
                "lag_seconds": {"p50": self.lag_percentile(50), "p99": self.lag_percentile(99),
                                "max": max(self.lags.values(), default=0.0)},
                "wal_bytes": {"total": self.wal_total, "largest": self.wal_largest},
                "most_lagging": [{"name": n, "lag_seconds": round(v, 3)} for n, v in self.worst(worst)]}

    def worst(self, n: int, above: float = 0.0) -> list[tuple[str, float]]:
        """The ``n`` most lagging tenants whose lag is above ``above``, most lagging first."""
        return sorted(((k, v) for k, v in self.lags.items() if v > above), key=lambda kv: -kv[1])[:n]


#: The status page's sortable columns.
PAGE_SORTS = {"name": TENANTS.c.name, "state": TENANTS.c.state, "txid": TENANTS.c.txid,
              "last_write_at": TENANTS.c.last_write_at, "last_sync_at": TENANTS.c.last_sync_at,
              "wal_bytes": TENANTS.c.wal_bytes, "bytes_stored": TENANTS.c.bytes_stored,
              "lag": TENANTS.c.pending_since}


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

    def fleet_view(self, now: datetime) -> FleetView:
        """One read for the metrics, /readyz and the status page; its cost grows with the
        tenants that have writes pending, not with the fleet (the others are counted)."""
        c = TENANTS.c
        now = _utc(now, "now")
        states = {s.value: 0 for s in TenantState}
        with self._tx(write=False) as s:
            for state, n in s.execute(sa.select(c.state, sa.func.count()).where(self._mine).group_by(c.state)):
                states[TenantState(state).value] = n
            pending = s.execute(sa.select(c.name, c.pending_since).where(self._mine, c.pending_since.is_not(None)))
            lags = {name: lag_seconds(since, now) for name, since in pending}
            total, largest = s.execute(sa.select(sa.func.sum(c.wal_bytes), sa.func.max(c.wal_bytes))
                                       .where(self._mine)).one()
        return FleetView(states, lags, int(total or 0), int(largest or 0))

    def page(self, search: str, sort: str, descending: bool, offset: int, limit: int
             ) -> tuple[int, list[TenantRecord]]:
        """(tenants whose name contains ``search``, the ``limit`` of them from ``offset`` in
        ``sort`` order): the status page's table, paged in SQL so 10,000 tenants cost what
        one page does. ``sort`` is a key of ``PAGE_SORTS`` ("lag": oldest pending first)."""
        c = TENANTS.c
        where = [self._mine]
        if search:
            escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            where.append(c.name.like(f"%{escaped}%", escape="\\"))
        column = PAGE_SORTS[sort]
        order = column.desc() if descending else column.asc()
        if sort == "lag":  # most lagging = oldest pending_since; none pending last
            order = (column.asc() if descending else column.desc()).nulls_last()
        with self._tx(write=False) as s:
            total = s.execute(sa.select(sa.func.count()).select_from(TENANTS).where(*where)).scalar_one()
            rows = s.execute(sa.select(*TENANTS.c).where(*where).order_by(order, c.name).offset(offset).limit(limit))
            return total, [TenantRecord(*row) for row in rows]

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
