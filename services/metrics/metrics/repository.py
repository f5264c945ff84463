"""All SQL of the metrics service."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

from asyncpg import Record
from sqlalchemy import delete, func, select, text
from sqlalchemy.dialects.postgresql import insert

from metrics.exporter import Headline
from metrics.models import (
    LIST_SORTS,
    SEGMENT_COLUMNS,
    CustomerSegment,
    DailyPurchases,
    OutboxMessage,
    TenantConfig,
    outbox_quarantine,
)
from shared.db import AsyncSession, SessionT
from shared.outbox import Unpublishable, insert_quarantined
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


# --- segments -----------------------------------------------------------------------------------------

# What the classification reads of each customer with a purchase: its summary, the median gap between its
# orders and how many carried a discount (from its orders), and its latest CLV prediction.
_FACTS = """
select c.customer_id, c.first_purchase_at, c.last_purchase_at, c.orders, c.net_revenue, c.last_nps,
       c.last_nps_at, c.last_review_at, c.last_referral_at, g.median_gap_s, g.priced, g.discounted,
       p.p_alive, p.clv_12m
from metrics.customers c
cross join lateral (
  select percentile_cont(0.5) within group (order by gap) as median_gap_s,
         count(discount_share) as priced, count(*) filter (where discount_share > 0) as discounted
  from (select o.discount_share,
               extract(epoch from o.ordered_at - lag(o.ordered_at) over (order by o.ordered_at)) as gap
        from metrics.orders o where o.tenant_id = c.tenant_id and o.customer_id = c.customer_id) x
) g
left join metrics.clv_predictions p on p.tenant_id = c.tenant_id and p.customer_id = c.customer_id
where c.tenant_id = $1 and c.customer_id = any($2::text[]) and c.first_purchase_at is not null
"""

_SAVE_SEGMENTS = f"""
insert into metrics.customer_segments as s ({", ".join(SEGMENT_COLUMNS)})
select * from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::timestamptz[],
                     $7::int[], $8::numeric[], $9::timestamptz[], $10::numeric[], $11::float8[])
order by 1, 2
on conflict (tenant_id, customer_id) do update set
{", ".join(f"{c} = excluded.{c}" for c in SEGMENT_COLUMNS[2:])}
"""


class SegmentRepository(RepositoryBase[SessionT]):
    async def tenants(self) -> list[str]:
        rows = await (await self.driver()).fetch("select distinct tenant_id from metrics.customers order by 1")
        return [r["tenant_id"] for r in rows]

    async def customer_page(self, tenant_id: str, *, after: str, limit: int) -> list[str]:
        """One page of the tenant's customers with a purchase, in id order."""
        rows = await (await self.driver()).fetch(
            """select customer_id from metrics.customers where tenant_id = $1 and customer_id > $2
               and first_purchase_at is not null order by customer_id limit $3""",
            tenant_id,
            after,
            limit,
        )
        return [r["customer_id"] for r in rows]

    async def facts(self, tenant_id: str, customer_ids: Sequence[str]) -> list[Record]:
        return list(await (await self.driver()).fetch(_FACTS, tenant_id, list(customer_ids)))

    async def lock_current(
        self: SegmentRepository[AsyncSession], tenant_id: str, customer_ids: Sequence[str]
    ) -> dict[str, tuple[str, datetime]]:
        """The stored segments (and since when) of these customers, locked until the transaction ends."""
        rows = await (await self.driver()).fetch(
            """select customer_id, segment, since from metrics.customer_segments
               where tenant_id = $1 and customer_id = any($2::text[]) order by customer_id for update""",
            tenant_id,
            list(customer_ids),
        )
        return {r["customer_id"]: (r["segment"], r["since"]) for r in rows}

    async def save(self: SegmentRepository[AsyncSession], rows: Sequence[Sequence[Any]]) -> None:
        """Upserts rows given in SEGMENT_COLUMNS order."""
        if rows:
            await (await self.driver()).execute(_SAVE_SEGMENTS, *(list(c) for c in zip(*rows, strict=True)))

    async def counts(self, tenant_id: str) -> dict[str, int]:
        rows = await (await self.driver()).fetch(
            "select segment, count(*) as n from metrics.customer_segments where tenant_id = $1 group by segment",
            tenant_id,
        )
        return {r["segment"]: r["n"] for r in rows}

    async def get(self, tenant_id: str, customer_id: str) -> CustomerSegment | None:
        return await self.session.get(CustomerSegment, (tenant_id, customer_id))

    async def page(
        self, tenant_id: str, *, sort: str, segment: str | None, after: Sequence[Any] | None, limit: int
    ) -> list[Record]:
        """One page of the customer list in the order LIST_SORTS names, after the key `after` (keyset)."""
        keys, descending = LIST_SORTS[sort]
        args: list[Any] = [tenant_id]
        where = ["tenant_id = $1"]
        if segment is not None:
            args.append(segment)
            where.append(f"segment = ${len(args)}")
        if after is not None:
            marks = []
            for value, cast in zip(after, key_types(sort), strict=True):
                args.append(value)
                marks.append(f"${len(args)}::{cast}")
            where.append(f"({', '.join(keys)}) {'<' if descending else '>'} ({', '.join(marks)})")
        direction = " desc" if descending else ""
        args.append(limit)
        sql = (
            f"select {', '.join(SEGMENT_COLUMNS[1:])}, {', '.join(f'{k} as k{i}' for i, k in enumerate(keys))} "
            f"from metrics.customer_segments where {' and '.join(where)} "
            f"order by {', '.join(k + direction for k in keys)} limit ${len(args)}"
        )
        return list(await (await self.driver()).fetch(sql, *args))

    async def summary(self, tenant_id: str, customer_id: str) -> Record | None:
        """A customer's summary and latest CLV prediction, or None when metrics never saw the customer."""
        return await (await self.driver()).fetchrow(
            """select c.*, to_jsonb(p) - 'tenant_id' - 'customer_id' as prediction, t.reporting_currency
               from metrics.customers c
               left join metrics.clv_predictions p on p.tenant_id = c.tenant_id and p.customer_id = c.customer_id
               left join metrics.tenant_config t on t.tenant_id = c.tenant_id
               where c.tenant_id = $1 and c.customer_id = $2""",
            tenant_id,
            customer_id,
        )


