"""Customer state and tiers: what the rules keep per customer, how an evaluated event or a refund changes it,
and the tier review (upgrades at once, downgrades on the review schedule)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from rules.engine.basics import ZERO, category_of, days, event_time, fmt, month_key, months_back, months_back_from
from rules.ruleset import Tiers
from shared.events import CloudEvent, PurchaseCompleted


# init=False, and an __init__ of its own: mypyc compiles it, while the one @dataclass generates runs
# interpreted (a state is built per row read). The decorator still gives it == and repr.
@dataclass(slots=True, init=False)
class CustomerSnapshot:
    """The state the rules keep per customer; evaluation reads it, `apply_*` change it."""

    customer_id: str
    purchase_count: int
    first_purchase_at: datetime | None
    last_purchase_at: datetime | None
    spend_by_month: dict[str, Decimal]
    points_by_month: dict[str, int]
    categories: set[str]
    tier: str | None
    tier_reviewed_at: datetime | None
    counters: dict[str, int]
    # The value segment the metrics service last announced (segment.changed); written only by that consumer.
    segment: str | None
    # The stored row's version (0: never stored). Not the rules' business: the repository writes a state only
    # over the version it was read at, so a copy kept between batches cannot overwrite a newer one.
    version: int = field(compare=False)

    def __init__(
        self,
        customer_id: str,
        purchase_count: int = 0,
        first_purchase_at: datetime | None = None,
        last_purchase_at: datetime | None = None,
        spend_by_month: dict[str, Decimal] | None = None,
        points_by_month: dict[str, int] | None = None,
        categories: set[str] | None = None,
        tier: str | None = None,
        tier_reviewed_at: datetime | None = None,
        counters: dict[str, int] | None = None,
        version: int = 0,
        segment: str | None = None,
    ) -> None:
        self.customer_id = customer_id
        self.purchase_count = purchase_count
        self.first_purchase_at = first_purchase_at
        self.last_purchase_at = last_purchase_at
        self.spend_by_month = {} if spend_by_month is None else spend_by_month
        self.points_by_month = {} if points_by_month is None else points_by_month
        self.categories = set() if categories is None else categories
        self.tier = tier
        self.tier_reviewed_at = tier_reviewed_at
        self.counters = {} if counters is None else counters
        self.version = version
        self.segment = segment

    # Plain loops, in the order sum() adds: compiled, they iterate the typed maps natively.
    def spend_12m(self, at: datetime) -> Decimal:
        months = months_back(at, 12)
        total = ZERO
        for month, spend in self.spend_by_month.items():
            if month in months:
                total += spend
        return total

    def points_12m(self, at: datetime) -> int:
        months = months_back(at, 12)
        total = 0
        for month, points in self.points_by_month.items():
            if month in months:
                total += points
        return total


def apply_event(
    state: CustomerSnapshot, event: CloudEvent[Any], *, spend_factor: Decimal, points: int, counters: Mapping[str, int]
) -> None:
    """Folds an evaluated event into the customer's state (after evaluation: rules see the state before)."""
    at = event_time(event)
    data = event.data
    month = month_key(at) if points or isinstance(data, PurchaseCompleted) else ""
    if isinstance(data, PurchaseCompleted):
        state.purchase_count += 1
        first, last = state.first_purchase_at, state.last_purchase_at
        state.first_purchase_at = at if first is None or at < first else first
        state.last_purchase_at = at if last is None or at > last else last
        state.spend_by_month[month] = state.spend_by_month.get(month, ZERO) + data.net_amount * spend_factor
        state.categories.update(map(category_of, data.lines))
    if points:
        state.points_by_month[month] = state.points_by_month.get(month, 0) + points
    for key, increment in counters.items():
        state.counters[key] = state.counters.get(key, 0) + increment
    _prune(state, at)


def _prune(state: CustomerSnapshot, at: datetime) -> None:
    # Only the last 13 months matter for rolling figures; counters of past periods are never read again.
    # The maps are rebuilt only when they hold something to drop (most events drop nothing).
    # A month key below the oldest kept one exists when the smallest key is below it.
    oldest, year = kept_from(at.year, at.month)
    if state.spend_by_month and min(state.spend_by_month) < oldest:
        state.spend_by_month = {k: v for k, v in state.spend_by_month.items() if k >= oldest}
    if state.points_by_month and min(state.points_by_month) < oldest:
        state.points_by_month = {k: v for k, v in state.points_by_month.items() if k >= oldest}
    for key in state.counters:
        if _period_year(key) < year:
            state.counters = {k: v for k, v in state.counters.items() if _period_year(k) >= year}
            break


def _period_year(counter_key: str) -> str:
    """The year a counter's period starts with: the period follows the key's last colon."""
    # What key.rpartition(":")[2][:4] gives, with one small string built instead of a tuple of three.
    start = counter_key.rfind(":") + 1
    return counter_key[start : start + 4]


@functools.lru_cache(maxsize=512)
def kept_from(year: int, month: int) -> tuple[str, str]:
    """The oldest month key kept and the oldest year a counter's period may start with."""
    return min(months_back_from(year, month, 13)), str(year - 1)


def apply_refund(state: CustomerSnapshot, ordered_at: datetime, amount: Decimal, spend_factor: Decimal) -> None:
    month = month_key(ordered_at)
    if month in state.spend_by_month:
        state.spend_by_month[month] -= amount * spend_factor


@dataclass(frozen=True)
class TierChange:
    previous: str | None
    tier: str
    reason: str


def review_tier(state: CustomerSnapshot, tiers: Tiers, at: datetime) -> TierChange | None:
    """Upgrades at once; downgrades only when a review is due, as far as the downgrade policy allows."""
    value = Decimal(state.points_12m(at)) if tiers.basis == "points_12m" else state.spend_12m(at)
    # One pass: the highest level whose threshold the value reaches, and the first level named as the
    # customer's tier (None: not a level of these tiers).
    qualified = 0
    current = None
    tier = state.tier
    for i, level in enumerate(tiers.levels):
        if value >= level.threshold:
            qualified = i
        if current is None and level.name == tier:
            current = i
    if current is not None and qualified == current:
        if state.tier_reviewed_at is None or at >= state.tier_reviewed_at + days(tiers.review_every_days):
            state.tier_reviewed_at = at  # a review that keeps the tier restarts the schedule
        return None
    names = [lv.name for lv in tiers.levels]
    basis = f"{tiers.basis} {fmt(value)}"  # only for a change: formatting is most of an unchanged review
    if current is None:
        change = TierChange(state.tier, names[qualified], f"initial tier: {basis} qualifies for {names[qualified]}")
    elif qualified > current:
        change = TierChange(
            state.tier, names[qualified], f"upgrade: {basis} ≥ {fmt(tiers.levels[qualified].threshold)}"
        )
    elif qualified < current:
        due = state.tier_reviewed_at is None or at >= state.tier_reviewed_at + days(tiers.review_every_days)
        if not due or tiers.downgrade == "never":
            return None
        target = current - 1 if tiers.downgrade == "one_level" else qualified
        change = TierChange(
            state.tier,
            names[target],
            f"review ({tiers.review_every_days}-day schedule): {basis} qualifies for {names[qualified]}; "
            f"downgrade policy {tiers.downgrade}",
        )
    else:  # qualified == current, handled above
        return None
    state.tier = change.tier
    state.tier_reviewed_at = at
    return change
