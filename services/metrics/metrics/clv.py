"""Predictive customer lifetime value, the pure part: a tenant's orders summarised per customer as the
BG/NBD and Gamma-Gamma models read them, and the models' float outputs turned into stored values.

The summary follows the models' (and the `lifetimes` library's) convention, with a day as the time unit:
a customer's purchase days are the UTC days of their orders with a positive net amount (amount - refunded;
an order refunded in full is no purchase), several orders on one day being one purchase of their sum.
- `frequency`: purchase days - 1 (the repeat purchases);
- `recency`: days from the first to the last purchase day (0 without a repeat purchase);
- `T`: days from the first purchase day to the observation day (`as_of`, exclusive of orders after it);
- `monetary_value`: the mean net amount of the repeat purchase days, the first one left out (0 without a
  repeat purchase), as the Gamma-Gamma model expects.
No I/O here and no model: `metrics.clv_model` fits the models (in the fit job's process only)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

# Quanta of what is stored: money to the cent, probabilities and expected counts to six decimals.
MONEY_QUANTUM = Decimal("0.01")
RATE_QUANTUM = Decimal("0.000001")
# The largest value a model output may take when stored (a degenerate fit can overflow to inf).
MAX_STORED = Decimal(10**15)


class FitError(ValueError):
    """The data cannot support a fit (too few repeat customers, no currency) or the fit is degenerate."""


@dataclass(frozen=True, slots=True)
class CustomerRfm:
    customer_id: str
    frequency: int
    recency: int
    T: int
    monetary_value: Decimal


def rfm_summary(daily_net: Iterable[tuple[str, date, Decimal]], *, as_of: date) -> list[CustomerRfm]:
    """One summary per customer from (customer id, UTC day, net amount) rows, in any order and with any
    number of rows per customer and day; rows after `as_of` and days whose net is not positive are left out.
    Sorted by customer id."""
    days: dict[str, dict[date, Decimal]] = {}
    for customer_id, day, net in daily_net:
        if day > as_of:
            continue
        per_day = days.setdefault(customer_id, {})
        per_day[day] = per_day.get(day, Decimal(0)) + net
    out: list[CustomerRfm] = []
    for customer_id in sorted(days):
        purchases = sorted((d, v) for d, v in days[customer_id].items() if v > 0)
        if not purchases:
            continue
        first, last = purchases[0][0], purchases[-1][0]
        repeats = [v for _, v in purchases[1:]]
        monetary = sum(repeats, Decimal(0)) / len(repeats) if repeats else Decimal(0)
        out.append(
            CustomerRfm(
                customer_id=customer_id,
                frequency=len(repeats),
                recency=(last - first).days,
                T=(as_of - first).days,
                monetary_value=monetary,
            )
        )
    return out


def quantize(value: float, quantum: Decimal) -> Decimal:
    """A model's float as a stored Decimal with a fixed quantum; NaN is refused, infinities and beyond
    `MAX_STORED` are clipped to it (a probability or an amount never exceeds that in a sane fit)."""
    if value != value:
        raise ValueError("the model produced NaN")
    clipped = min(max(value, -float(MAX_STORED)), float(MAX_STORED))
    return Decimal(repr(clipped)).quantize(quantum, rounding=ROUND_HALF_EVEN)


@dataclass(frozen=True, slots=True)
class Predictions:
    """The models' per-customer outputs, in the order of the summary they were fitted on."""

    customer_ids: Sequence[str]
    p_alive: Sequence[float]
    purchases_90d: Sequence[float]
    purchases_365d: Sequence[float]
    expected_spend: Sequence[float]
    clv: Sequence[float]


def prediction_rows(
    tenant_id: str,
    *,
    fitted_at: datetime,
    currency: str,
    summary: Sequence[CustomerRfm],
    predictions: Predictions,
) -> list[tuple[Any, ...]]:
    """The rows of `metrics.clv_predictions` (its columns in `repository.PREDICTION_COLUMNS` order): money to
    the cent, probabilities and expected purchases to six decimals."""
    if list(predictions.customer_ids) != [c.customer_id for c in summary]:
        raise ValueError("the predictions are not in the order of the summary")
    return [
        (
            tenant_id,
            c.customer_id,
            fitted_at,
            c.frequency,
            c.recency,
            c.T,
            currency,
            c.monetary_value.quantize(MONEY_QUANTUM, rounding=ROUND_HALF_EVEN),
            quantize(spend, MONEY_QUANTUM),
            quantize(alive, RATE_QUANTUM),
            quantize(p90, RATE_QUANTUM),
            quantize(p365, RATE_QUANTUM),
            quantize(value, MONEY_QUANTUM),
        )
        for c, alive, p90, p365, spend, value in zip(
            summary,
            predictions.p_alive,
            predictions.purchases_90d,
            predictions.purchases_365d,
            predictions.expected_spend,
            predictions.clv,
            strict=True,
        )
    ]


def monthly_rate(yearly: Decimal) -> float:
    """The monthly discount rate compounding to a yearly one: (1 + y)^(1/12) - 1."""
    return float((1.0 + float(yearly)) ** (1.0 / 12.0) - 1.0)
