from __future__ import annotations

import json
from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from shared.events import Amount, Currency

MAX_FACTOR = Decimal(10**6)
MAX_POINT_VALUE = Decimal(10**6)
MAX_CURRENCIES = 200
MAX_THRESHOLDS_BYTES = 16 * 1024
MAX_WINDOW_DAYS = 3650


def _places(places: int) -> AfterValidator:
    def check(value: Decimal) -> Decimal:
        exponent = value.normalize().as_tuple().exponent
        if isinstance(exponent, int) and exponent < -places:
            raise ValueError(f"at most {places} decimal places")
        return value

    return AfterValidator(check)


def _small_json(value: dict[str, Any]) -> dict[str, Any]:
    if len(json.dumps(value, separators=(",", ":"))) > MAX_THRESHOLDS_BYTES:
        raise ValueError(f"at most {MAX_THRESHOLDS_BYTES} bytes of JSON")
    return value


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
    segment_thresholds: Annotated[dict[str, Any], AfterValidator(_small_json)] = Field(
        default_factory=dict, description="The value segments' rules and thresholds (docs/metrics.md)"
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
