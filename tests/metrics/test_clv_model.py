"""The CLV fit on synthetic customers drawn from known BG/NBD and Gamma-Gamma parameters (clv_synthetic.py):
the fit recovers them and ranks customers sensibly. A few seconds per fit (marked slow; runs under make test)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from metrics.clv import CustomerRfm, FitError, rfm_summary
from metrics.clv_model import fit
from tests.metrics.clv_synthetic import AS_OF, BG, GG, synthetic_orders

pytestmark = pytest.mark.slow


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
        assert pred.clv[recent] > pred.clv[stopped]
        # No repeat purchase: P(alive) is 1 under BG/NBD, and the spend is the Gamma-Gamma population mean.
        gg = result.parameters["gamma_gamma"]
        assert pred.p_alive[once] == pytest.approx(1.0)
        assert pred.expected_spend[once] == pytest.approx(gg["v"] * gg["p"] / (gg["q"] - 1), rel=1e-9)
        # The 12-month CLV is the expected spend times the year's expected purchases, discounted: below the
        # undiscounted product, above it discounted by a whole year at 1 % a month.
        undiscounted = pred.expected_spend[recent] * pred.purchases_365d[recent]
        assert undiscounted / 1.01**12 < pred.clv[recent] < undiscounted * 1.01

    def test_too_few_repeat_customers_is_a_clear_error(self) -> None:
        few = [
            CustomerRfm(f"c{i}", frequency=1 if i < 3 else 0, recency=5, T=30, monetary_value=Decimal(10))
            for i in range(50)
        ]
        with pytest.raises(FitError, match="3 customers with a repeat purchase"):
            fit(few, monthly_discount_rate=0.01)
