"""Helpers for the segment tests: metrics rows as the ingestion leaves them, and the CLV job's table."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db import create_engine
from tests.conftest import database_url, owner_url

NOW = datetime(2026, 6, 1, tzinfo=UTC)

# The CLV job's table (the clv branch's migration): where it is missing, a stand-in with its columns lives
# while the tests need it and goes after them.
CLV_TABLE = """create table metrics.clv_predictions (
  tenant_id varchar(63) not null, customer_id varchar(200) not null, fitted_at timestamptz not null,
  frequency int not null, recency int not null, t int not null, currency varchar(3) not null,
  monetary_value numeric not null, expected_spend numeric not null, p_alive numeric not null,
  purchases_90d numeric not null, purchases_365d numeric not null, clv numeric not null,
  primary key (tenant_id, customer_id))"""
PREDICTION = """insert into metrics.clv_predictions (tenant_id, customer_id, fitted_at, frequency, recency, t, currency,
  monetary_value, expected_spend, p_alive, purchases_90d, purchases_365d, clv)
  values (:t, :c, now(), 1, 10, 100, 'EUR', 100, 100, :p, 0.5, 2, :v)"""


@asynccontextmanager
async def metrics_engine() -> AsyncIterator[AsyncEngine]:
    """An engine on the metrics test database, where metrics.clv_predictions exists."""
    engine = create_engine(database_url("metrics"), pool_size=2)
    # The schema belongs to the owner role (as after the migrations): it creates the stand-in, the service
    # role gets its rows.
    owner = create_engine(owner_url("metrics"), pool_size=1)
    role = make_url(database_url("metrics")).username
    async with owner.begin() as conn:
        missing = (await conn.execute(text("select to_regclass('metrics.clv_predictions') is null"))).scalar_one()
        if missing:
            await conn.execute(text(CLV_TABLE))
            await conn.execute(text(f'grant select, insert, update, delete on metrics.clv_predictions to "{role}"'))
    try:
        yield engine
    finally:
        if missing:
            async with owner.begin() as conn:
                await conn.execute(text("drop table metrics.clv_predictions"))
        await owner.dispose()
        await engine.dispose()


def ago(days: float, now: datetime = NOW) -> datetime:
    return now - timedelta(days=days)


async def add_customer(
    engine: AsyncEngine,
    tenant: str,
    customer: str,
    order_days: Sequence[float],
    *,
    now: datetime = NOW,
    amount: str = "100",
    discounted: int = 0,
    prediction: tuple[float, str] | None = None,
    **summary: Any,
) -> None:
    """A customer as the metrics ingestion leaves it: its orders (`order_days` before `now`, the first
    `discounted` with a discount) and its summary row; optionally a CLV prediction (P(alive), CLV)."""
    times = sorted(ago(d, now) for d in order_days)
    async with engine.begin() as conn:
        for n, at in enumerate(times):
            await conn.execute(
                text(
                    """insert into metrics.orders (tenant_id, order_id, customer_id, ordered_at, day, currency,
                       original_amount, amount, discount_share, channel)
                       values (:t, :o, :c, :at, :day, 'EUR', :a, :a, :share, 'webshop')"""
                ),
                {
                    "t": tenant,
                    "o": f"{customer}-{n}",
                    "c": customer,
                    "at": at,
                    "day": at.date(),
                    "a": Decimal(amount),
                    "share": Decimal("0.2") if n < discounted else Decimal(0),
                },
            )
        values = {
            "first_purchase_at": times[0] if times else None,
            "last_purchase_at": times[-1] if times else None,
            "orders": len(times),
            "net_revenue": Decimal(amount) * len(times),
            **summary,
        }
        await conn.execute(
            text(
                f"insert into metrics.customers (tenant_id, customer_id, {', '.join(values)}) "
                f"values (:t, :c, {', '.join(':' + k for k in values)})"
            ),
            {"t": tenant, "c": customer, **values},
        )
        if prediction is not None:
            await conn.execute(
                text(PREDICTION),
                {"t": tenant, "c": customer, "p": Decimal(str(prediction[0])), "v": Decimal(prediction[1])},
            )
