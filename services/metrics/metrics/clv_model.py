"""The predictive CLV models, fitted with pymc-marketing: BG/NBD (`BetaGeoModel`) for the purchases and
Gamma-Gamma (`GammaGammaModel`) for the spend per purchase, a day as the time unit.

Only the fit job's process imports this module (pymc and its compiled graphs take a few hundred MB): the
metrics service spawns the job (`python -m metrics.cli fit-clv`), never fits in its own process.

Fit: maximum a posteriori (`method="map"`, `pymc.find_MAP`) under flat priors on every parameter (BG/NBD
`r, alpha, a, b`; Gamma-Gamma `p, q, v`), so the estimate is the maximum-likelihood one the models'
papers and the `lifetimes` library give; the package's default priors are informative on a scale that
does not fit days and euros (a Weibull(2, 10) on `v`, the spend scale). The Gamma-Gamma model is fitted on
the customers with a repeat purchase (its input is the mean of the repeat purchases).

Customers without a repeat purchase (frequency 0) get the models' estimates for that history: BG/NBD gives
their expected purchases from T alone (and P(alive) = 1, the model's assumption that nobody drops out
before a first repeat purchase), Gamma-Gamma gives the population mean spend v·p/(q - 1) (its weight on
the customer's own mean is p·x/(p·x + q - 1), 0 for x = 0)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from metrics.clv import CustomerRfm, FitError, Predictions

# Fewer customers with a repeat purchase than this and the spend model has next to nothing to learn from.
MIN_REPEAT_CUSTOMERS = 10
HORIZONS_DAYS = (90, 365)


@dataclass(frozen=True, slots=True)
class FitResult:
    parameters: dict[str, dict[str, float]]
    predictions: Predictions


def _frame(summary: Sequence[CustomerRfm]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "customer_id": [c.customer_id for c in summary],
            "frequency": np.array([c.frequency for c in summary], dtype=np.int64),
            "recency": np.array([c.recency for c in summary], dtype=np.float64),
            "T": np.array([c.T for c in summary], dtype=np.float64),
            "monetary_value": np.array([float(c.monetary_value) for c in summary], dtype=np.float64),
        }
    )


def _point(result: Any, names: Sequence[str]) -> dict[str, float]:
    return {n: float(np.asarray(result[n]).mean()) for n in names}


def _mean(values: Any) -> list[float]:
    # MAP gives one chain of one draw; MCMC many: the point prediction is their mean either way.
    return [float(v) for v in values.mean(("chain", "draw")).to_numpy()]


def fit(summary: Sequence[CustomerRfm], *, monthly_discount_rate: float, horizon_months: int = 12) -> FitResult:
    """Fits both models to one tenant's summary and predicts every customer's P(alive), expected purchases
    in the next 90 and 365 days, expected spend per purchase and CLV over `horizon_months`, discounted monthly."""
    data = _frame(summary)
    repeat = data[data["frequency"] > 0]
    if len(repeat) < MIN_REPEAT_CUSTOMERS:
        raise FitError(
            f"{len(repeat)} customers with a repeat purchase; at least {MIN_REPEAT_CUSTOMERS} are needed to fit"
        )
    # Imported once the data can be fitted: pymc takes seconds to load, a refusal should not.
    from pymc_extras.prior import Prior
    from pymc_marketing.clv import BetaGeoModel, GammaGammaModel

    flat = Prior("HalfFlat")
    bg = BetaGeoModel(model_config={"r": flat, "alpha": flat, "a": flat, "b": flat})
    bg.fit(data[["customer_id", "frequency", "recency", "T"]], method="map", progressbar=False)
    gg = GammaGammaModel(model_config={"p": flat, "q": flat, "v": flat})
    gg.fit(repeat[["customer_id", "frequency", "monetary_value"]], method="map", progressbar=False)
    bg_params = _point(bg.fit_result, ("r", "alpha", "a", "b"))
    gg_params = _point(gg.fit_result, ("p", "q", "v"))
    if gg_params["q"] <= 1:  # the population mean spend v·p/(q - 1) does not exist
        raise FitError(f"degenerate Gamma-Gamma fit (q = {gg_params['q']:.4g} ≤ 1): spend too dispersed to model")
    bad = [k for k, v in {**bg_params, **gg_params}.items() if not (np.isfinite(v) and v > 0)]
    if bad:
        raise FitError(f"degenerate fit: parameters {bad} not finite and positive")
    spend = _mean(gg.expected_customer_spend(data))
    clv = gg.expected_customer_lifetime_value(
        bg, data, future_t=horizon_months, discount_rate=monthly_discount_rate, time_unit="D"
    )
    predictions = Predictions(
        customer_ids=list(data["customer_id"]),
        p_alive=_mean(bg.expected_probability_alive(data)),
        purchases_90d=_mean(bg.expected_purchases(data, future_t=HORIZONS_DAYS[0])),
        purchases_365d=_mean(bg.expected_purchases(data, future_t=HORIZONS_DAYS[1])),
        expected_spend=spend,
        clv=_mean(clv),
    )
    return FitResult(parameters={"bg_nbd": bg_params, "gamma_gamma": gg_params}, predictions=predictions)
