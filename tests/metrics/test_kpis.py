"""The pure core: footprints, periods, the KPI math, against hand-computed numbers and, for the footprints,
a property: the sums maintained from differences, whatever order the days arrive in, equal a recomputation
from the days by the definitions (a reference implementation here)."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metrics import domain, kpis
from shared.events import LedgerEntryPosted, PurchaseCompleted, PurchaseLine

D = date.fromisoformat


class TestPeriods:
    def test_period_starts(self) -> None:
        day = D("2025-08-14")  # a Thursday
        assert [domain.period_start(k, day) for k in domain.PERIODS] == [
            day,
            D("2025-08-11"),
            D("2025-08-01"),
            D("2025-07-01"),
            D("2025-01-01"),
        ]
        assert domain.next_start("quarter", D("2025-10-01")) == D("2026-01-01")
        assert domain.next_start("month", D("2024-12-01")) == D("2025-01-01")

    def test_whole_periods_holding_the_range(self) -> None:
        assert kpis.period_list("quarter", D("2025-02-10"), D("2025-07-01")) == [
            (D("2025-01-01"), D("2025-04-01")),
            (D("2025-04-01"), D("2025-07-01")),
        ]
        assert len(kpis.period_list("day", D("2024-01-01"), D("2025-01-01"))) == 366


class TestFootprint:
    def test_one_customer_two_spells(self) -> None:
        # W = 10: 1 Jan covers 1-10 Jan, 11 Jan (adjacent) extends to 20 Jan, 1 Feb starts a new spell.
        days = [D("2025-01-01"), D("2025-01-11"), D("2025-02-01")]
        fp = domain.footprint(days, 10)
        assert fp[("new", D("2025-01-01"))] == 1
        assert fp[("active", D("2025-01-01"))] == 1
        assert fp[("active", D("2025-01-21"))] == -1
        assert fp[("active", D("2025-02-01"))] == 1
        assert fp[("active", D("2025-02-11"))] == -1
        # Active in January (1-20) and February (1-10): one customer per month, though two spells; as
        # changes, +1 from January, -1 from March.
        assert {k: v for k, v in fp.items() if k[:2] == ("period", "month")} == {
            ("period", "month", D("2025-01-01")): 1,
            ("period", "month", D("2025-03-01")): -1,
        }
        assert fp[("cell", "month", D("2025-01-01"), D("2025-02-01"))] == 1
        assert ("cell", "month", D("2025-01-01"), D("2025-03-01")) not in fp

    def test_an_earlier_first_purchase_moves_the_cohort(self) -> None:
        before = domain.footprint([D("2025-03-05")], 365)
        after = domain.footprint([D("2025-01-20"), D("2025-03-05")], 365)
        diff = domain.difference(after, before)
        assert diff[("new", D("2025-03-05"))] == -1
        assert diff[("new", D("2025-01-20"))] == 1
        assert diff[("cell", "month", D("2025-03-01"), D("2025-03-01"))] == -1
        assert diff[("cell", "month", D("2025-01-01"), D("2025-03-01"))] == 1
        assert diff[("cell", "month", D("2025-01-01"), D("2025-01-01"))] == 1
        # The spell now starts on 20 January and still ends 365 days after 5 March.
        assert diff[("active", D("2025-01-20"))] == 1
        assert diff[("active", D("2025-03-05"))] == -1
        assert ("active", D("2026-03-05")) not in diff

    @settings(max_examples=300, deadline=None)
    @given(
        st.integers(min_value=1, max_value=60),
        st.lists(
            st.tuples(st.integers(min_value=0, max_value=4), st.integers(min_value=0, max_value=200)),
            max_size=40,
        ),
        st.randoms(),
    )
    def test_incremental_sums_equal_a_recomputation(
        self, window: int, purchases: list[tuple[int, int]], rnd: object
    ) -> None:
        origin = D("2025-01-01")
        events = [(f"c{c}", origin + timedelta(days=d)) for c, d in purchases]
        events = events + events[: len(events) // 3]  # redeliveries
        rnd.shuffle(events)  # type: ignore[attr-defined]
        sums: dict[domain.Key, int] = defaultdict(int)
        days: dict[str, list[date]] = defaultdict(list)
        for customer, day in events:  # one purchase at a time, in arrival order, as the service folds them
            before = days[customer]
            after = domain.merge_days(before, [day])
            for k, v in domain.difference(domain.footprint(after, window), domain.footprint(before, window)).items():
                sums[k] += v
            days[customer] = after
        bought = {c: set(ds) for c, ds in days.items()}
        horizon = [origin + timedelta(days=i) for i in range(-2, 200 + window + 3)]
        running = 0
        for t in horizon:
            running += sums.get(("active", t), 0)
            expected = sum(1 for ds in bought.values() if any(t - timedelta(days=window - 1) <= d <= t for d in ds))
            assert running == expected, t
        # Customers active on at least one day of a period: a purchase in [start - W + 1, end - 1].
        for kind in domain.CELL_PERIODS:
            running = 0
            start = domain.period_start(kind, horizon[0])
            while start <= horizon[-1]:
                stop = domain.next_start(kind, start)
                running += sums.get(("period", kind, start), 0)
                expected = sum(
                    1 for ds in bought.values() if any(start - timedelta(days=window - 1) <= d < stop for d in ds)
                )
                assert running == expected, (kind, start)
                start = stop
        for t in horizon:
            firsts = sum(1 for ds in bought.values() if min(ds) == t)
            assert sums.get(("new", t), 0) == firsts
            assert sums.get(("buyers", t), 0) == sum(1 for ds in bought.values() if t in ds)
        cells: dict[domain.Key, int] = defaultdict(int)
        for ds in bought.values():
            cohort = domain.period_start("month", min(ds))
            for month in {domain.period_start("month", d) for d in ds}:
                cells[("cell", "month", cohort, month)] += 1
        assert {k: v for k, v in sums.items() if k[:2] == ("cell", "month") and v} == dict(cells)
        assert all(v >= 0 for k, v in sums.items() if k[0] not in ("active", "period"))


class TestMoney:
    def test_conversion_and_unknown_currency(self) -> None:
        assert domain.convert(Decimal("30"), "USD", "EUR", {"USD": "0.5"}) == Decimal("15.0")
        assert domain.convert(Decimal("30"), "EUR", "EUR", {}) == Decimal("30")
        with pytest.raises(domain.UnknownCurrency, match=r"currency GBP has no conversion factor to .* EUR"):
            domain.convert(Decimal("1"), "GBP", "EUR", {"USD": "0.5"})

    def test_refunds_never_take_more_than_the_order(self) -> None:
        assert domain.applied(Decimal(50), Decimal(20)) == Decimal(20)
        assert domain.applied(Decimal(50), Decimal(80)) == Decimal(50)

    def test_discount_share(self) -> None:
        line = PurchaseLine(sku="A", category="x", quantity=Decimal(2), unit_price=Decimal(50), discount=Decimal(25))
        other = PurchaseLine(sku="B", category="x", quantity=Decimal(1), unit_price=Decimal(100))
        order = PurchaseCompleted(
            order_id="o",
            customer_id="c",
            channel="erp",
            currency="EUR",
            net_amount=Decimal(175),
            gross_amount=Decimal(175),
            lines=[line, other],
        )
        assert domain.discount_share(order) == Decimal("0.125")  # 25 of 200
        assert domain.discount_share(order.model_copy(update={"lines": []})) is None


class TestPointsFacts:
    def entry(self, account: str, kind: str, points: int, bucket: str = "available") -> LedgerEntryPosted:
        customer = None if account.startswith("system:") else account
        return LedgerEntryPosted.model_validate(
            {
                "entry_id": "e",
                "transaction_id": "t",
                "account_id": account,
                "customer_id": customer,
                "kind": kind,
                "points": points,
                "balance_after": 0,
                "created_at": datetime(2025, 5, 1, tzinfo=UTC),
                "bucket": bucket,
            }
        )

    def test_kinds(self) -> None:
        earn = domain.points_fact(self.entry("c", "earn", 10, "pending"))
        assert earn is not None
        assert (earn.issued, earn.pending, earn.available, earn.member) == (10, 10, 0, True)
        capture = domain.points_fact(self.entry("c", "capture", -5, "held"))
        assert capture is not None
        assert (capture.redeemed, capture.held) == (5, -5)
        hold = domain.points_fact(self.entry("c", "hold", -5))
        assert hold is not None
        assert (hold.redeemed, hold.available, hold.member) == (0, -5, False)
        expire = domain.points_fact(self.entry("c", "expire", -3))
        assert expire is not None
        assert expire.expired == 3
        claw = domain.points_fact(self.entry("system:issuance/07", "clawback", 8))
        assert claw is not None
        assert (claw.clawed_back, claw.customer_id) == (8, None)
        assert domain.points_fact(self.entry("system:redemption/07", "redeem", 5)) is None


def day(**values: object) -> kpis.Day:
    return kpis.Day(**values)  # type: ignore[arg-type]


class TestPeriodKpis:
    def test_empty_period_and_s_zero(self) -> None:
        data = kpis.PeriodInput(
            kind="month",
            periods=kpis.period_list("month", D("2025-01-01"), D("2025-02-01")),
            days={},
            active_before=0,
            first_day=D("2024-12-31"),
        )
        [item] = kpis.period_kpis(data)
        assert (item["customers_start"], item["crr"], item["churn_rate"], item["average_order_value"]) == (
            0,
            None,
            None,
            None,
        )
        assert (item["orders"], item["net_revenue"], item["nps"], item["share_of_wallet"]) == (0, 0, None, None)

    def test_crr_and_revenue_by_hand(self) -> None:
        # 3 active before; in January one spell ends (-1 on the 10th), one customer is new (+1 on the 5th)
        # with two orders of 60 and 40, 10 refunded.
        days = {
            D("2025-01-05"): day(orders=2, amount=Decimal(100), refunded=Decimal(10), buyers=1, new_customers=1,
                                 active_delta=1),
            D("2025-01-10"): day(active_delta=-1),
        }  # fmt: skip
        data = kpis.PeriodInput(
            kind="month",
            periods=kpis.period_list("month", D("2025-01-01"), D("2025-02-01")),
            days=days,
            active_before=3,
            first_day=D("2024-12-31"),
            buyers={D("2025-01-01"): 1},
            active={D("2025-01-01"): 4},
            surveys={D("2025-01-01"): kpis.Survey(responses=4, promoters=2, detractors=1, effort_sum=9,
                                                  effort_responses=2)},
            wallets={D("2025-01-01"): kpis.Wallet(ours=Decimal(90), estimated=Decimal(300), estimates=2)},
        )  # fmt: skip
        [item] = kpis.period_kpis(data)
        # S = 3, E = 3 + 1 - 1 = 3, N = 1: CRR = (3 - 1) / 3 = 66.67 %.
        assert (item["customers_start"], item["customers_end"], item["new_customers"]) == (3, 3, 1)
        assert (item["crr"], item["churn_rate"]) == (Decimal("66.67"), Decimal("33.33"))
        assert item["active_customers"] == 4  # as counted per period
        assert (item["net_revenue"], item["average_order_value"], item["purchase_frequency"]) == (
            Decimal(90),
            Decimal(45),
            Decimal(2),
        )
        assert (item["nps"], item["ces"], item["share_of_wallet"]) == (Decimal(25), Decimal("4.5"), Decimal(30))


def summary(customers: list[tuple[str, int, Decimal]]) -> kpis.Customers:
    """The figures the repository reads, taken from a plain list."""
    ranked = sorted(customers, key=lambda c: (-c[2], c[0]))
    n = len(ranked)
    return kpis.Customers(
        n=n,
        orders=sum(c[1] for c in ranked),
        total=sum((c[2] for c in ranked), Decimal(0)),
        at_least={k: sum(1 for c in ranked if c[1] >= k) for k in range(1, 6)},
        prefix={r: sum((c[2] for c in ranked[:r]), Decimal(0)) for r in kpis.cut_ranks(n)},
        values={r: ranked[r - 1][2] for r in kpis.quantile_ranks(n)} if n else {},
        top=ranked[: kpis.TOP_CUSTOMERS],
    )


class TestLifetime:
    def test_one_customer(self) -> None:
        out = kpis.lifetime(summary([("c", 3, Decimal("120"))]))
        assert (out["customers"], out["repeat_purchase_rate"]) == (1, Decimal(100))
        assert out["p_nth_purchase"] == {"2": Decimal(100), "3": Decimal(100), "4": Decimal(0), "5": None}
        assert out["pareto_top20_share"] == Decimal(0)  # floor(0.2) = 0 customers
        assert out["clv"]["median"] == Decimal(120)  # type: ignore[index]

    def test_ten_customers_pareto(self) -> None:
        # Net revenues 1..10 (sum 55): the top 2 (10 + 9) make 34.55 %; the curve's 50 % point 40/55.
        customers = [(f"c{i}", 1 if i < 7 else 2, Decimal(i)) for i in range(1, 11)]
        out = kpis.lifetime(summary(customers))
        assert out["pareto_top20_share"] == Decimal("34.55")
        curve = out["pareto_curve"]
        assert curve[4] == {"customers_share": Decimal(50), "revenue_share": Decimal("72.73")}  # type: ignore[index]
        assert curve[9]["revenue_share"] == Decimal(100)  # type: ignore[index]
        assert out["repeat_purchase_rate"] == Decimal(40)
        clv = out["clv"]
        assert (clv["mean"], clv["median"], clv["p90"]) == (Decimal("5.5"), Decimal("5.5"), Decimal("9.1"))  # type: ignore[index]

    def test_no_customers(self) -> None:
        out = kpis.lifetime(kpis.Customers())
        assert (out["customers"], out["repeat_purchase_rate"], out["pareto_top20_share"]) == (0, None, None)
        assert out["clv"] == {"mean": None, "median": None, "p90": None, "top": []}

    def test_cohort_matrix(self) -> None:
        cells = {(D("2025-01-01"), D("2025-01-01")): 4, (D("2025-01-01"), D("2025-03-01")): 1}
        [row] = kpis.cohort_matrix("month", [D("2025-01-01")], cells, D("2025-03-15"))
        assert row["active"] == [4, 0, 1]
        assert row["retention"] == [Decimal(100), Decimal(0), Decimal(25)]


class TestLatestAnswers:
    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(
            st.tuples(st.integers(0, 3), st.integers(0, 60), st.integers(0, 10)),  # customer, day, nps
            max_size=30,
        ),
        st.integers(min_value=1, max_value=5),
        st.randoms(),
    )
    def test_counts_folded_in_batches_equal_the_latest_answers(
        self, raw: list[tuple[int, int, int]], batch: int, rnd: object
    ) -> None:
        base = datetime(2025, 1, 1, tzinfo=UTC)
        answers = [((f"c{c}", domain.period_start("month", (base + timedelta(days=d)).date())),
                    (base + timedelta(days=d), f"e{i}", nps)) for i, (c, d, nps) in enumerate(raw)]  # fmt: skip
        rnd.shuffle(answers)  # type: ignore[attr-defined]
        stored: dict[tuple[str, date], domain.Answer] = {}
        counts: dict[date, list[int]] = defaultdict(lambda: [0] * domain.SURVEY_COUNTS)
        for i in range(0, len(answers), batch):
            latest, changes = domain.latest_answers(stored, answers[i : i + batch])
            stored.update(latest)
            for (_, month), delta in changes.items():
                counts[month] = [a + b for a, b in zip(counts[month], delta, strict=True)]
        expected: dict[date, list[int]] = defaultdict(lambda: [0] * domain.SURVEY_COUNTS)
        best: dict[tuple[str, date], domain.Answer] = {}
        for key, answer in answers:
            if key not in best or answer[:2] > best[key][:2]:
                best[key] = answer
        for (_, month), (_, _, nps) in best.items():
            expected[month] = [a + b for a, b in zip(expected[month], domain.nps_counts(nps, 1), strict=True)]
        assert {k: v for k, v in counts.items() if any(v)} == dict(expected)
