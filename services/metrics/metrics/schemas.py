from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from metrics.segments import Segment, SegmentThresholds
from shared.events import Amount, Currency

MAX_FACTOR = Decimal(10**6)
MAX_POINT_VALUE = Decimal(10**6)
MAX_CURRENCIES = 200
MAX_WINDOW_DAYS = 3650


def _places(places: int) -> AfterValidator:
    def check(value: Decimal) -> Decimal:
        exponent = value.normalize().as_tuple().exponent
        if isinstance(exponent, int) and exponent < -places:
            raise ValueError(f"at most {places} decimal places")
        return value

    return AfterValidator(check)


Factor = Annotated[Amount, Field(gt=0, le=MAX_FACTOR, allow_inf_nan=False), _places(12)]


class TenantConfigUpdate(BaseModel):
    """A tenant's metrics configuration: PUT replaces it whole (a field left out takes its default)."""

    model_config = ConfigDict(extra="forbid")

    activity_window_days: int = Field(
        default=365,
        ge=1,
        le=MAX_WINDOW_DAYS,
        description="W: a customer is active on day t with a purchase in the W days up to and including t",
    )
    reporting_currency: Currency | None = Field(
        default=None,
        description="The currency of every amount the KPIs show; unset, the tenant's first purchase's currency",
    )
    conversion_factors: dict[Currency, Factor] = Field(
        default_factory=dict,
        max_length=MAX_CURRENCIES,
        description='Per currency, the reporting-currency value of one unit (`{"USD": "0.92"}`); an event in '
        "a currency that is neither the reporting currency nor listed is dead-lettered",
    )
    point_value: Annotated[Amount, Field(ge=0, le=MAX_POINT_VALUE, allow_inf_nan=False), _places(12)] = Field(
        default=Decimal("0.01"), description="The money value of one point, in the reporting currency (liability)"
    )
    clv_discount_rate: Annotated[Amount, Field(ge=0, le=1, allow_inf_nan=False), _places(6)] = Field(
        default=Decimal("0.10"), description="Yearly discount rate of the predictive CLV"
    )
    clv_horizon_months: int = Field(default=12, ge=1, le=120, description="Horizon of the predictive CLV")
    segment_thresholds: SegmentThresholds = Field(
        default_factory=SegmentThresholds, description="The value segments' rules and thresholds (docs/segments.md)"
    )


class TenantConfig(TenantConfigUpdate):
    model_config = ConfigDict(from_attributes=True, extra="forbid")

    updated_at: datetime | None = Field(
        default=None,
        description="Last change (a PUT, or the reporting currency taken from the first purchase); None while "
        "the defaults apply",
    )


Percent = Annotated[Amount | None, Field(description="A percentage with 2 decimals; null when undefined")]


class PeriodKpis(BaseModel):
    start: date = Field(description="First day of the period")
    end: date = Field(description="First day after the period")
    customers_start: int = Field(description="S: customers active on the day before `start`")
    customers_end: int = Field(description="E: customers active on the period's last day")
    new_customers: int = Field(description="N: customers whose first purchase ever falls in the period")
    crr: Percent = Field(description="Customer retention rate (E - N) / S x 100; null when S = 0")
    churn_rate: Percent = Field(description="100 - CRR; null when S = 0")
    active_customers: int = Field(description="Customers active on at least one day of the period")
    buyers: int = Field(description="Customers with at least one order in the period")
    orders: int = Field(description="Orders placed in the period (business time)")
    net_revenue: Amount = Field(description="Order amounts minus the refunds applied to them (reporting currency)")
    refunds: Amount = Field(description="Refunds applied to the period's orders")
    average_order_value: Amount | None = Field(description="net_revenue / orders; null without orders")
    purchase_frequency: Amount | None = Field(description="orders / buyers; null without buyers")
    nps: Percent = Field(description="% promoters (9-10) - % detractors (0-6) over each customer's latest answer")
    nps_responses: int = Field(description="Customers with an NPS answer in the period (their latest counts)")
    promoters: int
    detractors: int
    ces: Amount | None = Field(description="Mean customer-effort score (1-7) of the period's answers")
    ces_responses: int
    share_of_wallet: Percent = Field(
        description="Our net revenue over the periods of the wallet estimates ending in this period / their "
        "estimated spend x 100"
    )
    wallet_estimates: int
    points_issued: int
    points_redeemed: int
    points_expired: int
    points_clawed_back: int
    active_members: int = Field(description="Customers that earned or redeemed points in the period")


