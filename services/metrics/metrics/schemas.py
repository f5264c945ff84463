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

    updated_at: datetime | None = Field(default=None, description="Last PUT; None while the defaults apply")


class DailyPurchases(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    day: date
    currency: str
    orders: int
    net_revenue: Amount


class DailyPurchasesList(BaseModel):
    items: list[DailyPurchases]
    total_orders: int


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
    clv_12m: Amount | None = Field(description="The latest prediction's 12-month CLV; None without one")
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
