"""All SQL of the metrics service."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert

from metrics.exporter import Headline
from metrics.models import DailyPurchases, TenantConfig
from shared.db import AsyncSession, SessionT
from shared.repository import RepositoryBase


class DailyPurchasesRepository(RepositoryBase[SessionT]):
    async def add(
        self: DailyPurchasesRepository[AsyncSession],
        tenant_id: str,
        day: date,
        currency: str,
        orders: int,
        net_revenue: Decimal,
    ) -> None:
        table = DailyPurchases
        stmt = insert(table).values(
            tenant_id=tenant_id, day=day, currency=currency, orders=orders, net_revenue=net_revenue
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[table.tenant_id, table.day, table.currency],
            set_={"orders": table.orders + orders, "net_revenue": table.net_revenue + net_revenue},
        )
        await self.session.execute(stmt)

    async def between(self, tenant_id: str, start: date, end: date) -> Sequence[DailyPurchases]:
        stmt = (
            select(DailyPurchases)
            .where(DailyPurchases.tenant_id == tenant_id, DailyPurchases.day >= start, DailyPurchases.day <= end)
            .order_by(DailyPurchases.day, DailyPurchases.currency)
        )
        return await self.get_all(stmt)


class ConfigRepository(RepositoryBase[SessionT]):
    async def get(self, tenant_id: str) -> TenantConfig | None:
        return await self.session.get(TenantConfig, tenant_id)

    async def get_many(self, tenant_ids: Sequence[str]) -> Sequence[TenantConfig]:
        return await self.get_all(select(TenantConfig).where(TenantConfig.tenant_id.in_(tenant_ids)))

    async def put(self: ConfigRepository[AsyncSession], tenant_id: str, values: dict[str, Any]) -> TenantConfig:
        upsert = insert(TenantConfig).values(tenant_id=tenant_id, **values, updated_at=func.now())
        stmt = (
            upsert.on_conflict_do_update(
                index_elements=[TenantConfig.tenant_id], set_={**values, "updated_at": func.now()}
            )
            .returning(TenantConfig)
            .execution_options(populate_existing=True)
        )
        row: TenantConfig = (await self.session.execute(stmt)).scalar_one()
        return row


# The headline KPIs of one tenant for the Prometheus gauges (metrics/exporter.py): the current period to date
# from the daily counters, liability from all of them (deltas summed from the beginning), lifetime repeat
# buyers from the customers, NPS over the latest answer per customer in the period. Sums of points are cast
# back to bigint (points are 64-bit integers everywhere): a sum beyond that fails the tenant's refresh.
_HEADLINE = text(
    """
    select
      coalesce(sum(active_delta) filter (where day < :start), 0) as customers_start,
      coalesce(sum(active_delta) filter (where day <= :today), 0) as active_customers,
      coalesce(sum(new_customers) filter (where day >= :start and day <= :today), 0) as new_customers,
      coalesce(sum(orders) filter (where day >= :start and day <= :today), 0) as orders,
      coalesce(sum(amount - refunded) filter (where day >= :start and day <= :today), 0) as net_revenue,
      coalesce(sum(points_issued) filter (where day >= :start and day <= :today), 0)::bigint as points_issued,
      coalesce(sum(points_redeemed) filter (where day >= :start and day <= :today), 0)::bigint as points_redeemed,
      coalesce(sum(points_expired) filter (where day >= :start and day <= :today), 0)::bigint as points_expired,
      coalesce(sum(points_clawed_back) filter (where day >= :start and day <= :today), 0)::bigint as points_clawed_back,
      coalesce(sum(available_delta), 0)::bigint as points_available,
      coalesce(sum(pending_delta), 0)::bigint as points_pending,
      (select count(*) from metrics.customers c where c.tenant_id = :tenant and c.orders >= 1) as buyers,
      (select count(*) from metrics.customers c where c.tenant_id = :tenant and c.orders >= 2) as repeat_buyers,
      (select reporting_currency from metrics.tenant_config t where t.tenant_id = :tenant) as currency,
      (select point_value from metrics.tenant_config t where t.tenant_id = :tenant) as point_value
    from metrics.daily where tenant_id = :tenant
    """
)
_NPS = text(
    """
    select count(*) as responses,
           count(*) filter (where nps >= 9) as promoters,
           count(*) filter (where nps <= 6) as detractors
    from (
      select distinct on (customer_id) nps from metrics.engagements
      where tenant_id = :tenant and kind = 'survey' and nps is not null
        and occurred_at >= :start_at and occurred_at < :end_at
      order by customer_id, occurred_at desc, business_id desc
    ) latest
    """
)
# Tenants with business on or before today, the pinned ones first, then the most recently active; `total`
# counts them all (what is not exported is dropped and counted).
_GAUGE_TENANTS = text(
    """
    select tenant_id, count(*) over () as total
    from metrics.daily
    where day <= :today and (orders > 0 or points_issued > 0 or points_redeemed > 0)
    group by tenant_id
    order by tenant_id = any(:pinned) desc, max(day) desc, tenant_id
    limit :limit
    """
)


class HeadlineRepository(RepositoryBase[SessionT]):
    async def gauge_tenants(self, *, today: date, pinned: Sequence[str], limit: int) -> tuple[list[str], int]:
        """Up to `limit` tenants to export, and how many have business at all."""
        params = {"today": today, "pinned": list(pinned), "limit": limit}
        found = (await self.session.execute(_GAUGE_TENANTS, params)).all()
        return [r.tenant_id for r in found], (found[0].total if found else 0)

    async def headline(self, tenant_id: str, *, start: date, end: date, today: date, timeout_ms: int) -> Headline:
        """The figures of the period [start, end) up to `today`."""
        # Bounds this tenant's work in the refresh (the transaction's own setting, gone at its end).
        await self.session.execute(text(f"set local statement_timeout = {int(timeout_ms)}"))
        params = {"tenant": tenant_id, "start": start, "today": today}
        figures = dict((await self.session.execute(_HEADLINE, params)).mappings().one())
        bounds = {
            "tenant": tenant_id,
            "start_at": datetime.combine(start, time(), UTC),
            "end_at": datetime.combine(end, time(), UTC),
        }
        figures.update((await self.session.execute(_NPS, bounds)).mappings().one())
        return Headline(**figures)
