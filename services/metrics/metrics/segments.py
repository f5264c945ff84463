"""Value segments: the pure classification of one customer from its facts and the tenant's thresholds.

No I/O: the service loads `CustomerFacts` (metrics' own tables and the CLV prediction), `classify` decides,
the service stores the result and publishes a change. Every customer with at least one purchase gets
exactly one segment; the first rule that matches wins (the precedence):

1. `leaver`: no purchase within the activity window (`window_days`, the tenant's), or the latest NPS answer
   was a detractor's (0-6) and no purchase followed it within `detractor_silence_days`.
2. `at_risk`: active, but buying well below its own rhythm (at least `rhythm_min_orders` orders and the
   days since the last purchase more than `rhythm_factor` x the median gap between its purchases, the
   gap taken as at least one day), or P(alive) of the latest CLV prediction under `p_alive_min`.
3. `new`: the first purchase lies within `new_days`.
4. `ambassador`: a promoter (latest NPS answer 9-10), a referral or a review within `advocacy_days`.
5. `price_shopper`: at least `price_shopper_min_discounted_share` of its orders with lines carried a
   discount and it buys fewer than `price_shopper_max_orders_per_year` orders a year (orders over its tenure, a tenure
   under a year counted as one year).
6. `loyal_passive`: everyone else who is active: buys regularly, no advocacy ("you ask, we deliver").

Time alone (no new events) only moves a customer on: `new` is left for good, `at_risk` leads only to
`leaver`, and `leaver` stays (until the next purchase).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import pairwise
from typing import TypeAlias, get_args

from pydantic import BaseModel, ConfigDict, Field

from shared.events import SegmentName

Segment: TypeAlias = SegmentName

SEGMENTS: tuple[Segment, ...] = get_args(Segment)
PROMOTER_MIN_NPS = 9
DETRACTOR_MAX_NPS = 6
DEFAULT_WINDOW_DAYS = 365
MAX_DAYS = 3650


class SegmentThresholds(BaseModel):
    """The tenant's segment rules; stored in its configuration, these defaults otherwise."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    new_days: int = Field(90, ge=1, le=MAX_DAYS, description="A first purchase this recent makes `new`")
    advocacy_days: int = Field(
        365, ge=1, le=MAX_DAYS, description="A promoter answer, referral or review this recent makes `ambassador`"
    )
    rhythm_factor: float = Field(
        2.0, ge=1.0, le=100.0, description="`at_risk` when the days since the last purchase exceed this x median gap"
    )
    rhythm_min_orders: int = Field(3, ge=2, le=1000, description="Orders needed before a customer has a rhythm")
    p_alive_min: float = Field(
        0.3, ge=0.0, le=1.0, description="`at_risk` when the latest prediction's P(alive) is under this"
    )
    detractor_silence_days: int = Field(
        90, ge=1, le=MAX_DAYS, description="A detractor without a purchase this long after the answer is a `leaver`"
    )
    price_shopper_min_discounted_share: float = Field(
        0.5, gt=0.0, le=1.0, description="Share of orders (with lines) carrying a discount that makes a price shopper"
    )
    price_shopper_max_orders_per_year: float = Field(
        4.0, ge=0.0, le=10_000.0, description="Price shoppers buy fewer orders a year than this"
    )


@dataclass(frozen=True, slots=True)
class CustomerFacts:
    """What the classification reads of one customer (with at least one purchase)."""

    customer_id: str
    first_purchase_at: datetime
    last_purchase_at: datetime
    orders: int
    median_gap: timedelta | None = None  # between consecutive purchases; None under two purchases
    priced_orders: int = 0  # orders that had lines (whose discount is known)
    discounted_orders: int = 0  # of those, orders with a discount on any line
    last_nps: int | None = None
    last_nps_at: datetime | None = None
    last_review_at: datetime | None = None
    last_referral_at: datetime | None = None
    p_alive: float | None = None


@dataclass(frozen=True, slots=True)
class Classification:
    segment: Segment
    reason: str


def median_gap(times: Sequence[datetime]) -> timedelta | None:
    """The median gap between consecutive purchase times (any order); None under two purchases."""
    ordered = sorted(times)
    if len(ordered) < 2:
        return None
    gaps = sorted(b - a for a, b in pairwise(ordered))
    middle = len(gaps) // 2
    return gaps[middle] if len(gaps) % 2 else (gaps[middle - 1] + gaps[middle]) / 2


def _days(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 86400:.1f}"


def _within(at: datetime | None, now: datetime, days: int) -> bool:
    return at is not None and now - at <= timedelta(days=days)


def classify(
    facts: CustomerFacts, thresholds: SegmentThresholds, *, now: datetime, window_days: int = DEFAULT_WINDOW_DAYS
) -> Classification:
    t = thresholds
    since_last = now - facts.last_purchase_at
    if since_last > timedelta(days=window_days):
        return Classification("leaver", f"no purchase for {_days(since_last)} days (activity window {window_days})")
    if (
        facts.last_nps is not None
        and facts.last_nps_at is not None
        and facts.last_nps <= DETRACTOR_MAX_NPS
        and facts.last_purchase_at <= facts.last_nps_at
        and now - facts.last_nps_at > timedelta(days=t.detractor_silence_days)
    ):
        return Classification(
            "leaver",
            f"detractor (NPS {facts.last_nps}) without a purchase for {_days(now - facts.last_nps_at)} days "
            f"since the answer (limit {t.detractor_silence_days})",
        )
    if facts.orders >= t.rhythm_min_orders and facts.median_gap is not None:
        gap = max(facts.median_gap, timedelta(days=1))
        # In seconds: a timedelta times a float rounds to microseconds, seconds compare exactly as documented.
        if since_last.total_seconds() > gap.total_seconds() * t.rhythm_factor:
            return Classification(
                "at_risk",
                f"{_days(since_last)} days since the last purchase, more than {t.rhythm_factor:g} x "
                f"the median gap of {_days(gap)} days",
            )
    if facts.p_alive is not None and facts.p_alive < t.p_alive_min:
        return Classification("at_risk", f"P(alive) {facts.p_alive:.2f} under {t.p_alive_min:g}")
    if now - facts.first_purchase_at <= timedelta(days=t.new_days):
        return Classification("new", f"first purchase {_days(now - facts.first_purchase_at)} days ago")
    advocacy = []
    if (
        facts.last_nps is not None
        and facts.last_nps >= PROMOTER_MIN_NPS
        and _within(facts.last_nps_at, now, t.advocacy_days)
    ):
        advocacy.append(f"promoter (NPS {facts.last_nps})")
    if _within(facts.last_referral_at, now, t.advocacy_days):
        advocacy.append("referrer")
    if _within(facts.last_review_at, now, t.advocacy_days):
        advocacy.append("reviewer")
    if advocacy:
        return Classification("ambassador", f"{', '.join(advocacy)} within {t.advocacy_days} days")
    tenure_years = max(1.0, (now - facts.first_purchase_at).total_seconds() / (365 * 86400))
    per_year = facts.orders / tenure_years
    share = facts.discounted_orders / facts.priced_orders if facts.priced_orders else 0.0
    if share >= t.price_shopper_min_discounted_share and per_year < t.price_shopper_max_orders_per_year:
        return Classification("price_shopper", f"{share:.0%} of orders discounted, {per_year:.1f} orders a year")
    return Classification("loyal_passive", f"active buyer, {facts.orders} orders, no advocacy")
