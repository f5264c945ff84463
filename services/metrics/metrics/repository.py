"""All SQL of the metrics service. The consumers' batch statements go straight to the driver with array
parameters (one statement per table and batch); every multi-row write takes its rows sorted by key, so two
batches touching common rows lock them in one order and wait rather than deadlock (customers before daily
before period_cells, in every handler)."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Literal

from asyncpg import Record
from sqlalchemy import delete, func, select, text
from sqlalchemy.dialects.postgresql import insert

from metrics import kpis
from metrics.models import (
    LIST_SORTS,
    SEGMENT_COLUMNS,
    ClvFit,
    ClvPrediction,
    CustomerSegment,
    Order,
    OutboxMessage,
    TenantConfig,
    outbox_quarantine,
)
from metrics.redemptions import COUNTERS, Change, OrderFacts
from shared.db import AsyncSession, SessionT
from shared.outbox import Unpublishable, insert_quarantined
from shared.repository import RepositoryBase

# The additive columns of metrics.daily, in the order `add_daily` takes them.
DAILY_COLUMNS: tuple[str, ...] = (
    "orders",
    "amount",
    "refunded",
    "buyers",
    "new_customers",
    "active_delta",
    "points_issued",
    "points_redeemed",
    "points_expired",
    "points_clawed_back",
    "available_delta",
    "pending_delta",
    "held_delta",
)
# What `forget` deletes of a tenant: everything the topics rebuild.
TENANT_TABLES = (
    "orders",
    "refunds",
    "customers",
    "customer_days",
    "member_days",
    "daily",
    "period_cells",
    "period_active",
    "period_members",
    "engagements",
    "survey_periods",
    "period_surveys",
    "redemption_orders",
    "redemption_changes",
    "redemptions_daily",
    "redemption_values_daily",
)
# The per-period counts: table -> its count column.
PeriodTable = Literal["period_members", "period_active"]
PERIOD_TABLES: dict[str, str] = {"period_members": "members", "period_active": "customers"}
_DAILY_TYPES = {"amount": "numeric", "refunded": "numeric"}


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    return [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]


class ConfigRepository(RepositoryBase[SessionT]):
    async def get(self, tenant_id: str) -> TenantConfig | None:
        return await self.session.get(TenantConfig, tenant_id)

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

    async def currencies(self, tenant_ids: Sequence[str]) -> dict[str, tuple[int, str | None, dict[str, str]]]:
        """Per tenant with a configuration: (activity window, reporting currency, conversion factors)."""
        rows = await (await self.driver()).fetch(
            "select tenant_id, activity_window_days, reporting_currency, conversion_factors::text "
            "from metrics.tenant_config where tenant_id = any($1::text[])",
            sorted(set(tenant_ids)),
        )
        return {r[0]: (r[1], r[2], json.loads(r[3])) for r in rows}

    async def adopt_currencies(self: ConfigRepository[AsyncSession], first: Mapping[str, str]) -> dict[str, str]:
        """Sets each tenant's reporting currency to the one given where it has none yet; returns the
        reporting currency each tenant has afterwards (an earlier writer's may win)."""
        tenants = sorted(first)
        rows = await (await self.driver()).fetch(
            """insert into metrics.tenant_config as c (tenant_id, reporting_currency)
               select * from unnest($1::text[], $2::text[])
               on conflict (tenant_id) do update
                 set reporting_currency = coalesce(c.reporting_currency, excluded.reporting_currency)
               returning tenant_id, reporting_currency""",
            tenants,
            [first[t] for t in tenants],
        )
        return {r[0]: r[1] for r in rows}


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


class GaugeRepository(RepositoryBase[SessionT]):
    async def gauge_tenants(self, *, today: date, pinned: Sequence[str], limit: int) -> tuple[list[str], int]:
        """Up to `limit` tenants to export, and how many have business at all."""
        params = {"today": today, "pinned": list(pinned), "limit": limit}
        found = (await self.session.execute(_GAUGE_TENANTS, params)).all()
        return [r.tenant_id for r in found], (found[0].total if found else 0)

    async def bound(self, timeout_ms: int) -> None:
        """Bounds every statement of the session's transaction (the setting is gone at its end)."""
        await self.session.execute(text(f"set local statement_timeout = {int(timeout_ms)}"))


class AggregatesRepository(RepositoryBase[SessionT]):
    # --- purchases ----------------------------------------------------------------------------------

    async def insert_orders(
        self: AggregatesRepository[AsyncSession], rows: Sequence[Sequence[Any]]
    ) -> set[tuple[str, str]]:
        """rows: (tenant, order, customer, ordered_at, day, currency, original_amount, amount, discount_share,
        channel); returns the (tenant, order) inserted (an order already there is left as it is)."""
        found = await (await self.driver()).fetch(
            """insert into metrics.orders (tenant_id, order_id, customer_id, ordered_at, day, currency,
                 original_amount, amount, discount_share, channel)
               select * from unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::date[], $6::text[],
                 $7::numeric[], $8::numeric[], $9::numeric[], $10::text[])
               on conflict do nothing returning tenant_id, order_id""",
            *_columns(rows, 10),
        )
        return {(r[0], r[1]) for r in found}

    async def insert_refunds(
        self: AggregatesRepository[AsyncSession], rows: Sequence[Sequence[Any]]
    ) -> set[tuple[str, str]]:
        """rows: (tenant, refund, order, customer, refunded_at, currency, original_amount, amount)."""
        found = await (await self.driver()).fetch(
            """insert into metrics.refunds (tenant_id, refund_id, order_id, customer_id, refunded_at, currency,
                 original_amount, amount)
               select * from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[],
                 $7::numeric[], $8::numeric[])
               on conflict do nothing returning tenant_id, refund_id""",
            *_columns(rows, 8),
        )
        return {(r[0], r[1]) for r in found}

    async def refunds_to_apply(
        self: AggregatesRepository[AsyncSession], orders: Sequence[tuple[str, str]]
    ) -> list[Any]:
        """The refunds not yet applied of these (tenant, order) pairs whose order is known, with the order,
        locked: (tenant, refund, amount, order, customer, day, order amount, order refunded)."""
        if not orders:
            return []
        pairs = sorted(set(orders))
        rows: list[Any] = await (await self.driver()).fetch(
            """select r.tenant_id, r.refund_id, r.amount, o.order_id, o.customer_id, o.day, o.amount, o.refunded
               from metrics.refunds r
               join metrics.orders o on o.tenant_id = r.tenant_id and o.order_id = r.order_id
               join unnest($1::text[], $2::text[]) k(tenant_id, order_id)
                 on k.tenant_id = r.tenant_id and k.order_id = r.order_id
               where not r.applied
               order by o.tenant_id, o.order_id, r.refund_id
               for update of r, o""",
            [p[0] for p in pairs],
            [p[1] for p in pairs],
        )
        return rows

    async def apply_refunds(
        self: AggregatesRepository[AsyncSession],
        orders: Sequence[tuple[str, str, Decimal]],
        refunds: Sequence[tuple[str, str]],
    ) -> None:
        driver = await self.driver()
        await driver.execute(
            """update metrics.orders o set refunded = o.refunded + k.amount
               from unnest($1::text[], $2::text[], $3::numeric[]) k(tenant_id, order_id, amount)
               where o.tenant_id = k.tenant_id and o.order_id = k.order_id""",
            *_columns(orders, 3),
        )
        await driver.execute(
            """update metrics.refunds r set applied = true
               from unnest($1::text[], $2::text[]) k(tenant_id, refund_id)
               where r.tenant_id = k.tenant_id and r.refund_id = k.refund_id""",
            *_columns(refunds, 2),
        )

    async def add_purchases_to_customers(
        self: AggregatesRepository[AsyncSession], rows: Sequence[Sequence[Any]]
    ) -> None:
        """rows, sorted: (tenant, customer, first purchase at, last purchase at, orders, net revenue,
        discount share sum, orders with a discount share); first/last None leave them as they are."""
        await (await self.driver()).execute(
            """insert into metrics.customers as c (tenant_id, customer_id, first_purchase_at, last_purchase_at,
                 orders, net_revenue, discount_share_sum, discount_orders)
               select * from unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::int[],
                 $6::numeric[], $7::numeric[], $8::int[])
               on conflict (tenant_id, customer_id) do update set
                 first_purchase_at = least(c.first_purchase_at, excluded.first_purchase_at),
                 last_purchase_at = greatest(c.last_purchase_at, excluded.last_purchase_at),
                 orders = c.orders + excluded.orders,
                 net_revenue = c.net_revenue + excluded.net_revenue,
                 discount_share_sum = c.discount_share_sum + excluded.discount_share_sum,
                 discount_orders = c.discount_orders + excluded.discount_orders""",
            *_columns(rows, 8),
        )

    async def purchase_days(self, customers: Sequence[tuple[str, str]]) -> dict[tuple[str, str], list[date]]:
        """Each customer's purchase days, sorted."""
        out: dict[tuple[str, str], list[date]] = {c: [] for c in customers}
        if not customers:
            return out
        pairs = sorted(set(customers))
        rows = await (await self.driver()).fetch(
            """select d.tenant_id, d.customer_id, d.day from metrics.customer_days d
               join unnest($1::text[], $2::text[]) k(tenant_id, customer_id)
                 on k.tenant_id = d.tenant_id and k.customer_id = d.customer_id
               order by d.tenant_id, d.customer_id, d.day""",
            [p[0] for p in pairs],
            [p[1] for p in pairs],
        )
        for r in rows:
            out[(r[0], r[1])].append(r[2])
        return out

    async def add_customer_days(self: AggregatesRepository[AsyncSession], rows: Sequence[Sequence[Any]]) -> None:
        """rows, sorted: (tenant, customer, day, orders, net revenue) added to what is there."""
        if not rows:
            return
        await (await self.driver()).execute(
            """insert into metrics.customer_days as d (tenant_id, customer_id, day, orders, net_revenue)
               select * from unnest($1::text[], $2::text[], $3::date[], $4::int[], $5::numeric[])
               on conflict (tenant_id, customer_id, day) do update set
                 orders = d.orders + excluded.orders, net_revenue = d.net_revenue + excluded.net_revenue""",
            *_columns(rows, 5),
        )

    async def add_daily(
        self: AggregatesRepository[AsyncSession], rows: Mapping[tuple[str, date], Sequence[Any]]
    ) -> None:
        """Adds per (tenant, day) the values of DAILY_COLUMNS."""
        if not rows:
            return
        keys = sorted(rows)
        names = ", ".join(DAILY_COLUMNS)
        arrays = ", ".join(f"${i + 3}::{_DAILY_TYPES.get(c, 'bigint')}[]" for i, c in enumerate(DAILY_COLUMNS))
        updates = ", ".join(f"{c} = d.{c} + excluded.{c}" for c in DAILY_COLUMNS)
        values = [[rows[k][i] for k in keys] for i in range(len(DAILY_COLUMNS))]
        await (await self.driver()).execute(
            f"""insert into metrics.daily as d (tenant_id, day, {names})
                select * from unnest($1::text[], $2::date[], {arrays})
                on conflict (tenant_id, day) do update set {updates}""",
            [k[0] for k in keys],
            [k[1] for k in keys],
            *values,
        )

    async def add_cells(
        self: AggregatesRepository[AsyncSession], rows: Mapping[tuple[str, str, date, date], int]
    ) -> None:
        """Adds customers per (tenant, period kind, cohort, period start)."""
        keys = sorted(k for k, v in rows.items() if v)
        if not keys:
            return
        await (await self.driver()).execute(
            """insert into metrics.period_cells as p (tenant_id, period, cohort, start, customers)
               select * from unnest($1::text[], $2::text[], $3::date[], $4::date[], $5::int[])
               on conflict (tenant_id, period, cohort, start)
                 do update set customers = p.customers + excluded.customers""",
            [k[0] for k in keys],
            [k[1] for k in keys],
            [k[2] for k in keys],
            [k[3] for k in keys],
            [rows[k] for k in keys],
        )

    async def tenant_days(self, tenant_id: str) -> dict[str, list[date]]:
        """Every customer's purchase days, sorted."""
        out: dict[str, list[date]] = defaultdict(list)
        rows = await (await self.driver()).fetch(
            "select customer_id, day from metrics.customer_days where tenant_id = $1 order by customer_id, day",
            tenant_id,
        )
        for r in rows:
            out[r[0]].append(r[1])
        return out

    async def reset_activity(self: AggregatesRepository[AsyncSession], tenant_id: str) -> None:
        """Zeroes what depends on the activity window (before it is summed again under a new one)."""
        driver = await self.driver()
        await driver.execute(
            "update metrics.daily set active_delta = 0 where tenant_id = $1 and active_delta <> 0", tenant_id
        )
        await driver.execute("delete from metrics.period_active where tenant_id = $1", tenant_id)

    async def forget(self: AggregatesRepository[AsyncSession], tenant_id: str) -> None:
        """Deletes the tenant's aggregates, facts and tracking rows (not its configuration)."""
        driver = await self.driver()
        for table in TENANT_TABLES:
            await driver.execute(f"delete from metrics.{table} where tenant_id = $1", tenant_id)
        await driver.execute(
            """delete from metrics.processed_events where tenant_id = $1
               and (consumer_group = 'metrics' or consumer_group like 'metrics:%')""",
            tenant_id,
        )

    # --- points -------------------------------------------------------------------------------------

    async def add_points_to_customers(
        self: AggregatesRepository[AsyncSession], rows: Sequence[tuple[str, str, int, int]]
    ) -> None:
        """rows, sorted: (tenant, customer, available delta, pending delta)."""
        if not rows:
            return
        await (await self.driver()).execute(
            """insert into metrics.customers as c (tenant_id, customer_id, points_available, points_pending)
               select * from unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])
               on conflict (tenant_id, customer_id) do update set
                 points_available = c.points_available + excluded.points_available,
                 points_pending = c.points_pending + excluded.points_pending""",
            *_columns(rows, 4),
        )

    async def add_member_days(
        self: AggregatesRepository[AsyncSession], rows: Sequence[tuple[str, date, str]]
    ) -> set[tuple[str, date, str]]:
        """Records (tenant, day, customer) member days; returns those that are new."""
        if not rows:
            return set()
        found = await (await self.driver()).fetch(
            """insert into metrics.member_days (tenant_id, day, customer_id)
               select * from unnest($1::text[], $2::date[], $3::text[]) on conflict do nothing
               returning tenant_id, day, customer_id""",
            *_columns(sorted(set(rows)), 3),
        )
        return {(r[0], r[1], r[2]) for r in found}

    async def member_days(self, customers: Sequence[tuple[str, str]]) -> dict[tuple[str, str], list[date]]:
        """Each customer's member days."""
        out: dict[tuple[str, str], list[date]] = {c: [] for c in customers}
        pairs = sorted(set(customers))
        rows = await (await self.driver()).fetch(
            """select d.tenant_id, d.customer_id, d.day from metrics.member_days d
               join unnest($1::text[], $2::text[]) k(tenant_id, customer_id)
                 on k.tenant_id = d.tenant_id and k.customer_id = d.customer_id""",
            [p[0] for p in pairs],
            [p[1] for p in pairs],
        )
        for r in rows:
            out[(r[0], r[1])].append(r[2])
        return out

    async def add_period_counts(
        self: AggregatesRepository[AsyncSession], table: PeriodTable, rows: Mapping[tuple[str, str, date], int]
    ) -> None:
        """Adds per (tenant, period kind, period start) to period_members' or period_active's count."""
        keys = sorted(k for k, v in rows.items() if v)
        if not keys:
            return
        column = PERIOD_TABLES[table]
        await (await self.driver()).execute(
            f"""insert into metrics.{table} as p (tenant_id, period, start, {column})
                select * from unnest($1::text[], $2::text[], $3::date[], $4::int[])
                on conflict (tenant_id, period, start) do update set {column} = p.{column} + excluded.{column}""",
            [k[0] for k in keys],
            [k[1] for k in keys],
            [k[2] for k in keys],
            [rows[k] for k in keys],
        )

    async def stored_answers(self, keys: Sequence[tuple[str, str, date, str]]) -> dict[tuple[str, str, date, str], Any]:
        """The latest answers kept for (tenant, period kind, start, customer) keys: (time, event id, nps)."""
        if not keys:
            return {}
        rows = await (await self.driver()).fetch(
            """select s.tenant_id, s.period, s.start, s.customer_id, s.occurred_at, s.event_id, s.nps
               from metrics.survey_periods s
               join unnest($1::text[], $2::text[], $3::date[], $4::text[]) k(tenant_id, period, start, customer_id)
                 on k.tenant_id = s.tenant_id and k.period = s.period and k.start = s.start
                   and k.customer_id = s.customer_id""",
            *_columns(sorted(set(keys)), 4),
        )
        return {(r[0], r[1], r[2], r[3]): (r[4], r[5], r[6]) for r in rows}

    async def keep_answers(
        self: AggregatesRepository[AsyncSession],
        latest: Mapping[tuple[str, str, date, str], tuple[datetime, str, int]],
        counts: Mapping[tuple[str, str, date], Sequence[int]],
    ) -> None:
        """Stores each key's latest answer and adds to the periods' survey counts."""
        driver = await self.driver()
        if latest:
            keys = sorted(latest)
            await driver.execute(
                """insert into metrics.survey_periods as s (tenant_id, period, start, customer_id, occurred_at,
                     event_id, nps)
                   select * from unnest($1::text[], $2::text[], $3::date[], $4::text[], $5::timestamptz[],
                     $6::text[], $7::smallint[])
                   on conflict (tenant_id, period, start, customer_id) do update set
                     occurred_at = excluded.occurred_at, event_id = excluded.event_id, nps = excluded.nps""",
                *_columns([(*k, *latest[k]) for k in keys], 7),
            )
        periods = sorted(k for k, v in counts.items() if any(v))
        if periods:
            await driver.execute(
                """insert into metrics.period_surveys as p (tenant_id, period, start, responses, promoters,
                     detractors, effort_sum, efforts)
                   select * from unnest($1::text[], $2::text[], $3::date[], $4::int[], $5::int[], $6::int[],
                     $7::bigint[], $8::int[])
                   on conflict (tenant_id, period, start) do update set
                     responses = p.responses + excluded.responses, promoters = p.promoters + excluded.promoters,
                     detractors = p.detractors + excluded.detractors,
                     effort_sum = p.effort_sum + excluded.effort_sum, efforts = p.efforts + excluded.efforts""",
                *_columns([(*k, *counts[k]) for k in periods], 8),
            )

    # --- engagement and customers -------------------------------------------------------------------

    async def add_engagements(self: AggregatesRepository[AsyncSession], rows: Sequence[Sequence[Any]]) -> None:
        """rows: (tenant, kind, business id, customer, occurred_at, event type, event id, nps, effort score,
        rating, period start, period end, currency, original amount, amount). A fact is kept once; a wallet
        estimate is replaced by a later one (by time, then event id) of the same customer and period."""
        if not rows:
            return
        await (await self.driver()).execute(
            """insert into metrics.engagements as e (tenant_id, kind, business_id, customer_id, occurred_at,
                 event_type, event_id, nps, effort_score, rating, period_start, period_end, currency,
                 original_amount, amount)
               select * from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[],
                 $7::text[], $8::smallint[], $9::smallint[], $10::smallint[], $11::date[], $12::date[], $13::text[],
                 $14::numeric[], $15::numeric[])
               order by 1, 2, 3
               on conflict (tenant_id, kind, business_id) do update set
                 occurred_at = excluded.occurred_at, event_id = excluded.event_id, currency = excluded.currency,
                 original_amount = excluded.original_amount, amount = excluded.amount
               where e.kind = 'wallet' and (excluded.occurred_at, excluded.event_id) > (e.occurred_at, e.event_id)""",
            *_columns(rows, 15),
        )

    async def note_engagement(self: AggregatesRepository[AsyncSession], rows: Sequence[Sequence[Any]]) -> None:
        """rows, sorted, one per customer: (tenant, customer, nps, nps at, effort score, effort at, review at,
        referral at, attendance at); each fact kept when later than the stored one."""
        if not rows:
            return
        await (await self.driver()).execute(
            """insert into metrics.customers as c (tenant_id, customer_id, last_nps, last_nps_at, last_effort_score,
                 last_effort_at, last_review_at, last_referral_at, last_attendance_at)
               select * from unnest($1::text[], $2::text[], $3::smallint[], $4::timestamptz[], $5::smallint[],
                 $6::timestamptz[], $7::timestamptz[], $8::timestamptz[], $9::timestamptz[])
               on conflict (tenant_id, customer_id) do update set
                 last_nps = case when excluded.last_nps_at > coalesce(c.last_nps_at, '-infinity')
                   then excluded.last_nps else c.last_nps end,
                 last_nps_at = greatest(c.last_nps_at, excluded.last_nps_at),
                 last_effort_score = case when excluded.last_effort_at > coalesce(c.last_effort_at, '-infinity')
                   then excluded.last_effort_score else c.last_effort_score end,
                 last_effort_at = greatest(c.last_effort_at, excluded.last_effort_at),
                 last_review_at = greatest(c.last_review_at, excluded.last_review_at),
                 last_referral_at = greatest(c.last_referral_at, excluded.last_referral_at),
                 last_attendance_at = greatest(c.last_attendance_at, excluded.last_attendance_at)""",
            *_columns(rows, 9),
        )

    async def note_tiers(
        self: AggregatesRepository[AsyncSession], rows: Sequence[tuple[str, str, str, datetime]]
    ) -> None:
        """rows, sorted, one per customer: (tenant, customer, tier, changed at); kept when later."""
        if not rows:
            return
        await (await self.driver()).execute(
            """insert into metrics.customers as c (tenant_id, customer_id, tier, tier_changed_at)
               select * from unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[])
               on conflict (tenant_id, customer_id) do update set
                 tier = excluded.tier, tier_changed_at = excluded.tier_changed_at
               where c.tier_changed_at is null or excluded.tier_changed_at > c.tier_changed_at""",
            *_columns(rows, 4),
        )


class RedemptionsRepository(RepositoryBase[SessionT]):
    """The redemption orders, their changes and the sums per day, reward and kind (metrics/redemptions.py)."""

    async def lock_orders(
        self: RedemptionsRepository[AsyncSession], rows: Sequence[tuple[str, str, str, OrderFacts]]
    ) -> dict[tuple[str, str], OrderFacts]:
        """rows: (tenant, order, customer, facts) of a batch's orders, the first event's facts for each. Inserts
        the unknown orders and returns every order's stored facts, locked: a concurrent batch with changes of one
        of them (a rebuild beside the service) waits, so both fold the order's changes in one after the other."""
        if not rows:
            return {}
        ordered = sorted(rows, key=lambda r: (r[0], r[1]))
        driver = await self.driver()
        await driver.execute(
            """insert into metrics.redemption_orders (tenant_id, order_id, customer_id, reward_id, reward_kind,
                 points, value, currency)
               select * from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[],
                 $7::numeric[], $8::text[])
               on conflict do nothing""",
            *_columns(
                [(t, o, c, f.reward_id, f.reward_kind, f.points, f.value, f.currency) for t, o, c, f in ordered],
                8,
            ),
        )
        found = await driver.fetch(
            """select o.tenant_id, o.order_id, o.reward_id, o.reward_kind, o.points, o.value, o.currency
               from metrics.redemption_orders o
               join unnest($1::text[], $2::text[]) k(tenant_id, order_id)
                 on k.tenant_id = o.tenant_id and k.order_id = o.order_id
               order by o.tenant_id, o.order_id
               for update of o""",
            [r[0] for r in ordered],
            [r[1] for r in ordered],
        )
        return {(r[0], r[1]): OrderFacts(r[2], r[3], r[4], r[5], r[6]) for r in found}

    async def changes(self, orders: Sequence[tuple[str, str]]) -> dict[tuple[str, str], list[Change]]:
        """The stored changes of these (tenant, order) pairs."""
        out: dict[tuple[str, str], list[Change]] = {o: [] for o in orders}
        if not orders:
            return out
        pairs = sorted(set(orders))
        rows = await (await self.driver()).fetch(
            """select c.tenant_id, c.order_id, c.occurred_at, c.event_id, c.change, c.state, c.points_returned
               from metrics.redemption_changes c
               join unnest($1::text[], $2::text[]) k(tenant_id, order_id)
                 on k.tenant_id = c.tenant_id and k.order_id = c.order_id""",
            [p[0] for p in pairs],
            [p[1] for p in pairs],
        )
        for r in rows:
            out[(r[0], r[1])].append(Change(r[2], r[3], r[4], r[5], r[6]))
        return out

    async def add_changes(
        self: RedemptionsRepository[AsyncSession], rows: Sequence[Sequence[Any]]
    ) -> set[tuple[str, str, str, str]]:
        """rows: (tenant, order, source, event id, change, state, points returned, occurred_at); returns the
        (tenant, order, source, event id) inserted (a change already there is left as it is)."""
        if not rows:
            return set()
        found = await (await self.driver()).fetch(
            """insert into metrics.redemption_changes (tenant_id, order_id, source, event_id, change, state,
                 points_returned, occurred_at)
               select * from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                 $7::bigint[], $8::timestamptz[])
               on conflict do nothing returning tenant_id, order_id, source, event_id""",
            *_columns(rows, 8),
        )
        return {(r[0], r[1], r[2], r[3]) for r in found}

    async def add_sums(
        self: RedemptionsRepository[AsyncSession],
        counts: Mapping[tuple[str, date, str, str], Sequence[int]],
        values: Mapping[tuple[str, date, str, str, str], Decimal],
    ) -> None:
        """Adds per (tenant, day, reward, kind) the COUNTERS, and per (..., currency) the money value."""
        driver = await self.driver()
        keys = sorted(k for k, v in counts.items() if any(v))
        if keys:
            names = ", ".join(COUNTERS)
            arrays = ", ".join(f"${i + 5}::bigint[]" for i in range(len(COUNTERS)))
            updates = ", ".join(f"{c} = d.{c} + excluded.{c}" for c in COUNTERS)
            await driver.execute(
                f"""insert into metrics.redemptions_daily as d (tenant_id, day, reward_id, reward_kind, {names})
                    select * from unnest($1::text[], $2::date[], $3::text[], $4::text[], {arrays})
                    on conflict (tenant_id, day, reward_id, reward_kind) do update set {updates}""",
                *_columns([(*k, *counts[k]) for k in keys], 4 + len(COUNTERS)),
            )
        money = sorted(k for k, v in values.items() if v)
        if money:
            await driver.execute(
                """insert into metrics.redemption_values_daily as d (tenant_id, day, reward_id, reward_kind, currency,
                     value)
                   select * from unnest($1::text[], $2::date[], $3::text[], $4::text[], $5::text[], $6::numeric[])
                   on conflict (tenant_id, day, reward_id, reward_kind, currency)
                     do update set value = d.value + excluded.value""",
                *_columns([(*k, values[k]) for k in money], 6),
            )

    async def window(
        self, tenant_id: str, start: date, end: date
    ) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, str, Decimal]]]:
        """The sums over the days of [start, end): (reward, kind, COUNTERS) and (reward, kind, currency, value)."""
        driver = await self.driver()
        sums = ", ".join(f"sum({c})::bigint" for c in COUNTERS)
        counts = await driver.fetch(
            f"""select reward_id, reward_kind, {sums} from metrics.redemptions_daily
                where tenant_id = $1 and day >= $2 and day < $3 group by reward_id, reward_kind""",
            tenant_id,
            start,
            end,
        )
        values = await driver.fetch(
            """select reward_id, reward_kind, currency, sum(value) from metrics.redemption_values_daily
               where tenant_id = $1 and day >= $2 and day < $3 group by reward_id, reward_kind, currency""",
            tenant_id,
            start,
            end,
        )
        return [(r[0], r[1], list(r[2:])) for r in counts], [(r[0], r[1], r[2], r[3]) for r in values]


