"""Redemptions per reward and kind, pure: no I/O, tested without a database.

A redemption order's changes (`redemption.changed` on loyalty.rewards.v1) decide what it adds to the sums per
tenant, UTC day (of the change's `occurred_at`), reward and kind (`footprint`). The service keeps those sums
and, when a batch brings new changes of an order, adds the order's footprint after minus before
(`domain.difference`), as it does for a customer's purchase days: the sums equal a recomputation from the
changes whatever order, and in whatever batches, the changes arrive.

What an order counts:
- `reserved` (and its points), `cancelled`, `expired`, `coupons_consumed`: its change of that name (each at
  most once per order: the business ids of `shared.events.business_id`);
- `confirmed`, `points_spent` and the money value (per currency): once, on its `confirmed` change or, without
  one, on its coupon's consumption (consuming the coupon of a reserved order confirms it and sends only
  `coupon_consumed`);
- `refunded`: the refund that gave back all its points (state `refunded`); `points_returned`: what each refund
  gave back, the increase of the running `points_returned` over the order's refunds in time order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Final

from metrics.domain import difference

KINDS: Final = ("gift", "privilege", "discount", "coupon")
# The additive counters of metrics.redemptions_daily, in the order the repository writes them.
COUNTERS: Final = (
    "reserved",
    "confirmed",
    "cancelled",
    "expired",
    "refunded",
    "coupons_consumed",
    "points_reserved",
    "points_spent",
    "points_returned",
)
_COUNTED_CHANGE: Final = {
    "reserved": "reserved",
    "cancelled": "cancelled",
    "expired": "expired",
    "coupon_consumed": "coupons_consumed",
}

# (day, reward id, kind, counter) and (day, reward id, kind, currency).
CountKey = tuple[date, str, str, str]
ValueKey = tuple[date, str, str, str]


@dataclass(frozen=True, slots=True)
class OrderFacts:
    """What every change of one order repeats: the reward, its kind, the points and the money value."""

    reward_id: str
    reward_kind: str
    points: int
    value: Decimal | None
    currency: str | None


@dataclass(frozen=True, slots=True)
class Change:
    occurred_at: datetime
    event_id: str
    change: str
    state: str
    points_returned: int


@dataclass
class Footprint:
    counts: dict[CountKey, int] = field(default_factory=dict)
    values: dict[ValueKey, Decimal] = field(default_factory=dict)

    def count(self, day: date, order: OrderFacts, counter: str, n: int) -> None:
        key = (day, order.reward_id, order.reward_kind, counter)
        self.counts[key] = self.counts.get(key, 0) + n


def footprint(order: OrderFacts, changes: Iterable[Change]) -> Footprint:
    """What one order adds to the sums, from all its changes known so far (in any order)."""
    out = Footprint()
    ordered = sorted(changes, key=lambda c: (c.occurred_at, c.event_id))
    for c in ordered:
        day = c.occurred_at.date()
        counter = _COUNTED_CHANGE.get(c.change)
        if counter is not None:
            out.count(day, order, counter, 1)
        if c.change == "reserved":
            out.count(day, order, "points_reserved", order.points)
        elif c.change == "refunded" and c.state == "refunded":
            out.count(day, order, "refunded", 1)
    confirming = [c for c in ordered if c.change == "confirmed"] or [
        c for c in ordered if c.change == "coupon_consumed"
    ]
    if confirming:
        day = confirming[0].occurred_at.date()
        out.count(day, order, "confirmed", 1)
        out.count(day, order, "points_spent", order.points)
        if order.value is not None and order.currency is not None:
            out.values[(day, order.reward_id, order.reward_kind, order.currency)] = order.value
    # Running totals, so a refund's share is what it added; a clock step back never makes a negative one.
    returned = 0
    for c in sorted((c for c in ordered if c.change == "refunded"), key=lambda c: (c.occurred_at, c.points_returned)):
        if c.points_returned > returned:
            out.count(c.occurred_at.date(), order, "points_returned", c.points_returned - returned)
            returned = c.points_returned
    out.counts = {k: v for k, v in out.counts.items() if v}
    return out


def conflict(order_id: str, known: OrderFacts, claimed: OrderFacts) -> str | None:
    """Why a change naming `claimed` cannot belong to the order known as `known`, or None when it can."""
    if claimed == known:
        return None

    def shown(facts: OrderFacts) -> str:
        value = "no value" if facts.value is None else f"value {facts.value} {facts.currency}"
        return f"reward {facts.reward_id!r} ({facts.reward_kind}, {facts.points} points, {value})"

    return f"redemption order {order_id!r} is {shown(known)} in earlier events; this event says {shown(claimed)}"


@dataclass
class Figures:
    """A reward's (or a kind's) sums over a window: COUNTERS in order, and the money value per currency."""

    counts: list[int] = field(default_factory=lambda: [0] * len(COUNTERS))
    values: dict[str, Decimal] = field(default_factory=dict)

    def add(self, counts: Sequence[int], values: Mapping[str, Decimal]) -> None:
        self.counts = [a + int(b) for a, b in zip(self.counts, counts, strict=True)]
        for currency, value in values.items():
            self.values[currency] = self.values.get(currency, Decimal(0)) + value


def summarize(
    counts: Iterable[tuple[str, str, Sequence[int]]], values: Iterable[tuple[str, str, str, Decimal]]
) -> tuple[dict[tuple[str, str], Figures], dict[str, Figures]]:
    """Per (reward, kind) and per kind (every kind, zeros included): the sums of the window's rows, given as
    (reward, kind, COUNTERS) and (reward, kind, currency, value)."""
    rewards: dict[tuple[str, str], Figures] = {}
    for reward, kind, row in counts:
        rewards.setdefault((reward, kind), Figures()).add(row, {})
    for reward, kind, currency, value in values:
        if value:
            rewards.setdefault((reward, kind), Figures()).add([0] * len(COUNTERS), {currency: value})
    # A day whose change moved to another day keeps zeros: a reward with nothing left in the window is not listed.
    rewards = {k: f for k, f in sorted(rewards.items()) if any(f.counts) or any(f.values.values())}
    kinds = {kind: Figures() for kind in KINDS}
    for (_, kind), figures in rewards.items():
        kinds.setdefault(kind, Figures()).add(figures.counts, figures.values)
    return rewards, kinds


@dataclass
class Sums:
    """What a batch adds to redemptions_daily, per (tenant, day, reward, kind), and to redemption_values_daily,
    per (tenant, day, reward, kind, currency)."""

    counts: dict[tuple[str, date, str, str], list[int]] = field(default_factory=dict)
    values: dict[tuple[str, date, str, str, str], Decimal] = field(default_factory=dict)

    def add_order(self, tenant: str, order: OrderFacts, before: Sequence[Change], new: Sequence[Change]) -> None:
        """Adds the order's footprint with its `new` changes minus the one with only the changes `before`."""
        was, now = footprint(order, before), footprint(order, [*before, *new])
        for (day, reward, kind, counter), n in difference(now.counts, was.counts).items():
            row = self.counts.setdefault((tenant, day, reward, kind), [0] * len(COUNTERS))
            row[_INDEX[counter]] += n
        for (day, reward, kind, currency), value in difference(now.values, was.values).items():
            key = (tenant, day, reward, kind, currency)
            self.values[key] = self.values.get(key, Decimal(0)) + value


_INDEX: Final = {name: i for i, name in enumerate(COUNTERS)}
