"""The chaos run's event stream and the reference calculation of what it must earn.

`Stream` draws a seeded sequence of purchases, partial and full refunds and engagement events for a set of
customers; `Reference` computes, independently of the rules engine, what the ruleset `RULESET` awards for
them: a point per whole euro of net amount (floor), a welcome bonus on a customer's first purchase, fixed
points per review and per attended event, and for a refund the refunded share of the order's award,
`round_half_up(award * cumulative refunded / net)` minus what earlier refunds of the order took back.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_FLOOR, ROUND_HALF_UP, Decimal
from typing import Any

from shared.events import (
    CloudEvent,
    EventAttended,
    PurchaseCompleted,
    PurchaseLine,
    PurchaseRefunded,
    ReviewPosted,
    make_event,
    utcnow,
)
from shared.topics import ENGAGEMENT, PURCHASES

WELCOME_BONUS = 50
REVIEW_POINTS = 20
ATTENDANCE_POINTS = 25
CENT = Decimal("0.01")

RULESET: dict[str, Any] = {
    "document": {
        "name": "chaos",
        "currencies": {"EUR": {"points_per_unit": "1"}},
        "rounding": "floor",
        "rules": [
            {"id": "base", "kind": "points_per_unit", "priority": 100},
            {"id": "welcome", "kind": "bonus", "points": WELCOME_BONUS, "when": "customer.purchase_count == 0"},
            {"id": "review", "kind": "engagement", "on": "review.posted", "points": REVIEW_POINTS},
            {"id": "fair", "kind": "engagement", "on": "event.attended", "points": ATTENDANCE_POINTS},
        ],
    }
}


@dataclass
class Order:
    order_id: str
    customer: str
    net: Decimal
    award: int
    refunded: Decimal = Decimal(0)
    clawed: int = 0

    @property
    def remaining(self) -> Decimal:
        return self.net - self.refunded


@dataclass
class Reference:
    """What the ruleset gives for the events sent so far, per customer, and what the ledger must hold."""

    points: Counter[str] = field(default_factory=Counter)
    earns: Counter[str] = field(default_factory=Counter)  # earn commands per customer (awards above 0)
    clawbacks: Counter[str] = field(default_factory=Counter)  # clawback commands per customer
    orders: dict[str, Order] = field(default_factory=dict)
    buyers: set[str] = field(default_factory=set)
    purchases: int = 0
    revenue: Decimal = Decimal(0)  # the orders' net amounts as sent
    refunded: Decimal = Decimal(0)  # the refunds' amounts (never more than their order's)
    refunds: int = 0
    engagements: int = 0
    issued: int = 0  # points of every earn command
    clawed: int = 0  # points of every clawback command

    def purchase(self, customer: str, order_id: str, net: Decimal) -> None:
        award = int(net.to_integral_value(ROUND_FLOOR)) + (0 if customer in self.buyers else WELCOME_BONUS)
        self.buyers.add(customer)
        self.orders[order_id] = Order(order_id, customer, net, award)
        self.purchases += 1
        self.revenue += net
        self._earn(customer, award)

    def refund(self, order_id: str, amount: Decimal) -> None:
        order = self.orders[order_id]
        assert 0 < amount <= order.remaining, (order, amount)
        order.refunded += amount
        self.refunded += amount
        share = min(order.refunded / order.net, Decimal(1))
        target = int((order.award * share).to_integral_value(ROUND_HALF_UP))
        claw = min(target, order.award) - order.clawed
        order.clawed += claw
        self.refunds += 1
        if claw > 0:
            self.clawed += claw
            self.points[order.customer] -= claw
            self.clawbacks[order.customer] += 1

    def engagement(self, customer: str, points: int) -> None:
        self.engagements += 1
        self._earn(customer, points)

    def _earn(self, customer: str, points: int) -> None:
        self.points[customer] += points
        if points > 0:
            self.issued += points
            self.earns[customer] += 1


@dataclass
class Sent:
    topic: str
    event: CloudEvent[Any]


class Stream:
    """A seeded stream of events for `customers` customers of one tenant, with its reference kept in step.

    `next()` draws an event and records it in the reference at once: the caller sends each event before
    asking for the next, so a refund always follows its order on the customer's partition."""

    def __init__(self, tenant: str, *, customers: int, seed: int) -> None:
        self.tenant = tenant
        self.rng = random.Random(seed)
        self.customers = [f"cust-{i:04d}" for i in range(customers)]
        self.reference = Reference()
        self.kinds: Counter[str] = Counter()

    def _id(self, prefix: str) -> str:
        return f"{prefix}-{uuid.UUID(int=self.rng.getrandbits(128), version=4).hex[:16]}"

    def next(self, now: datetime | None = None) -> Sent:
        roll = self.rng.random()
        refundable = [o for o in self.reference.orders.values() if o.remaining > 0]
        if roll < 0.15 and refundable:
            return self._refund(self.rng.choice(refundable), full=roll < 0.05, now=now)
        if roll < 0.25:
            return self._review(now)
        if roll < 0.30:
            return self._attendance(now)
        return self._purchase(now)

    def _purchase(self, now: datetime | None) -> Sent:
        customer = self.rng.choice(self.customers)
        lines = [
            PurchaseLine(
                sku=f"SKU-{self.rng.randrange(40)}",
                category=self.rng.choice(["tools", "paint", "safety", "fasteners"]),
                quantity=Decimal(self.rng.randint(1, 4)),
                unit_price=Decimal(self.rng.randint(100, 25_000)) * CENT,
            )
            for _ in range(self.rng.randint(1, 3))
        ]
        net = sum((line.quantity * line.unit_price for line in lines), Decimal(0))
        data = PurchaseCompleted(
            order_id=self._id("SO"),
            customer_id=customer,
            channel="webshop",
            currency="EUR",
            net_amount=net,
            gross_amount=(net * Decimal("1.21")).quantize(CENT),
            lines=lines,
        )
        self.reference.purchase(customer, data.order_id, net)
        self.kinds["purchase"] += 1
        return self._event(PURCHASES, "purchase.completed", data, now)

    def _refund(self, order: Order, *, full: bool, now: datetime | None) -> Sent:
        if full:
            amount = order.remaining
        else:
            amount = max(CENT, (order.remaining * Decimal(self.rng.randint(10, 60)) / 100).quantize(CENT))
            amount = min(amount, order.remaining)
        data = PurchaseRefunded(
            refund_id=self._id("RF"),
            original_order_id=order.order_id,
            customer_id=order.customer,
            currency="EUR",
            amount=amount,
        )
        self.reference.refund(order.order_id, amount)
        self.kinds["full refund" if order.remaining == 0 else "partial refund"] += 1
        return self._event(PURCHASES, "purchase.refunded", data, now)

    def _review(self, now: datetime | None) -> Sent:
        customer = self.rng.choice(self.customers)
        data = ReviewPosted(review_id=self._id("RV"), customer_id=customer, rating=self.rng.randint(1, 5))
        self.reference.engagement(customer, REVIEW_POINTS)
        self.kinds["review"] += 1
        return self._event(ENGAGEMENT, "review.posted", data, now)

    def _attendance(self, now: datetime | None) -> Sent:
        customer = self.rng.choice(self.customers)
        data = EventAttended(attendance_id=self._id("AT"), customer_id=customer, event_name="trade-fair")
        self.reference.engagement(customer, ATTENDANCE_POINTS)
        self.kinds["attendance"] += 1
        return self._event(ENGAGEMENT, "event.attended", data, now)

    def _event(self, topic: str, event_type: str, data: Any, now: datetime | None) -> Sent:
        event = make_event(
            event_type, data, tenant_id=self.tenant, source="chaos", event_id=self._id("ev"), time=now or utcnow()
        )
        return Sent(topic, event)