class KpiRepository(RepositoryBase[SessionT]):
    """The reads of the KPI endpoints; each one statement on the tenant's aggregates."""

    async def days(self, tenant_id: str, start: date, end: date) -> list[Any]:
        rows: list[Any] = await (await self.driver()).fetch(
            """select day, orders, amount, refunded, buyers, new_customers, active_delta,
                  points_issued, points_redeemed, points_expired, points_clawed_back
                from metrics.daily where tenant_id = $1 and day >= $2 and day < $3""",
            tenant_id,
            start,
            end,
        )
        return rows

    async def sums_before(self, tenant_id: str, day: date) -> Any:
        """Sums of the running columns over the days before `day`."""
        return await (await self.driver()).fetchrow(
            """select coalesce(sum(active_delta), 0) active, coalesce(sum(available_delta), 0) available,
                 coalesce(sum(pending_delta), 0) pending, coalesce(sum(held_delta), 0) held
               from metrics.daily where tenant_id = $1 and day < $2""",
            tenant_id,
            day,
        )

    async def programme(self, tenant_id: str, start: date, end: date) -> Any:
        return await (await self.driver()).fetchrow(
            """select coalesce(sum(points_issued), 0) issued, coalesce(sum(points_redeemed), 0) redeemed,
                 coalesce(sum(points_expired), 0) expired, coalesce(sum(points_clawed_back), 0) clawed_back
               from metrics.daily where tenant_id = $1 and day >= $2 and day < $3""",
            tenant_id,
            start,
            end,
        )

    async def buyers(self, tenant_id: str, kind: str, start: date, end: date) -> dict[date, int]:
        rows = await (await self.driver()).fetch(
            """select start, sum(customers) from metrics.period_cells
               where tenant_id = $1 and period = $2 and start >= $3 and start < $4 group by start""",
            tenant_id,
            kind,
            start,
            end,
        )
        return {r[0]: int(r[1]) for r in rows}

    async def period_counts(
        self, table: PeriodTable, tenant_id: str, kind: str, start: date, end: date
    ) -> dict[date, int]:
        """period_members' or period_active's counts by period start."""
        rows = await (await self.driver()).fetch(
            f"""select start, {PERIOD_TABLES[table]} from metrics.{table}
                where tenant_id = $1 and period = $2 and start >= $3 and start < $4""",
            tenant_id,
            kind,
            start,
            end,
        )
        return {r[0]: r[1] for r in rows}

    async def active_before(self, tenant_id: str, kind: str, start: date) -> int:
        """The running sum of period_active's changes over the periods before `start`."""
        value = await (await self.driver()).fetchval(
            """select coalesce(sum(customers), 0) from metrics.period_active
               where tenant_id = $1 and period = $2 and start < $3""",
            tenant_id,
            kind,
            start,
        )
        return int(value)

    async def cells(self, tenant_id: str, kind: str, start: date, end: date) -> dict[tuple[date, date], int]:
        rows = await (await self.driver()).fetch(
            """select cohort, start, customers from metrics.period_cells
               where tenant_id = $1 and period = $2 and cohort >= $3 and cohort < $4""",
            tenant_id,
            kind,
            start,
            end,
        )
        return {(r[0], r[1]): r[2] for r in rows}

    async def surveys(self, tenant_id: str, kind: str, start: date, end: date) -> list[Any]:
        """Per period start: responses (each customer's latest answer with an NPS), promoters, detractors, the
        sum and count of effort scores."""
        rows: list[Any] = await (await self.driver()).fetch(
            """select start, responses, promoters, detractors, effort_sum, efforts from metrics.period_surveys
               where tenant_id = $1 and period = $2 and start >= $3 and start < $4""",
            tenant_id,
            kind,
            start,
            end,
        )
        return rows

    async def wallets(self, tenant_id: str, start: date, end: date) -> list[Any]:
        """The wallet estimates ending in (start, end]: (end, estimate, our net revenue over its period)."""
        rows: list[Any] = await (await self.driver()).fetch(
            """select w.period_end, w.amount,
                 (select coalesce(sum(d.net_revenue), 0) from metrics.customer_days d
                  where d.tenant_id = w.tenant_id and d.customer_id = w.customer_id
                    and d.day >= w.period_start and d.day < w.period_end)
               from metrics.engagements w
               where w.tenant_id = $1 and w.kind = 'wallet' and w.period_end > $2 and w.period_end <= $3""",
            tenant_id,
            start,
            end,
        )
        return rows

    async def customers(self, tenant_id: str, as_of: date | None) -> kpis.Customers:
        """The lifetime figures of the customers with an order: now (from the per-customer summary), or up to
        and including the day `as_of` (summed from customer_days: slower)."""
        source = (
            "select customer_id, orders, net_revenue from metrics.customers where tenant_id = $1 and orders > 0"
            if as_of is None
            else """select customer_id, sum(orders)::int orders, sum(net_revenue) net_revenue
                    from metrics.customer_days where tenant_id = $1 and day <= $2 group by customer_id"""
        )
        args: list[Any] = [tenant_id] if as_of is None else [tenant_id, as_of]
        driver = await self.driver()
        counts = await driver.fetchrow(
            f"""select count(*), coalesce(sum(orders), 0), coalesce(sum(net_revenue), 0),
                  count(*) filter (where orders >= 2), count(*) filter (where orders >= 3),
                  count(*) filter (where orders >= 4), count(*) filter (where orders >= 5)
                from ({source}) c""",
            *args,
        )
        out = kpis.Customers(n=counts[0], orders=counts[1], total=counts[2])
        out.at_least = {1: counts[0], 2: counts[3], 3: counts[4], 4: counts[5], 5: counts[6]}
        if not out.n:
            return out
        cuts, ranks = kpis.cut_ranks(out.n), kpis.quantile_ranks(out.n)
        first = len(args) + 1
        # One pass over the customers by rank (ties in any order: tied values sum the same): the revenue above
        # each cut and the values at the quantiles.
        sums = ", ".join(f"coalesce(sum(net_revenue) filter (where rn <= ${first + i}), 0)" for i in range(len(cuts)))
        picks = ", ".join(f"max(net_revenue) filter (where rn = ${first + len(cuts) + i})" for i in range(len(ranks)))
        row = await driver.fetchrow(
            f"""select {sums}, {picks} from (
                  select net_revenue, row_number() over (order by net_revenue desc) rn
                  from ({source}) c) r""",
            *args,
            *cuts,
            *ranks,
        )
        out.prefix = dict(zip(cuts, row[: len(cuts)], strict=True))
        out.values = dict(zip(ranks, row[len(cuts) :], strict=True))
        top = await driver.fetch(
            f"select customer_id, orders, net_revenue from ({source}) c "
            f'order by net_revenue desc, customer_id collate "C" limit {kpis.TOP_CUSTOMERS}',
            *args,
        )
        out.top = [(r[0], r[1], r[2]) for r in top]
        return out