class KpiList(BaseModel):
    period: str
    currency: str | None = Field(description="The reporting currency of every amount")
    activity_window_days: int
    items: list[PeriodKpis]


class CurvePoint(BaseModel):
    customers_share: Amount = Field(description="The top share of customers by net revenue, in %")
    revenue_share: Percent = Field(description="Their share of all net revenue, in %")


class TopCustomer(BaseModel):
    customer_id: str
    orders: int
    net_revenue: Amount


class ClvDistribution(BaseModel):
    """Historical CLV: each customer's net revenue to date."""

    mean: Amount | None
    median: Amount | None
    p90: Amount | None = Field(description="90th percentile, interpolated between the closest ranks")
    top: list[TopCustomer]


class Liability(BaseModel):
    available_points: int
    pending_points: int
    held_points: int
    point_value: Amount
    available_value: Amount
    pending_value: Amount


class Lifetime(BaseModel):
    as_of: date
    currency: str | None
    customers: int = Field(description="Customers with at least one order")
    orders: int
    net_revenue: Amount
    repeat_purchase_rate: Percent = Field(description="Customers with >= 2 orders / customers with >= 1, in %")
    p_nth_purchase: dict[str, Amount | None] = Field(
        description="n -> customers with >= n orders / customers with >= n - 1, in %, n = 2..5"
    )
    p_nth_purchase_benchmark: dict[str, Amount | None] = Field(description="Retail benchmarks: 27 %, 45 %, 54 %")
    pareto_top20_share: Percent = Field(description="Net revenue of the top floor(0.2 n) customers / all, in %")
    pareto_curve: list[CurvePoint] = Field(description="The concentration curve in 10 % steps of customers")
    clv: ClvDistribution
    liability: Liability
    points_issued_12m: int
    points_redeemed_12m: int
    points_expired_12m: int
    redemption_rate: Percent = Field(description="Points redeemed / issued over the 12 months up to as_of, in %")
    breakage_rate: Percent = Field(description="Points expired / issued over the 12 months up to as_of, in %")


class Cohort(BaseModel):
    cohort: date = Field(description="First day of the cohort's period (its customers' first purchase)")
    customers: int
    active: list[int] = Field(description="Per period from the cohort's own: its customers who bought then")
    retention: list[Amount | None] = Field(description="active / customers x 100, per period")


class Cohorts(BaseModel):
    period: str
    items: list[Cohort]


# --- redemptions (loyalty.rewards.v1) ------------------------------------------------------------------

RewardKind = Literal["gift", "privilege", "discount", "coupon"]


class RedemptionValue(BaseModel):
    currency: str
    value: Amount


class RedemptionFigures(BaseModel):
    """Redemption orders over the window, each change on its own day (docs/metrics.md, Redemptions)."""

    reserved: int = Field(description="Orders reserved (their points held)")
    confirmed: int = Field(
        description="Orders confirmed (their points captured): by fulfilment, or by consuming a reserved order's coupon"
    )
    cancelled: int
    expired: int
    refunded: int = Field(description="Orders whose refunds gave back all their points")
    coupons_consumed: int
    points_reserved: int = Field(description="Points of the orders reserved")
    points_spent: int = Field(description="Points of the orders confirmed")
    points_returned: int = Field(description="Points given back by refunds (of the webshop orders discounts paid)")
    values: list[RedemptionValue] = Field(
        description="Money value of the orders confirmed, per currency (rewards without a value add nothing)"
    )


