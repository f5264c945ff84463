"""Pure rewards rules: what a customer may redeem, and the redemption order's state machine. No I/O: the
rewards service loads the reward, the customer's context and the order, these functions decide, the
service saves (the points themselves move through the ledger's `Book`: a hold, its capture or void).

Order states and changes (docs/rewards.md):

    reserved --confirmed / coupon_consumed--> confirmed --refunded (all points back)--> refunded
    reserved --cancelled--> cancelled        confirmed --refunded (part)--> confirmed
    reserved --expired--> expired            confirmed --coupon_consumed--> confirmed

`cancelled`, `expired` and `refunded` are final. Reserving holds the points and one unit of stock;
confirming captures the hold; cancelling and expiring release it and give the stock back.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_DOWN, Decimal
from typing import Literal

from ledger.domain import Policy
from ledger.errors import (
    CouponNotUsable,
    InsufficientPoints,
    LimitReached,
    NotEligible,
    OutOfStock,
    RedemptionStateConflict,
)
from shared.events import MAX_MONEY

Kind = Literal["gift", "privilege", "discount", "coupon"]
Period = Literal["day", "week", "month", "year", "ever"]
State = Literal["reserved", "confirmed", "cancelled", "expired", "refunded"]
Change = Literal["reserved", "confirmed", "cancelled", "expired", "refunded", "coupon_consumed"]
CouponStatus = Literal["pooled", "issued", "consumed", "void"]
Reason = Literal[
    "retired",
    "not_yet_available",
    "no_longer_available",
    "tier",
    "member",
    "not_configured",
    "limit",
    "stock",
    "points",
]
# Reasons a redemption is refused as NotEligible; the others have errors of their own.
ELIGIBILITY = frozenset({"retired", "not_yet_available", "no_longer_available", "tier", "member", "not_configured"})
FINAL: frozenset[str] = frozenset({"cancelled", "expired", "refunded"})
# Orders that count against a limit: a cancelled or expired order never took the reward.
COUNTED: frozenset[str] = frozenset({"reserved", "confirmed", "refunded"})
MONEY_OFF_PLACES = Decimal("0.01")
# Crockford's base32 without I, L, O, U: codes read out over the phone are not misheard.
CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CODE_LENGTH = 16  # 80 random bits


@dataclass(frozen=True)
class RewardsConfig:
    """A programme's tiers, lowest first (the order `min_tier` compares in), and a point's money value."""

    tiers: tuple[str, ...] = ()
    point_value: Decimal | None = None
    currency: str | None = None
    # The programme's hold timeout (its ledger policy): how long an order stays reserved by default.
    hold_timeout_seconds: int = Policy.hold_timeout_seconds

    def rank(self, tier: str | None) -> int | None:
        return self.tiers.index(tier) if tier is not None and tier in self.tiers else None


@dataclass(frozen=True)
class Reward:
    reward_id: str
    name: str
    kind: Kind
    points: int
    status: Literal["active", "retired"] = "active"
    description: str = ""
    value: Decimal | None = None
    currency: str | None = None
    stock: int | None = None
    available_from: datetime | None = None
    available_until: datetime | None = None
    min_tier: str | None = None
    limit_count: int | None = None
    limit_period: Period | None = None
    duration_days: int | None = None
    coupon_source: Literal["pool", "generated"] | None = None
    reserve_seconds: int | None = None


@dataclass(frozen=True)
class Redeemer:
    member_id: str
    max_points: int | None = None


@dataclass(frozen=True)
class CustomerContext:
    """What the decision needs to know about the customer: points, tier, who may redeem, what was redeemed.

    `redeemers` None: every member may redeem. `redeemed[reward_id]`: (UTC day, orders that day) of the
    customer's counted orders of that reward."""

    available: int
    tier: str | None = None
    redeemers: tuple[Redeemer, ...] | None = None
    redeemed: dict[str, list[tuple[datetime, int]]] = field(default_factory=dict)


def period_start(period: Period, now: datetime) -> datetime | None:
    """The start of the current calendar period in UTC (ISO weeks start on Monday); None for `ever`."""
    day = datetime(now.year, now.month, now.day, tzinfo=UTC)
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    if period == "month":
        return day.replace(day=1)
    if period == "year":
        return day.replace(month=1, day=1)
    return None


def used_in_period(days: list[tuple[datetime, int]], period: Period, now: datetime) -> int:
    start = period_start(period, now)
    return sum(count for day, count in days if start is None or day >= start)


def unavailable(
    reward: Reward,
    config: RewardsConfig,
    customer: CustomerContext,
    *,
    now: datetime,
    member_id: str | None = None,
    stock_left: int | None = None,
) -> list[tuple[Reason, str]]:
    """Every reason the customer cannot redeem the reward now, most fundamental first; empty: redeemable.
    `stock_left` overrides the reward's stock (the locked row's, at redemption)."""
    reasons: list[tuple[Reason, str]] = []
    if reward.status == "retired":
        reasons.append(("retired", "the reward was retired"))
    if reward.available_from is not None and now < reward.available_from:
        reasons.append(("not_yet_available", f"available from {reward.available_from.isoformat()}"))
    if reward.available_until is not None and now >= reward.available_until:
        reasons.append(("no_longer_available", f"was available until {reward.available_until.isoformat()}"))
    if reward.min_tier is not None:
        need, have = config.rank(reward.min_tier), config.rank(customer.tier)
        if need is None:
            reasons.append(("not_configured", f"tier {reward.min_tier!r} is not one of the programme's tiers"))
        elif have is None or have < need:
            shown = "no known tier" if customer.tier is None else f"tier {customer.tier!r}"
            reasons.append(("tier", f"needs tier {reward.min_tier!r} or higher; the customer has {shown}"))
    if reward.kind == "discount" and (config.point_value is None or config.currency is None):
        reasons.append(("not_configured", "the programme has no point value for discounts"))
    elif reward.kind == "discount" and reward.points * (config.point_value or 0) > MAX_MONEY:
        reasons.append(("not_configured", f"the discount would be worth more than {MAX_MONEY} at the point value"))
    member = member_reason(reward, customer.redeemers, member_id)
    if member is not None:
        reasons.append(("member", member))
    if reward.limit_count is not None and reward.limit_period is not None:
        used = used_in_period(customer.redeemed.get(reward.reward_id, []), reward.limit_period, now)
        if used >= reward.limit_count:
            reasons.append(("limit", f"redeemed {used} of {reward.limit_count} per {reward.limit_period}"))
    stock = reward.stock if stock_left is None else stock_left
    if stock is not None and stock <= 0:
        reasons.append(("stock", "out of stock"))
    if customer.available < reward.points:
        reasons.append(("points", f"needs {reward.points} points; {max(customer.available, 0)} available"))
    return reasons


