"""A property through the service and PostgreSQL: the aggregates it maintains batch by batch, fed purchases
and refunds in any order (refunds before their orders, redeliveries, history after the present, random
batch cuts, a change of the activity window at the end) give the KPIs that a reference implementation here
recomputes from the raw events by the definitions."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from metrics import schemas
from metrics.domain import next_start, period_start
from metrics.service import metrics_service
from shared.consumer import Inbound
from shared.db import create_engine, create_sessionmaker, transaction
from shared.events import CloudEvent, PurchaseCompleted, PurchaseRefunded, make_event
from tests.conftest import database_url

pytestmark = pytest.mark.db

ORIGIN = date(2025, 1, 1)
RANGE = (date(2025, 1, 1), date(2025, 7, 1))


def inbound(events: list[CloudEvent[Any]]) -> list[Inbound[Any]]:
    return [Inbound(e, "purchases", 0, i, cast("Any", None)) for i, e in enumerate(events)]


def percent(part: int, whole: int) -> Decimal | None:
    return None if whole == 0 else (Decimal(part) * 100 / Decimal(whole)).quantize(Decimal("0.01"), ROUND_HALF_EVEN)


def reference(
    orders: dict[str, tuple[str, date, Decimal]], refunds: dict[str, tuple[str, Decimal]], window: int
) -> list[dict[str, Any]]:
    refunded: dict[str, Decimal] = {}
    for order_id, amount in refunds.values():
        if order_id in orders:
            refunded[order_id] = refunded.get(order_id, Decimal(0)) + amount
    net = {o: v[2] - min(refunded.get(o, Decimal(0)), v[2]) for o, v in orders.items()}
    days: dict[str, set[date]] = {}
    for customer, day, _ in orders.values():
        days.setdefault(customer, set()).add(day)

    def active(lo: date, hi: date) -> int:  # customers with a purchase in [lo, hi]
        return sum(1 for ds in days.values() if any(lo <= d <= hi for d in ds))

    out = []
    start = period_start("month", RANGE[0])
    while start < RANGE[1]:
        end = next_start("month", start)
        last = end - timedelta(days=1)
        before = start - timedelta(days=1)
        s = active(before - timedelta(days=window - 1), before)
        e = active(last - timedelta(days=window - 1), last)
        n = sum(1 for ds in days.values() if start <= min(ds) < end)
        in_period = [o for o, v in orders.items() if start <= v[1] < end]
        crr = percent(e - n, s)
        out.append(
            {
                "start": start,
                "customers_start": s,
                "customers_end": e,
                "new_customers": n,
                "crr": crr,
                "active_customers": active(start - timedelta(days=window - 1), last),
                "buyers": active(start, last),
                "orders": len(in_period),
                "net_revenue": sum((net[o] for o in in_period), Decimal(0)),
            }
        )
        start = end
    return out


order_spec = st.tuples(
    st.integers(min_value=0, max_value=5),  # customer
    st.integers(min_value=-400, max_value=180),  # day from ORIGIN (history before the range)
    st.integers(min_value=1, max_value=500),  # amount
)


# Each example is a fresh tenant in PostgreSQL; shrinking a failure would take minutes, so it is skipped.
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
# A refund larger than its order, another before it, one of an order that never comes, a window change.
@example(
    [(0, -10, 40), (0, 20, 100), (1, 95, 30)],
    [(0, 500, True), (1, 30, True), (2, 5, False)],
    30,
    400,
    random.Random(1),
)
@given(
    st.lists(order_spec, min_size=1, max_size=25),
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=30), st.integers(min_value=1, max_value=600), st.booleans()),
        max_size=8,
    ),
    st.sampled_from([30, 90, 365]),
    st.sampled_from([None, 45, 400]),
    st.randoms(use_true_random=False),
)
def test_incremental_aggregates_equal_a_recomputation(
    specs: list[tuple[int, int, int]],
    refund_specs: list[tuple[int, int, bool]],
    window: int,
    new_window: int | None,
    rnd: random.Random,
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:12]}"
    events: list[CloudEvent[Any]] = []
    orders: dict[str, tuple[str, date, Decimal]] = {}
    for i, (customer, offset, amount) in enumerate(specs):
        day = ORIGIN + timedelta(days=offset)
        order_id = f"o{i}"
        orders[order_id] = (f"c{customer}", day, Decimal(amount))
        data = PurchaseCompleted(
            order_id=order_id,
            customer_id=f"c{customer}",
            channel="erp",
            currency="EUR",
            net_amount=Decimal(amount),
            gross_amount=Decimal(amount),
            ordered_at=datetime(day.year, day.month, day.day, 9, tzinfo=UTC),
        )
        events.append(make_event("purchase.completed", data, tenant_id=tenant, source="tests"))
    refunds: dict[str, tuple[str, Decimal]] = {}
    for j, (index, amount, known) in enumerate(refund_specs):
        # An unknown order never comes: its refund is kept and never applied.
        order_id = f"o{index % len(specs)}" if known else f"unknown-{index}"
        buyer = orders[order_id][0] if order_id in orders else "c0"
        refunds[f"r{j}"] = (order_id, Decimal(amount))
        data_r = PurchaseRefunded(
            refund_id=f"r{j}", original_order_id=order_id, customer_id=buyer, currency="EUR", amount=Decimal(amount)
        )
        events.append(make_event("purchase.refunded", data_r, tenant_id=tenant, source="tests"))
    events += rnd.sample(events, k=len(events) // 3)  # redeliveries
    rnd.shuffle(events)
    cuts = sorted(rnd.sample(range(1, len(events)), k=min(3, len(events) - 1))) if len(events) > 1 else []
    batches = [events[a:b] for a, b in zip([0, *cuts], [*cuts, len(events)], strict=True)]
    final_window = new_window or window

    async def run() -> tuple[schemas.KpiList, schemas.Lifetime]:
        engine = create_engine(database_url("metrics"), pool_size=1)
        sessions = create_sessionmaker(engine)
        try:
            async with transaction(sessions) as session:
                update = schemas.TenantConfigUpdate(activity_window_days=window, reporting_currency="EUR")
                await metrics_service.put_config(session, tenant, update)
            for batch in batches:
                async with transaction(sessions) as session:
                    assert await metrics_service.handle_purchases(session, inbound(batch)) == []
            if new_window is not None:
                async with transaction(sessions) as session:
                    update = schemas.TenantConfigUpdate(activity_window_days=new_window, reporting_currency="EUR")
                    await metrics_service.put_config(session, tenant, update)
            async with sessions() as session:
                kpis = await metrics_service.kpis(session, tenant, start=RANGE[0], end=RANGE[1], kind="month")
                lifetime = await metrics_service.lifetime(session, tenant, None)
            return kpis, lifetime
        finally:
            await engine.dispose()

    kpis, lifetime = asyncio.run(run())
    expected = reference(orders, refunds, final_window)
    got = [{k: getattr(item, k) for k in expected[0]} | {"start": item.start} for item in kpis.items]
    assert got == expected
    per_customer: dict[str, int] = {}
    for owner, _, _ in orders.values():
        per_customer[owner] = per_customer.get(owner, 0) + 1
    assert lifetime.customers == len(per_customer)
    assert lifetime.orders == len(orders)
    assert lifetime.repeat_purchase_rate == percent(sum(1 for n in per_customer.values() if n >= 2), len(per_customer))
