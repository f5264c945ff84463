"""API models of the rewards: the catalogue, redemption orders, coupons, entitlements (docs/rewards.md)."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ledger.rewards import CouponStatus, Kind, Period, Reason, State
from shared.events import MAX_POINTS, Currency, Identifier, Money, PositivePoints, Text, UtcDatetime

Name = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00]*$")]
Description = Annotated[Text, Field(max_length=4000)]
Tier = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00]*$")]
# A stock, a limit, a duration: bounded so that they fit their columns and make sense.
Stock = Annotated[int, Field(strict=True, ge=0, le=MAX_POINTS)]
MAX_REWARDS_LISTED = 500
MAX_TIERS = 50
MAX_REDEEMERS = 1000
MAX_COUPONS_IMPORTED = 10_000
CouponCode = Annotated[str, Field(min_length=4, max_length=200, pattern=r"^[A-Za-z0-9_-]+$")]
PointValue = Annotated[Decimal, Field(gt=0, le=Decimal(10**6), max_digits=20, decimal_places=6)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RewardsConfig(_Model):
    """The programme's tiers, lowest first (what a reward's `min_tier` compares against), and the money
    value of one point with its currency (what a discount reward gives off an order)."""

    tiers: list[Tier] = Field(default_factory=list, max_length=MAX_TIERS)
    point_value: PointValue | None = None
    currency: Currency | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if len(set(self.tiers)) != len(self.tiers):
            raise ValueError("tiers must be distinct")
        if (self.point_value is None) != (self.currency is None):
            raise ValueError("point_value and currency go together")
        return self


class _RewardFields(_Model):
    name: Name
    description: Description = ""
    points: PositivePoints = Field(description="What the reward costs")
    value: Money | None = Field(default=None, description="Money value, for liability and reporting (not discounts)")
    currency: Currency | None = None
    available_from: UtcDatetime | None = None
    available_until: UtcDatetime | None = None
    min_tier: Tier | None = Field(default=None, description="The lowest tier that may redeem (the programme's order)")
    limit_count: Annotated[int, Field(ge=1, le=10**6)] | None = Field(
        default=None, description="How many times one customer may redeem it per `limit_period`"
    )
    limit_period: Period | None = None
    duration_days: Annotated[int, Field(ge=1, le=36500)] | None = Field(
        default=None, description="A privilege's duration from its confirmation"
    )
    reserve_seconds: Annotated[int, Field(ge=1, le=90 * 86400)] | None = Field(
        default=None, description="How long an order stays reserved before it expires (default: the hold timeout)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (self.value is None) != (self.currency is None):
            raise ValueError("value and currency go together")
        if (self.limit_count is None) != (self.limit_period is None):
            raise ValueError("limit_count and limit_period go together")
        if self.available_from and self.available_until and self.available_from >= self.available_until:
            raise ValueError("available_from must be before available_until")
        return self


class RewardCreate(_RewardFields):
    reward_id: Identifier
    kind: Kind
    stock: Stock | None = Field(default=None, description="Units available; none: unlimited")
    coupon_source: Literal["pool", "generated"] | None = Field(
        default=None, description="Coupons only: codes from an imported pool, or generated (the default)"
    )

    @model_validator(mode="after")
    def _kind_fields(self) -> Self:
        if self.kind == "privilege" and self.duration_days is None:
            raise ValueError("a privilege needs duration_days")
        if self.kind != "privilege" and self.duration_days is not None:
            raise ValueError("duration_days is for privileges")
        if self.kind != "coupon" and self.coupon_source is not None:
            raise ValueError("coupon_source is for coupons")
        if self.kind == "discount" and self.value is not None:
            raise ValueError("a discount's value is its points at the programme's point value")
        return self


class RewardUpdate(_RewardFields):
    """Replaces the reward's terms; its id, kind and coupon source stay. `stock` sets what is left."""

    stock: Stock | None = None