class RewardRedemptions(RedemptionFigures):
    reward_id: str
    reward_kind: RewardKind


class KindRedemptions(RedemptionFigures):
    reward_kind: RewardKind


class RedemptionSummary(BaseModel):
    start: date = Field(description="First day of the window")
    end: date = Field(description="First day after the window")
    items: list[RewardRedemptions] = Field(description="Per reward and kind with redemptions in the window, by id")
    totals: list[KindRedemptions] = Field(description="Per kind, every kind (zeros too)")


# --- value segments -----------------------------------------------------------------------------------

CustomerSort = Literal["clv", "revenue", "p_alive", "last_purchase"]


class SegmentOverview(BaseModel):
    counts: dict[Segment, int] = Field(description="Customers per segment (every segment named, zeros too)")
    customers: int = Field(description="Customers with a segment (every customer with a purchase)")
    activity_window_days: int
    thresholds: SegmentThresholds


class CustomerListItem(BaseModel):
    customer_id: str
    segment: Segment
    reason: str
    since: datetime = Field(description="When the customer entered the segment")
    classified_at: datetime
    orders: int
    net_revenue: Amount = Field(description="In the tenant's reporting currency, as of the classification")
    last_purchase_at: datetime
    clv: Amount | None = Field(description="The latest prediction's CLV over the tenant's horizon; None without one")
    p_alive: float | None


class CustomerList(BaseModel):
    items: list[CustomerListItem]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; None on the last page")


class CustomerSegmentInfo(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    segment: Segment
    reason: str
    since: datetime
    classified_at: datetime


class CustomerMetrics(BaseModel):
    customer_id: str
    currency: str | None = Field(description="The reporting currency of the amounts")
    first_purchase_at: datetime | None
    last_purchase_at: datetime | None
    orders: int
    net_revenue: Amount
    last_nps: int | None
    last_nps_at: datetime | None
    last_review_at: datetime | None
    last_referral_at: datetime | None
    tier: str | None
    segment: CustomerSegmentInfo | None = Field(description="None until the customer's first purchase")
    clv_prediction: dict[str, Any] | None = Field(description="The latest predictive CLV; None without one")

    @classmethod
    def from_rows(cls, summary: Mapping[str, Any], segment: object | None) -> CustomerMetrics:
        return cls(
            **{name: summary[name] for name in cls.model_fields if name in summary},
            currency=summary["reporting_currency"],
            segment=None if segment is None else CustomerSegmentInfo.model_validate(segment),
            clv_prediction=summary["prediction"],
        )


class ClvFit(BaseModel):
    """The latest fit of the tenant's predictive CLV models (BG/NBD and Gamma-Gamma, a day as the time unit)."""

    model_config = ConfigDict(from_attributes=True)

    fitted_at: datetime = Field(description="When the fit was stored (UTC)")
    as_of: date = Field(description="The observation day: orders up to and including it were used")
    method: str = Field(description="`map`: maximum a posteriori under flat priors (the maximum likelihood)")
    customers: int = Field(description="Customers with at least one purchase, all of them predicted")
    repeat_customers: int = Field(description="Customers with a repeat purchase (the Gamma-Gamma model's input)")
    duration_seconds: float = Field(
        description="The fit job's wall time, from reading the orders to the stored predictions"
    )
    currency: str = Field(description="The currency of the monetary values (the reporting currency)")
    discount_rate: Amount = Field(description="The yearly discount rate the CLV used")
    horizon_months: int = Field(description="The CLV's horizon")
    parameters: dict[str, dict[str, float]] = Field(
        description='The fitted parameters: `{"bg_nbd": {"r", "alpha", "a", "b"}, "gamma_gamma": {"p", "q", "v"}}`'
    )
