"""Event builders for tests; every argument can be overridden."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from shared.events import CloudEvent, EarnPoints, PurchaseCompleted, PurchaseLine, RedemptionChanged, make_event


def purchase(
    tenant: str, customer: str = "cust-1", *, net: str = "100.00", currency: str = "EUR", **overrides: Any
) -> CloudEvent[Any]:
    fields: dict[str, Any] = {
        "order_id": f"SO-{uuid.uuid4().hex[:10]}",
        "customer_id": customer,
        "member_id": "buyer-1",
        "channel": "webshop",
        "currency": currency,
        "net_amount": Decimal(net),
        "gross_amount": (Decimal(net) * Decimal("1.21")).quantize(Decimal("0.0001")),
        "lines": [PurchaseLine(sku="SKU-1", category="tools", quantity=Decimal(1), unit_price=Decimal(net))],
    }
    fields.update(overrides)
    return make_event("purchase.completed", PurchaseCompleted(**fields), tenant_id=tenant, source="tests")


def earn(tenant: str, customer: str = "cust-1", *, points: int = 10, **overrides: Any) -> CloudEvent[Any]:
    fields: dict[str, Any] = {
        "command_id": f"cmd-{uuid.uuid4().hex[:12]}",
        "customer_id": customer,
        "points": points,
        "source_event_id": f"evt-{uuid.uuid4().hex[:12]}",
    }
    fields.update(overrides)
    return make_event("points.earn", EarnPoints(**fields), tenant_id=tenant, source="tests")


def redemption(
    tenant: str, order_id: str, change: str, *, customer: str = "cust-1", **overrides: Any
) -> CloudEvent[Any]:
    """A `redemption.changed` as the ledger's rewards outbox publishes it (a gift of 100 points, reserved)."""
    fields: dict[str, Any] = {
        "order_id": order_id,
        "customer_id": customer,
        "reward_id": "gift-1",
        "reward_kind": "gift",
        "change": change,
        "state": {"coupon_consumed": "confirmed"}.get(change, change),
        "points": 100,
    }
    fields.update(overrides)
    data = RedemptionChanged(**fields)
    return make_event("redemption.changed", data, tenant_id=tenant, source="loyalty/ledger", time=data.occurred_at)