# The SQL type of each list key (a cursor's values are cast to them).
_KEY_TYPES = {
    "(clv_12m is not null)": "boolean",
    "coalesce(clv_12m, 0)": "numeric",
    "net_revenue": "numeric",
    "(p_alive is null)": "boolean",
    "coalesce(p_alive, 0)": "float8",
    "last_purchase_at": "timestamptz",
    "customer_id": "text",
}


def key_types(sort: str) -> list[str]:
    return [_KEY_TYPES[k] for k in LIST_SORTS[sort][0]]


class OutboxRepository(RepositoryBase[SessionT]):
    async def add(self: OutboxRepository[AsyncSession], rows: Sequence[tuple[str, bytes, bytes]]) -> None:
        if rows:
            await self.session.execute(insert(OutboxMessage), [{"topic": t, "key": k, "value": v} for t, k, v in rows])

    async def claim(self: OutboxRepository[AsyncSession], limit: int, namespace: str) -> Sequence[OutboxMessage]:
        # SKIP LOCKED: replicas relay different rows; a relay takes only its deployment's topics.
        stmt = (
            select(OutboxMessage)
            .where(OutboxMessage.topic.startswith(namespace))
            .order_by(OutboxMessage.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return await self.get_all(stmt)

    async def delete(self: OutboxRepository[AsyncSession], ids: Sequence[int]) -> None:
        if ids:
            await self.session.execute(delete(OutboxMessage).where(OutboxMessage.id.in_(ids)))

    async def quarantine(self: OutboxRepository[AsyncSession], rows: Sequence[Unpublishable]) -> None:
        await insert_quarantined(self.session, outbox_quarantine, rows)

    async def oldest(self, namespace: str) -> datetime | None:
        stmt = (
            select(OutboxMessage.created_at)
            .where(OutboxMessage.topic.startswith(namespace))
            .order_by(OutboxMessage.id)
            .limit(1)
        )
        return (await self.session.execute(stmt)).scalar_one_or_none()


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
_SEGMENT_COUNTS = text(
    "select segment, count(*) as customers from metrics.customer_segments where tenant_id = :tenant group by segment"
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
        rows = await self.session.execute(_SEGMENT_COUNTS, {"tenant": tenant_id})
        return Headline(**figures, segments={r.segment: r.customers for r in rows})