# --- segments -----------------------------------------------------------------------------------------

# What the classification reads of each customer with a purchase: its summary, the median gap between its
# orders and how many carried a discount (from its orders), and its latest CLV prediction. Each part is an
# index probe per customer (lateral; `limit 1` keeps the planner from flattening it), whatever the statistics
# say (a fresh CLV fit has none).
_FACTS = """
select c.customer_id, c.first_purchase_at, c.last_purchase_at, c.orders, c.net_revenue, c.last_nps,
       c.last_nps_at, c.last_review_at, c.last_referral_at, g.median_gap_s, g.priced, g.discounted,
       p.p_alive, p.clv
from unnest($2::text[]) as k(customer_id)
cross join lateral (
  select * from metrics.customers c where c.tenant_id = $1 and c.customer_id = k.customer_id limit 1
) c
cross join lateral (
  select percentile_cont(0.5) within group (order by gap) as median_gap_s,
         count(discount_share) as priced, count(*) filter (where discount_share > 0) as discounted
  from (select o.discount_share,
               extract(epoch from o.ordered_at - lag(o.ordered_at) over (order by o.ordered_at)) as gap
        from metrics.orders o where o.tenant_id = c.tenant_id and o.customer_id = c.customer_id) x
) g
left join lateral (
  select p.p_alive, p.clv from metrics.clv_predictions p
  where p.tenant_id = c.tenant_id and p.customer_id = c.customer_id limit 1
) p on true
where c.first_purchase_at is not null
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

    async def mark_pending(self: SegmentRepository[AsyncSession], keys: Sequence[tuple[str, str]]) -> None:
        """Notes (tenant, customer) pairs to classify again; one row per customer however often marked."""
        if keys:
            tenants, customers = zip(*sorted(set(keys)), strict=True)
            await (await self.driver()).execute(
                """insert into metrics.segments_pending (tenant_id, customer_id)
                   select * from unnest($1::text[], $2::text[]) on conflict do nothing""",
                list(tenants),
                list(customers),
            )

    async def claim_pending(self: SegmentRepository[AsyncSession], limit: int) -> list[tuple[str, str]]:
        """Takes up to `limit` pending customers (skipping those another loop holds), oldest tenant key first."""
        rows = await (await self.driver()).fetch(
            """delete from metrics.segments_pending p using (
                 select tenant_id, customer_id from metrics.segments_pending
                 order by tenant_id, customer_id limit $1 for update skip locked
               ) q where p.tenant_id = q.tenant_id and p.customer_id = q.customer_id
               returning p.tenant_id, p.customer_id""",
            limit,
        )
        return sorted((r[0], r[1]) for r in rows)

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
    "(clv is not null)": "boolean",
    "coalesce(clv, 0)": "numeric",
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


class ClvRepository(RepositoryBase[SessionT]):
    async def daily_net(self, tenant_id: str, as_of: date) -> Sequence[tuple[str, date, Decimal]]:
        """(customer, day, net revenue) of the tenant's orders up to `as_of`, refunds subtracted."""
        net = func.sum(Order.amount - func.least(Order.refunded, Order.amount))
        stmt = (
            select(Order.customer_id, Order.day, net)
            .where(Order.tenant_id == tenant_id, Order.day <= as_of)
            .group_by(Order.customer_id, Order.day)
        )
        return [(c, d, n) for c, d, n in (await self.session.execute(stmt)).tuples()]

    async def replace_predictions(
        self: ClvRepository[AsyncSession], tenant_id: str, rows: Sequence[Sequence[Any]]
    ) -> None:
        """The tenant's predictions become `rows` (in `PREDICTION_COLUMNS` order): the old ones go whole."""
        await self.session.execute(delete(ClvPrediction).where(ClvPrediction.tenant_id == tenant_id))
        await self.copy(ClvPrediction.__tablename__, PREDICTION_COLUMNS, rows, schema="metrics")

    async def add_fit(self: ClvRepository[AsyncSession], fit: ClvFit) -> None:
        self.session.add(fit)
        await self.session.flush()

    async def latest_fit(self, tenant_id: str) -> ClvFit | None:
        stmt = select(ClvFit).where(ClvFit.tenant_id == tenant_id).order_by(ClvFit.fitted_at.desc()).limit(1)
        return (await self.session.execute(stmt)).scalar_one_or_none()

    async def tenants_due(self, fitted_before: datetime) -> Sequence[str]:
        """Tenants with orders whose latest fit (attempted or not, by `clv_fits`) is older than `fitted_before`."""
        latest = select(ClvFit.tenant_id, func.max(ClvFit.fitted_at).label("at")).group_by(ClvFit.tenant_id).subquery()
        stmt = (
            select(Order.tenant_id)
            .distinct()
            .outerjoin(latest, latest.c.tenant_id == Order.tenant_id)
            .where((latest.c.at.is_(None)) | (latest.c.at < fitted_before))
            .order_by(Order.tenant_id)
        )
        return (await self.session.execute(stmt)).scalars().all()


PREDICTION_COLUMNS = (
    "tenant_id",
    "customer_id",
    "fitted_at",
    "frequency",
    "recency",
    "t",
    "currency",
    "monetary_value",
    "expected_spend",
    "p_alive",
    "purchases_90d",
    "purchases_365d",
    "clv",
)
