"""The per-customer summary the CLV models read, and the stored values' quanta: pure, against hand-computed data."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metrics.clv import MAX_STORED, CustomerRfm, Predictions, monthly_rate, prediction_rows, quantize, rfm_summary
from metrics.repository import PREDICTION_COLUMNS

AS_OF = date(2026, 6, 30)


def d(text: str) -> Decimal:
    return Decimal(text)


class TestRfmSummary:
    def test_hand_computed_customers(self) -> None:
        rows = [
            # c-1: purchase days Jan 1, Feb 1 (two orders: 30 + 20), Mar 3; one order after as_of.
            ("c-1", date(2026, 3, 3), d("40.00")),
            ("c-1", date(2026, 1, 1), d("100.00")),
            ("c-1", date(2026, 2, 1), d("30.00")),
            ("c-1", date(2026, 2, 1), d("20.00")),
            ("c-1", date(2026, 7, 1), d("999.00")),
            # c-2: one purchase only.
            ("c-2", date(2026, 6, 1), d("75.50")),
            # c-3: the later order refunded in full (net 0) is no purchase.
            ("c-3", date(2026, 4, 10), d("12.00")),
            ("c-3", date(2026, 5, 10), d("0")),
            # c-4: nothing but a refunded order: no customer at all.
            ("c-4", date(2026, 5, 1), d("0")),
        ]
        assert rfm_summary(rows, as_of=AS_OF) == [
            # frequency 2 repeat days; recency Jan 1 → Mar 3 = 31 + 28 + 2 = 61; T Jan 1 → Jun 30 = 180;
            # monetary = mean of the repeat days (50 + 40) / 2.
            CustomerRfm("c-1", frequency=2, recency=61, T=180, monetary_value=d("45")),
            CustomerRfm("c-2", frequency=0, recency=0, T=29, monetary_value=d("0")),
            CustomerRfm("c-3", frequency=0, recency=0, T=81, monetary_value=d("0")),
        ]

    def test_a_purchase_on_the_observation_day_counts_with_t_zero(self) -> None:
        assert rfm_summary([("c", AS_OF, d("5"))], as_of=AS_OF) == [CustomerRfm("c", 0, 0, 0, d("0"))]

    def test_no_rows_no_customers(self) -> None:
        assert rfm_summary([], as_of=AS_OF) == []

    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["a", "b", "c"]),
                st.integers(min_value=0, max_value=60),
                st.integers(min_value=0, max_value=500),
            ),
            max_size=40,
        )
    )
    def test_against_a_reference_counting_distinct_days(self, orders: list[tuple[str, int, int]]) -> None:
        start = AS_OF - timedelta(days=50)  # some orders fall after as_of
        rows = [(c, start + timedelta(days=k), Decimal(cents) / 100) for c, k, cents in orders]
        summary = {s.customer_id: s for s in rfm_summary(rows, as_of=AS_OF)}
        for customer in "abc":
            per_day: dict[date, Decimal] = {}
            for c, day, net in rows:
                if c == customer and day <= AS_OF:
                    per_day[day] = per_day.get(day, Decimal(0)) + net
            bought = sorted(day for day, net in per_day.items() if net > 0)
            if not bought:
                assert customer not in summary
                continue
            s = summary[customer]
            assert s.frequency == len(bought) - 1
            assert s.recency == (bought[-1] - bought[0]).days
            assert s.T == (AS_OF - bought[0]).days
            assert 0 <= s.recency <= s.T
            repeat_total = sum((per_day[day] for day in bought[1:]), Decimal(0))
            assert s.monetary_value == (repeat_total / s.frequency if s.frequency else 0)


class TestQuantize:
    def test_fixed_quantum_half_even(self) -> None:
        assert quantize(12.345, Decimal("0.01")) == Decimal("12.34")  # 12.345 is 12.3449999… as a float
        assert quantize(0.125, Decimal("0.01")) == Decimal("0.12")
        assert quantize(0.5, Decimal("0.000001")) == Decimal("0.500000")

    def test_infinity_is_clipped_and_nan_refused(self) -> None:
        assert quantize(float("inf"), Decimal("0.01")) == MAX_STORED
        with pytest.raises(ValueError, match="NaN"):
            quantize(float("nan"), Decimal("0.01"))


class TestPredictionRows:
    def test_rows_in_column_order_with_fixed_quanta(self) -> None:
        summary = [CustomerRfm("a", 2, 10, 40, d("33.335")), CustomerRfm("b", 0, 0, 5, d("0"))]
        predictions = Predictions(
            customer_ids=["a", "b"],
            p_alive=[0.91234567, 1.0],
            purchases_90d=[1.5, 0.25],
            purchases_365d=[4.0000004, 0.75],
            expected_spend=[31.005, 28.4],
            clv=[123.4567, 20.0],
        )
        at = datetime(2026, 7, 1, tzinfo=UTC)
        rows = prediction_rows("t", fitted_at=at, currency="EUR", summary=summary, predictions=predictions)
        assert rows[0] == (
            "t", "a", at, 2, 10, 40, "EUR",
            d("33.34"), d("31.00"), d("0.912346"), d("1.500000"), d("4.000000"), d("123.46"),
        )  # fmt: skip
        assert rows[1][7:] == (d("0.00"), d("28.40"), d("1.000000"), d("0.250000"), d("0.750000"), d("20.00"))
        assert len(rows[0]) == len(PREDICTION_COLUMNS)

    def test_predictions_out_of_order_are_refused(self) -> None:
        summary = [CustomerRfm("a", 0, 0, 1, d("0")), CustomerRfm("b", 0, 0, 1, d("0"))]
        swapped = Predictions(["b", "a"], [1, 1], [0, 0], [0, 0], [1, 1], [0, 0])
        with pytest.raises(ValueError, match="order"):
            prediction_rows("t", fitted_at=datetime.now(UTC), currency="EUR", summary=summary, predictions=swapped)


def test_monthly_rate_compounds_to_the_yearly_one() -> None:
    monthly = monthly_rate(d("0.10"))
    assert (1 + monthly) ** 12 == pytest.approx(1.10, abs=1e-12)
    assert monthly_rate(d("0")) == 0


def test_the_service_and_the_cli_load_no_model_library() -> None:
    # The fit runs in a process of its own: the service's (and every `loyalty` command's) memory stays small.
    heavy = {"numpy", "pandas", "scipy", "xarray", "pytensor", "pymc", "pymc_marketing"}
    code = "import sys, metrics.app, ops.cli; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert "metrics" in loaded.stdout.split()
    assert heavy.isdisjoint(loaded.stdout.split())