def member_reason(reward: Reward, redeemers: tuple[Redeemer, ...] | None, member_id: str | None) -> str | None:
    """Why the member may not redeem the reward for the customer, or None when they may."""
    if redeemers is None:
        return None
    if member_id is None:
        return "the customer allows only named members to redeem; name the member"
    for redeemer in redeemers:
        if redeemer.member_id == member_id:
            if redeemer.max_points is not None and reward.points > redeemer.max_points:
                return f"member {member_id!r} may redeem at most {redeemer.max_points} points at once"
            return None
    return f"member {member_id!r} may not redeem for this customer"


def check_redeemable(
    reward: Reward,
    config: RewardsConfig,
    customer: CustomerContext,
    *,
    now: datetime,
    member_id: str | None,
    stock_left: int | None,
    account_id: str,
) -> None:
    """Raises the error of the first reason the redemption cannot happen: NotEligible (with the reason),
    LimitReached, OutOfStock, InsufficientPoints."""
    for reason, detail in unavailable(reward, config, customer, now=now, member_id=member_id, stock_left=stock_left):
        if reason in ELIGIBILITY:
            raise NotEligible(reward.reward_id, reason, detail)
        if reason == "limit":
            assert reward.limit_count is not None
            assert reward.limit_period is not None
            raise LimitReached(reward.reward_id, limit=reward.limit_count, period=reward.limit_period)
        if reason == "stock":
            raise OutOfStock(reward.reward_id)
        raise InsufficientPoints(account_id, requested=reward.points, available=max(customer.available, 0))


def money_value(reward: Reward, config: RewardsConfig) -> tuple[Decimal | None, str | None]:
    """What the redemption is worth in money: a discount's money off at the programme's point value
    (rounded down to the cent), else the reward's declared value."""
    if reward.kind == "discount":
        assert config.point_value is not None, "checked by check_redeemable"
        return (reward.points * config.point_value).quantize(MONEY_OFF_PLACES, rounding=ROUND_DOWN), config.currency
    return reward.value, reward.currency


def new_coupon_code() -> str:
    raw = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
    return "-".join(raw[i : i + 4] for i in range(0, CODE_LENGTH, 4))


@dataclass
class Order:
    """A redemption order as the state machine sees it."""

    order_id: str
    kind: Kind
    points: int
    state: State
    expires_at: datetime
    order_amount: Decimal | None = None
    refunded_amount: Decimal = Decimal(0)
    points_returned: int = 0

    def _move(self, change: Change, allowed: tuple[str, ...], to: State) -> None:
        if self.state not in allowed:
            raise RedemptionStateConflict(self.order_id, self.state, change)
        self.state = to

    def confirm(self, now: datetime) -> None:
        # A reservation past its time is the expiry task's to close: it must not be captured late.
        if self.state == "reserved" and now >= self.expires_at:
            raise RedemptionStateConflict(self.order_id, "expired", "confirmed")
        self._move("confirmed", ("reserved",), "confirmed")

    def cancel(self) -> None:
        self._move("cancelled", ("reserved",), "cancelled")

    def expire(self, now: datetime) -> None:
        if self.state == "reserved" and now < self.expires_at:
            raise RedemptionStateConflict(self.order_id, self.state, "expired before its time")
        self._move("expired", ("reserved",), "expired")

    def consume_coupon(self, coupon_status: CouponStatus, now: datetime) -> bool:
        """Consumes the order's coupon; returns whether that confirms the order (it was still reserved)."""
        if coupon_status != "issued":
            raise CouponNotUsable(coupon_status)
        if self.state in FINAL:
            raise CouponNotUsable(self.state)
        if self.state == "reserved":
            self.confirm(now)
            return True
        return False

    def refund(self, amount: Decimal) -> int:
        """Books a refund of `amount` of the order the points paid part of; returns the points to give
        back: the share of the points the refunded share of the order stands for, rounded down, all of
        them once the whole order is refunded. Computed on the running totals, so partial refunds never
        give back more than a full one."""
        if self.state != "confirmed":
            raise RedemptionStateConflict(self.order_id, self.state, "refunded")
        assert self.order_amount is not None, "discounts carry their order's amount"
        refunded = min(self.refunded_amount + amount, self.order_amount)
        target = self.points if refunded >= self.order_amount else int(self.points * refunded // self.order_amount)
        back = target - self.points_returned
        self.refunded_amount = refunded
        self.points_returned = target
        if target == self.points:
            self.state = "refunded"
        return back
