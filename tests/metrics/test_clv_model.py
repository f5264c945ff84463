"""The CLV fit on synthetic customers drawn, in this test, from known BG/NBD and Gamma-Gamma parameters:
the fit recovers them and ranks customers sensibly. A few seconds per fit (marked slow; runs under make test)."""

from __future__ import annotations

from datetime import date, timedelta
from decimal import Decimal

import numpy as np
import pytest

from metrics.clv import CustomerRfm, rfm_summary
from metrics.clv_model import FitError, fit

pytestmark = pytest.mark.slow

AS_OF = date(2026, 6, 30)
# Purchase rate λ ~ Gamma(r, rate alpha) per day, dropout after each purchase p ~ Beta(a, b);
# spend per purchase z ~ Gamma(p, rate nu) with nu ~ Gamma(q, rate v).
BG = {"r": 0.9, "alpha": 30.0, "a": 0.7, "b": 2.5}
GG = {"p": 6.0, "q": 4.0, "v": 300.0}


def synthetic_orders(n: int, seed: int) -> list[tuple[str, date, Decimal]]:
    """(customer, day, net) rows: each customer's first purchase 60 to 720 days before AS_OF, then the BG/NBD
    process (exponential gaps at rate λ, dropout with probability p after each repeat purchase)."""
    rng = np.random.default_rng(seed)
    rows: list[tuple[str, date, Decimal]] = []
    for i in range(n):
        lam = rng.gamma(BG["r"], 1 / BG["alpha"])
        p_drop = rng.beta(BG["a"], BG["b"])
        nu = rng.gamma(GG["q"], 1 / GG["v"])
        age = float(rng.integers(60, 720))
        t = 0.0
        while True:
            rows.append((f"c{i}", AS_OF - timedelta(days=age - t), Decimal(f"{rng.gamma(GG['p'], 1 / nu):.2f}")))
            if t > 0 and rng.random() < p_drop:  # BG/NBD: a customer may drop out after a repeat purchase only
                break
            t += rng.exponential(1 / lam)
            if t >= age:
                break
    return rows


@pytest.fixture(scope="module")
def summary() -> list[CustomerRfm]:
    return rfm_summary(synthetic_orders(4000, seed=7), as_of=AS_OF)


class TestFit:
    def test_recovers_the_generating_parameters(self, summary: list[CustomerRfm]) -> None:
        result = fit(summary, monthly_discount_rate=0.01)
        bg, gg = result.parameters["bg_nbd"], result.parameters["gamma_gamma"]
        for name in ("r", "alpha"):
            assert bg[name] == pytest.approx(BG[name], rel=0.15), (name, bg)
        # The dropout parameters are the least well identified (few customers show many purchases).
        for name in ("a", "b"):
            assert bg[name] == pytest.approx(BG[name], rel=0.25), (name, bg)
        # p, q and v trade off against each other; the population mean spend v·p/(q - 1) is what matters.
        assert gg["v"] * gg["p"] / (gg["q"] - 1) == pytest.approx(GG["v"] * GG["p"] / (GG["q"] - 1), rel=0.1), gg
        assert gg["p"] == pytest.approx(GG["p"], rel=0.3), gg

    def test_predictions_rank_customers_sensibly(self, summary: list[CustomerRfm]) -> None:
        probes = [
            CustomerRfm("often-recent", frequency=12, recency=355, T=360, monetary_value=Decimal("120")),
            CustomerRfm("stopped", frequency=12, recency=100, T=360, monetary_value=Decimal("120")),
            CustomerRfm("once", frequency=0, recency=0, T=360, monetary_value=Decimal("0")),
        ]
        result = fit([*summary, *probes], monthly_discount_rate=0.01)
        pred = result.predictions
        at = {c: i for i, c in enumerate(pred.customer_ids)}
        recent, stopped, once = at["often-recent"], at["stopped"], at["once"]
        assert pred.p_alive[recent] > 0.9 > 0.1 > pred.p_alive[stopped]
        assert pred.purchases_365d[recent] > pred.purchases_90d[recent] > pred.purchases_90d[stopped]
        assert pred.clv_12m[recent] > pred.clv_12m[stopped]
        # No repeat purchase: P(alive) is 1 under BG/NBD, and the spend is the Gamma-Gamma population mean.
        gg = result.parameters["gamma_gamma"]
        assert pred.p_alive[once] == pytest.approx(1.0)
        assert pred.expected_spend[once] == pytest.approx(gg["v"] * gg["p"] / (gg["q"] - 1), rel=1e-9)
        # The 12-month CLV is the expected spend times the year's expected purchases, discounted: below the
        # undiscounted product, above it discounted by a whole year at 1 % a month.
        undiscounted = pred.expected_spend[recent] * pred.purchases_365d[recent]
        assert undiscounted / 1.01**12 < pred.clv_12m[recent] < undiscounted * 1.01

    def test_too_few_repeat_customers_is_a_clear_error(self) -> None:
        few = [
            CustomerRfm(f"c{i}", frequency=1 if i < 3 else 0, recency=5, T=30, monetary_value=Decimal(10))
            for i in range(50)
        ]
        with pytest.raises(FitError, match="3 customers with a repeat purchase"):
            fit(few, monthly_discount_rate=0.01)
