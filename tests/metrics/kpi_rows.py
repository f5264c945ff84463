"""Rows of the metrics tables for one tenant, with figures computed by hand (the KPI gauges' and the dashboards'
SQL panels' tests): March 2025 up to the 15th (TODAY)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import async_sessionmaker

from metrics.models import (
    Customer,
    CustomerDay,
    CustomerSegment,
    Daily,
    Engagement,
    PeriodActive,
    PeriodSurveys,
    RedemptionsDaily,
    RedemptionValuesDaily,
    TenantConfig,
)
from shared.db import AsyncSession, transaction

TODAY = date(2025, 3, 15)


def at(day: str, hour: int = 12) -> datetime:
    return datetime.fromisoformat(day).replace(hour=hour, tzinfo=UTC)


def daily(tenant: str, day: str, **counters: Any) -> dict[str, Any]:
    return {"tenant_id": tenant, "day": date.fromisoformat(day), **counters}


def redeemed(tenant: str, day: str, reward: str, kind: str, **counters: int) -> dict[str, Any]:
    return {"tenant_id": tenant, "day": date.fromisoformat(day), "reward_id": reward, "reward_kind": kind, **counters}


def valued(tenant: str, day: str, reward: str, kind: str, currency: str, value: str) -> dict[str, Any]:
    row = {"tenant_id": tenant, "day": date.fromisoformat(day), "reward_id": reward, "reward_kind": kind}
    return {**row, "currency": currency, "value": Decimal(value)}


def survey(tenant: str, customer: str, nps: int, occurred_at: datetime) -> dict[str, Any]:
    key = f"{customer}-{occurred_at.isoformat()}"
    return {
        "tenant_id": tenant,
        "kind": "survey",
        "business_id": key,
        "customer_id": customer,
        "occurred_at": occurred_at,
        "event_type": "survey.answered",
        "event_id": key,
        "nps": nps,
    }


def customer(tenant: str, customer_id: str, *, orders: int, net: int, last: str | None) -> dict[str, Any]:
    return {
        "tenant_id": tenant,
        "customer_id": customer_id,
        "orders": orders,
        "net_revenue": Decimal(net),
        "last_purchase_at": None if last is None else at(last),
    }


def segment_row(tenant: str, customer: str, segment: str, clv: str, p_alive: float) -> dict[str, Any]:
    when = at("2025-03-05")
    return {
        "tenant_id": tenant,
        "customer_id": customer,
        "segment": segment,
        "reason": "test",
        "since": when,
        "classified_at": when,
        "orders": 1,
        "net_revenue": Decimal(10),
        "last_purchase_at": when,
        "clv": Decimal(clv),
        "p_alive": p_alive,
    }


async def seed(sessionmaker: async_sessionmaker[AsyncSession], tenant: str) -> None:
    """March 2025 (TODAY the 15th): S = 3 (2 + 1 before March), E = 3 on the 31st (+1 new, -1 spell ended),
    N = 1; 4 customers active in March. Buyers: 5, of whom 2 with 2 or more orders; net revenue 600 (300, 150,
    100, 50, 0). NPS in March: 2 promoters, 1 detractor. Points: 270 available, 50 pending; point value 0.5.
    Redemptions up to TODAY: mug (gift) 2 reserved, 2 confirmed, 1 cancelled, 200 points spent, 25.00 EUR; cpn
    (coupon) 1 reserved and confirmed by its coupon, 300 points, 10.00 EUR; disc (discount) 1 confirmed and refunded
    in full, 200 points spent and returned, 2.00 EUR; a privilege whose confirmation moved away (zeros); after
    TODAY, 5 more mugs."""
    async with transaction(sessionmaker) as session:
        await session.execute(
            insert(Daily),
            [
                daily(
                    tenant,
                    "2024-06-01",
                    orders=2,
                    amount=100,
                    new_customers=2,
                    active_delta=2,
                    points_issued=100,
                    available_delta=100,
                ),
                daily(
                    tenant,
                    "2025-02-10",
                    orders=1,
                    amount=50,
                    new_customers=1,
                    active_delta=1,
                    points_redeemed=30,
                    available_delta=-30,
                ),
                daily(
                    tenant,
                    "2025-03-02",
                    orders=3,
                    amount=300,
                    refunded=20,
                    new_customers=1,
                    active_delta=1,
                    points_issued=300,
                    points_redeemed=10,
                    points_expired=5,
                    points_clawed_back=7,
                    available_delta=200,
                    pending_delta=50,
                ),
                daily(tenant, "2025-03-10", active_delta=-1),
                daily(tenant, "2025-06-01", active_delta=-2),  # spells ending after today: not counted yet
            ],
        )
        await session.execute(
            insert(Customer),
            [
                customer(tenant, "c1", orders=3, net=300, last="2025-03-02"),
                customer(tenant, "c2", orders=1, net=50, last="2025-02-10"),
                customer(tenant, "c3", orders=2, net=150, last="2025-03-02"),
                customer(tenant, "c4", orders=0, net=0, last=None),
                customer(tenant, "c5", orders=1, net=100, last="2024-06-01"),
                customer(tenant, "c6", orders=1, net=0, last="2024-06-01"),  # refunded in full
            ],
        )
        # The same customers by day (what an as-of lifetime reads), and the month's active customers.
        await session.execute(
            insert(CustomerDay),
            [
                {"tenant_id": tenant, "customer_id": c, "day": date.fromisoformat(d), "orders": n, "net_revenue": net}
                for c, d, n, net in (
                    ("c1", "2025-03-02", 3, 300),
                    ("c2", "2025-02-10", 1, 50),
                    ("c3", "2025-03-02", 2, 150),
                    ("c5", "2024-06-01", 1, 100),
                    ("c6", "2024-06-01", 1, 0),
                )
            ],
        )
        await session.execute(
            insert(PeriodActive).values(tenant_id=tenant, period="month", start=date(2025, 3, 1), customers=4)
        )
        # The month's latest NPS answers as the engagement rows below give them (c1 10, c2 5, c3 9), efforts 2, 6.
        await session.execute(
            insert(PeriodSurveys).values(
                tenant_id=tenant,
                period="month",
                start=date(2025, 3, 1),
                responses=3,
                promoters=2,
                detractors=1,
                effort_sum=8,
                efforts=2,
            )
        )
        await session.execute(
            insert(Engagement),
            [
                survey(tenant, "c1", 3, at("2025-03-02")),
                survey(tenant, "c1", 10, at("2025-03-05")),  # c1's latest: a promoter
                survey(tenant, "c2", 9, at("2025-02-20")),  # before the month
                survey(tenant, "c2", 5, at("2025-03-03")),  # a detractor
                survey(tenant, "c3", 9, at("2025-03-04")),  # a promoter
                survey(tenant, "c4", 0, at("2025-04-01", hour=0)),  # the next month's first instant
            ],
        )
        await session.execute(
            insert(CustomerSegment),
            [
                segment_row(tenant, "c1", "ambassador", "420.00", 0.95),
                segment_row(tenant, "c2", "at_risk", "12.50", 0.31),
                segment_row(tenant, "c3", "ambassador", "180.00", 0.88),
            ],
        )
        await session.execute(
            insert(TenantConfig).values(tenant_id=tenant, reporting_currency="EUR", point_value=Decimal("0.5"))
        )
        await session.execute(
            insert(RedemptionsDaily),
            [
                redeemed(
                    tenant,
                    "2025-03-02",
                    "mug",
                    "gift",
                    reserved=2,
                    confirmed=1,
                    cancelled=1,
                    points_reserved=200,
                    points_spent=100,
                ),
                redeemed(tenant, "2025-03-05", "mug", "gift", confirmed=1, points_spent=100),
                redeemed(
                    tenant,
                    "2025-03-03",
                    "cpn",
                    "coupon",
                    reserved=1,
                    confirmed=1,
                    coupons_consumed=1,
                    points_reserved=300,
                    points_spent=300,
                ),
                redeemed(
                    tenant,
                    "2025-03-04",
                    "disc",
                    "discount",
                    reserved=1,
                    confirmed=1,
                    points_reserved=200,
                    points_spent=200,
                ),
                redeemed(tenant, "2025-03-10", "disc", "discount", refunded=1, points_returned=200),
                redeemed(tenant, "2025-02-01", "vip", "privilege"),
                redeemed(tenant, "2025-03-20", "mug", "gift", reserved=5, points_reserved=500),
            ],
        )
        await session.execute(
            insert(RedemptionValuesDaily),
            [
                valued(tenant, "2025-03-02", "mug", "gift", "EUR", "12.50"),
                valued(tenant, "2025-03-05", "mug", "gift", "EUR", "12.50"),
                valued(tenant, "2025-03-03", "cpn", "coupon", "EUR", "10.00"),
                valued(tenant, "2025-03-04", "disc", "discount", "EUR", "2.00"),
                valued(tenant, "2025-02-01", "vip", "privilege", "USD", "0.00"),
                valued(tenant, "2025-03-20", "mug", "gift", "USD", "99.00"),
            ],
        )
