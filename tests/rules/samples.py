"""Ruleset documents and event builders the rules tests share."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from shared.events import (
    CloudEvent,
    CustomEngagement,
    PurchaseCompleted,
    PurchaseLine,
    PurchaseRefunded,
    ReferralConverted,
    ReviewPosted,
    make_event,
)

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


def doc(*rules: dict[str, Any], **top: Any) -> dict[str, Any]:
    """A minimal valid document: EUR at 1 point per euro, floor rounding, plus the given rules."""
    document: dict[str, Any] = {"currencies": {"EUR": {"points_per_unit": "1"}}, "rules": list(rules)}
    document.update(top)
    return document


BASE = {"id": "base", "kind": "points_per_unit", "priority": 100}

TIERS = {
    "basis": "spend_12m",
    "review_every_days": 90,
    "downgrade": "one_level",
    "levels": [
        {"name": "Bronze", "threshold": "0", "multiplier": "1"},
        {"name": "Silver", "threshold": "1000", "multiplier": "1.5"},
        {"name": "Gold", "threshold": "5000", "multiplier": "2"},
    ],
}


def line(sku: str, category: str, qty: str, price: str, **kw: Any) -> PurchaseLine:
    return PurchaseLine(sku=sku, category=category, quantity=Decimal(qty), unit_price=Decimal(price), **kw)


def order(
    tenant: str,
    customer: str,
    lines: list[PurchaseLine],
    *,
    at: datetime = T0,
    currency: str = "EUR",
    order_id: str | None = None,
    net: str | None = None,
) -> CloudEvent[Any]:
    total = sum((ln.quantity * ln.unit_price - ln.discount for ln in lines), Decimal(0))
    amount = Decimal(net) if net is not None else total
    data = PurchaseCompleted(
        order_id=order_id or f"SO-{uuid.uuid4().hex[:10]}",
        customer_id=customer,
        member_id="buyer-1",
        channel="webshop",
        currency=currency,
        net_amount=amount,
        gross_amount=(amount * Decimal("1.21")).quantize(Decimal("0.0001")),
        lines=lines,
        ordered_at=at,
    )
    return make_event("purchase.completed", data, tenant_id=tenant, source="tests", time=at)


def refund(
    tenant: str, customer: str, order_id: str, amount: str, *, at: datetime = T0, currency: str = "EUR"
) -> CloudEvent[Any]:
    data = PurchaseRefunded(
        refund_id=f"RF-{uuid.uuid4().hex[:8]}",
        original_order_id=order_id,
        customer_id=customer,
        currency=currency,
        amount=Decimal(amount),
    )
    return make_event("purchase.refunded", data, tenant_id=tenant, source="tests", time=at)


def review(tenant: str, customer: str, *, at: datetime = T0, rating: int = 5) -> CloudEvent[Any]:
    data = ReviewPosted(review_id=f"RV-{uuid.uuid4().hex[:8]}", customer_id=customer, rating=rating)
    return make_event("review.posted", data, tenant_id=tenant, source="tests", time=at)


def referral(tenant: str, referrer: str, referred: str, *, at: datetime = T0) -> CloudEvent[Any]:
    data = ReferralConverted(
        referral_id=f"RF-{uuid.uuid4().hex[:8]}", customer_id=referrer, referred_customer_id=referred
    )
    return make_event("referral.converted", data, tenant_id=tenant, source="tests", time=at)


def custom(tenant: str, customer: str, name: str, *, at: datetime = T0, **fields: Any) -> CloudEvent[Any]:
    data = CustomEngagement(customer_id=customer, **fields)
    return make_event(f"custom.{name}", data, tenant_id=tenant, source="tests", time=at)


# 428 bytes of YAML whose `rules` expand to 9**9 (387 million) values through nested aliases: the
# shape of issue 10's 433-byte document (10 s and 2.7 GB to validate before anchors were refused).
ALIAS_BOMB = (
    "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
    + "currencies: {EUR: {points_per_unit: 1}}\nrules: *i\n"
)

# Five nested comprehensions over literal lists: 100,000 steps per event (seconds, with CEL's accumulators).
NESTED_COMPREHENSIONS = (
    "[0,1,2,3,4,5,6,7,8,9].all(a, [0,1,2,3,4,5,6,7,8,9].all(b, [0,1,2,3,4,5,6,7,8,9].all(c, "
    "[0,1,2,3,4,5,6,7,8,9].all(d, [0,1,2,3,4,5,6,7,8,9].all(e, a + b + c + d + e >= 0)))))"
)