class Reward(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    reward_id: str
    name: str
    description: str
    kind: Kind
    points: int
    value: Decimal | None
    currency: str | None
    stock: int | None
    available_from: datetime | None
    available_until: datetime | None
    min_tier: str | None
    limit_count: int | None
    limit_period: Period | None
    duration_days: int | None
    coupon_source: Literal["pool", "generated"] | None
    reserve_seconds: int | None
    status: Literal["active", "retired"]
    created_at: datetime
    updated_at: datetime


class RewardRemoved(BaseModel):
    reward_id: str
    outcome: Literal["deleted", "retired"] = Field(description="Retired when orders or coupons refer to it")


class RewardPage(BaseModel):
    items: list[Reward]
    next_cursor: str | None


class Unavailability(BaseModel):
    reason: Reason
    detail: str


class RewardOffer(BaseModel):
    reward: Reward
    redeemable: bool
    used_in_period: int | None = Field(description="The customer's redemptions in the limit's current period")
    reasons: list[Unavailability] = Field(description="Why it cannot be redeemed now; empty when it can")


class CustomerCatalogue(BaseModel):
    customer_id: str
    member_id: str | None
    available: int
    tier: str | None
    items: list[RewardOffer]
    next_cursor: str | None


class RedemptionCreate(_Model):
    customer_id: Identifier
    reward_id: Identifier
    member_id: Identifier | None = Field(default=None, description="The buyer who redeems for the customer")
    purchase_order_id: Identifier | None = Field(
        default=None, description="The webshop order a discount is for (required for discounts)"
    )
    order_amount: Money | None = Field(
        default=None, description="That order's amount, what refunds are proportioned against (discounts)"
    )

    @model_validator(mode="after")
    def _amount_positive(self) -> Self:
        if self.order_amount is not None and self.order_amount <= 0:
            raise ValueError("order_amount must be above 0")
        return self


class Redemption(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    order_id: uuid.UUID
    reward_id: str
    kind: Kind
    customer_id: str
    member_id: str | None
    points: int
    hold_id: uuid.UUID
    state: State
    value: Decimal | None
    currency: str | None
    purchase_order_id: str | None
    order_amount: Decimal | None
    refunded_amount: Decimal
    points_returned: int
    coupon_code: str | None
    created_at: datetime
    expires_at: datetime
    updated_at: datetime


class RedeemersUpdate(_Model):
    """Who may redeem for the customer: everyone (`all_members`), or only the members listed, each with an
    optional maximum of points per redemption."""

    all_members: bool = True
    members: list[RedeemerIn] = Field(default_factory=list, max_length=MAX_REDEEMERS)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.all_members and self.members:
            raise ValueError("list members only with all_members false")
        if len({m.member_id for m in self.members}) != len(self.members):
            raise ValueError("members must be distinct")
        return self


class RedeemerIn(_Model):
    member_id: Identifier
    max_points: PositivePoints | None = None


class Redeemers(BaseModel):
    customer_id: str
    all_members: bool
    members: list[RedeemerIn]


class CouponImport(_Model):
    codes: list[CouponCode] = Field(min_length=1, max_length=MAX_COUPONS_IMPORTED)


class CouponImported(BaseModel):
    reward_id: str
    imported: int
    duplicates: int = Field(description="Codes the programme had already (left as they were)")


class CouponCheck(_Model):
    code: CouponCode


class CouponConsume(_Model):
    code: CouponCode
    purchase_order_id: Identifier = Field(description="The webshop order the coupon is used on")


class Coupon(BaseModel):
    code: str
    status: CouponStatus
    reward_id: str
    order_id: uuid.UUID | None
    customer_id: str | None
    value: Decimal | None
    currency: str | None
    consumed_by: str | None
    consumed_at: datetime | None
    valid: bool = Field(description="Whether the checkout may consume it now")


class Entitlement(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    order_id: uuid.UUID
    reward_id: str
    name: str
    starts_at: datetime
    ends_at: datetime


class Entitlements(BaseModel):
    customer_id: str
    at: datetime
    items: list[Entitlement]


RedeemersUpdate.model_rebuild()
