"""The pure segment classifier: each segment and its boundaries worked out by hand, the precedence, and
properties (one segment always, deterministic, time alone only moves a customer towards `leaver`)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from metrics.segments import SEGMENTS, CustomerFacts, SegmentThresholds, classify, median_gap

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
DEFAULTS = SegmentThresholds()


def days_ago(n: float) -> datetime:
    return NOW - timedelta(days=n)


def regular(**changes: object) -> CustomerFacts:
    """A buyer since two years, 10 orders every ~30 days, the last 10 days ago: `loyal_passive` by default."""
    base = CustomerFacts(
        customer_id="c-1",
        first_purchase_at=days_ago(730),
        last_purchase_at=days_ago(10),
        orders=10,
        median_gap=timedelta(days=30),
        priced_orders=8,
        discounted_orders=1,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def segment(facts: CustomerFacts, thresholds: SegmentThresholds = DEFAULTS, *, window: int = 365) -> str:
    return classify(facts, thresholds, now=NOW, window_days=window).segment


class TestEachSegment:
    def test_a_regular_buyer_without_advocacy_is_loyal_passive(self) -> None:
        result = classify(regular(), DEFAULTS, now=NOW)
        assert result.segment == "loyal_passive"
        assert result.reason == "active buyer, 10 orders, no advocacy"

    @pytest.mark.parametrize(
        ("changes", "reason"),
        [
            ({"last_nps": 9, "last_nps_at": days_ago(100)}, "promoter (NPS 9) within 365 days"),
            ({"last_referral_at": days_ago(365)}, "referrer within 365 days"),
            ({"last_review_at": days_ago(1)}, "reviewer within 365 days"),
            (
                {"last_nps": 10, "last_nps_at": days_ago(3), "last_review_at": days_ago(2)},
                "promoter (NPS 10), reviewer within 365 days",
            ),
        ],
    )
    def test_a_promoter_referrer_or_reviewer_within_the_window_is_an_ambassador(
        self, changes: dict[str, object], reason: str
    ) -> None:
        result = classify(regular(**changes), DEFAULTS, now=NOW)
        assert (result.segment, result.reason) == ("ambassador", reason)

    @pytest.mark.parametrize(
        "changes",
        [
            {"last_nps": 8, "last_nps_at": days_ago(1)},  # a passive, not a promoter
            {"last_nps": 9, "last_nps_at": days_ago(365.01)},  # a promoter answer too old
            {"last_referral_at": days_ago(366)},
            {"last_review_at": days_ago(400)},
        ],
    )
    def test_advocacy_outside_the_window_or_a_passive_score_is_not_an_ambassador(
        self, changes: dict[str, object]
    ) -> None:
        assert segment(regular(**changes)) == "loyal_passive"

    def test_mostly_discounted_orders_and_few_orders_is_a_price_shopper(self) -> None:
        # 3 orders over 2 years = 1.5 a year < 4; 2 of the 3 orders discounted = 67 % >= 50 %.
        facts = regular(
            orders=3,
            priced_orders=3,
            discounted_orders=2,
            median_gap=timedelta(days=300),
            last_purchase_at=days_ago(30),
        )
        result = classify(facts, DEFAULTS, now=NOW)
        assert (result.segment, result.reason) == ("price_shopper", "67% of orders discounted, 1.5 orders a year")

    def test_price_shopper_boundaries(self) -> None:
        # Of its orders, 2 had lines (the others were booked without).
        base = regular(
            orders=3,
            priced_orders=2,
            discounted_orders=1,
            median_gap=timedelta(days=300),
            last_purchase_at=days_ago(30),
        )
        assert segment(base) == "price_shopper"  # exactly 50 % counts
        assert segment(replace(base, priced_orders=3)) == "loyal_passive"  # 1 of 3 = 33 %
        # 8 orders over 2 years = exactly 4 a year: not fewer than 4.
        assert segment(replace(base, orders=8)) == "loyal_passive"
        assert segment(replace(base, orders=7)) == "price_shopper"  # 3.5 a year
        # A tenure under a year counts as a year: 3 orders in 200 days are 3 a year, not 5.5.
        young = replace(base, first_purchase_at=days_ago(200))
        assert segment(young) == "price_shopper"
        assert segment(replace(base, priced_orders=0, discounted_orders=0)) == "loyal_passive"  # no lines known

    def test_buying_well_below_the_own_rhythm_is_at_risk(self) -> None:
        # Median gap 30 days, factor 2: 61 days since the last purchase is more than 60.
        result = classify(regular(last_purchase_at=days_ago(61)), DEFAULTS, now=NOW)
        assert result.segment == "at_risk"
        assert result.reason == "61.0 days since the last purchase, more than 2 x the median gap of 30.0 days"
        assert segment(regular(last_purchase_at=days_ago(60))) == "loyal_passive"  # exactly 2 x is not more

    def test_the_rhythm_needs_enough_orders_and_a_gap_of_at_least_a_day(self) -> None:
        assert segment(regular(orders=2, last_purchase_at=days_ago(200))) == "loyal_passive"  # no rhythm yet
        assert segment(regular(orders=3, last_purchase_at=days_ago(200))) == "at_risk"
        # Orders all on one day: the gap counts as one day, so 2 days later is more than 2 x 1 day ...
        same_day = regular(median_gap=timedelta(0), last_purchase_at=days_ago(2.01))
        assert segment(same_day) == "at_risk"
        assert segment(replace(same_day, last_purchase_at=days_ago(1.99))) == "loyal_passive"

    def test_a_low_p_alive_is_at_risk(self) -> None:
        result = classify(regular(p_alive=0.29), DEFAULTS, now=NOW)
        assert (result.segment, result.reason) == ("at_risk", "P(alive) 0.29 under 0.3")
        assert segment(regular(p_alive=0.3)) == "loyal_passive"

    def test_no_purchase_within_the_activity_window_is_a_leaver(self) -> None:
        result = classify(regular(last_purchase_at=days_ago(366)), DEFAULTS, now=NOW, window_days=365)
        assert (result.segment, result.reason) == ("leaver", "no purchase for 366.0 days (activity window 365)")
        # Exactly the window is still active (then at risk by its rhythm).
        assert segment(regular(last_purchase_at=days_ago(365))) == "at_risk"
        assert segment(regular(last_purchase_at=days_ago(100)), window=99) == "leaver"

    def test_a_detractor_who_stopped_buying_is_a_leaver(self) -> None:
        # Answered 0-6 and no purchase since, for more than 90 days.
        facts = regular(orders=2, last_purchase_at=days_ago(100), last_nps=6, last_nps_at=days_ago(91))
        result = classify(facts, DEFAULTS, now=NOW)
        assert result.segment == "leaver"
        assert result.reason == "detractor (NPS 6) without a purchase for 91.0 days since the answer (limit 90)"
        assert segment(replace(facts, last_nps_at=days_ago(90))) == "loyal_passive"  # not yet
        assert segment(replace(facts, last_nps=7)) == "loyal_passive"  # a passive, not a detractor
        # A purchase after the answer: still buying.
        assert segment(replace(facts, last_purchase_at=days_ago(50))) == "loyal_passive"

    def test_a_recent_first_purchase_is_new(self) -> None:
        facts = regular(first_purchase_at=days_ago(90), orders=1, median_gap=None, last_purchase_at=days_ago(90))
        result = classify(facts, DEFAULTS, now=NOW)
        assert (result.segment, result.reason) == ("new", "first purchase 90.0 days ago")
        assert segment(replace(facts, first_purchase_at=days_ago(91), last_purchase_at=days_ago(91))) == "loyal_passive"


class TestPrecedence:
    def test_leaver_before_everything(self) -> None:
        facts = regular(last_purchase_at=days_ago(400), last_review_at=days_ago(1), p_alive=0.01)
        assert segment(facts) == "leaver"

    def test_at_risk_before_new_and_ambassador(self) -> None:
        new_but_fading = regular(
            first_purchase_at=days_ago(80), orders=3, median_gap=timedelta(days=5), last_purchase_at=days_ago(20)
        )
        assert segment(new_but_fading) == "at_risk"
        assert segment(regular(p_alive=0.1, last_referral_at=days_ago(1))) == "at_risk"

    def test_new_before_ambassador_and_ambassador_before_price_shopper(self) -> None:
        assert segment(regular(first_purchase_at=days_ago(10), last_review_at=days_ago(1))) == "new"
        shopper = regular(
            orders=3,
            priced_orders=10,
            discounted_orders=9,
            median_gap=timedelta(days=300),
            last_purchase_at=days_ago(30),
        )
        assert segment(replace(shopper, last_review_at=days_ago(5))) == "ambassador"


class TestThresholds:
    def test_each_threshold_is_the_tenants(self) -> None:
        strict = SegmentThresholds(
            new_days=400, advocacy_days=5, rhythm_factor=1.0, p_alive_min=0.9, detractor_silence_days=1
        )
        assert segment(regular(first_purchase_at=days_ago(390), last_purchase_at=days_ago(1))) == "loyal_passive"
        assert segment(regular(first_purchase_at=days_ago(390), last_purchase_at=days_ago(1)), strict) == "new"
        assert segment(regular(last_review_at=days_ago(6)), strict) == "loyal_passive"
        assert segment(regular(last_purchase_at=days_ago(31)), strict) == "at_risk"
        assert segment(regular(p_alive=0.8), strict) == "at_risk"

    @pytest.mark.parametrize(
        "bad",
        [{"new_days": 0}, {"rhythm_factor": 0.5}, {"p_alive_min": 1.5}, {"rhythm_min_orders": 1}, {"unknown": 1}],
    )
    def test_out_of_bounds_thresholds_are_refused(self, bad: dict[str, object]) -> None:
        with pytest.raises(ValidationError):
            SegmentThresholds.model_validate(bad)


def test_median_gap() -> None:
    times = [days_ago(0), days_ago(30), days_ago(10), days_ago(100)]  # gaps 70, 20, 10 -> median 20
    assert median_gap(times) == timedelta(days=20)
    assert median_gap([days_ago(0), days_ago(4)]) == timedelta(days=4)
    assert median_gap([days_ago(3)]) is None


# --- properties ---------------------------------------------------------------------------------------

DAYS = st.floats(min_value=0, max_value=2000, allow_nan=False)
thresholds_st = st.builds(
    SegmentThresholds,
    new_days=st.integers(1, 500),
    advocacy_days=st.integers(1, 500),
    rhythm_factor=st.floats(1.0, 10.0),
    rhythm_min_orders=st.integers(2, 10),
    p_alive_min=st.floats(0.0, 1.0),
    detractor_silence_days=st.integers(1, 500),
    price_shopper_min_discounted_share=st.floats(0.01, 1.0),
    price_shopper_max_orders_per_year=st.floats(0.0, 50.0),
)


@st.composite
def facts_st(draw: st.DrawFn) -> CustomerFacts:
    first = draw(DAYS)
    last = draw(st.floats(min_value=0, max_value=first))
    orders = draw(st.integers(1, 200))
    priced = draw(st.integers(0, orders))
    optional_day = st.none() | DAYS
    nps_at = draw(optional_day)
    return CustomerFacts(
        customer_id="c",
        first_purchase_at=days_ago(first),
        last_purchase_at=days_ago(last),
        orders=orders,
        median_gap=None if orders < 2 else timedelta(days=draw(st.floats(0, 400))),
        priced_orders=priced,
        discounted_orders=draw(st.integers(0, priced)),
        last_nps=None if nps_at is None else draw(st.integers(0, 10)),
        last_nps_at=None if nps_at is None else days_ago(nps_at),
        last_review_at=(lambda d: None if d is None else days_ago(d))(draw(optional_day)),
        last_referral_at=(lambda d: None if d is None else days_ago(d))(draw(optional_day)),
        p_alive=draw(st.none() | st.floats(0.0, 1.0)),
    )


@settings(max_examples=400, deadline=None)
@given(
    facts=facts_st(),
    thresholds=thresholds_st,
    window=st.integers(1, 1000),
    later=st.lists(DAYS, min_size=1, max_size=5),
)
def test_time_alone_only_moves_a_customer_towards_leaver(
    facts: CustomerFacts, thresholds: SegmentThresholds, window: int, later: list[float]
) -> None:
    times = [NOW + timedelta(days=d) for d in sorted(later)]
    path = [classify(facts, thresholds, now=t, window_days=window) for t in [NOW, *times]]
    assert all(c.segment in SEGMENTS and c.reason for c in path)
    # Deterministic: the same inputs give the same answer.
    assert classify(facts, thresholds, now=NOW, window_days=window) == path[0]
    for earlier, after in pairwise(path):
        if earlier.segment == "leaver":
            assert after.segment == "leaver"
        if earlier.segment == "at_risk":
            assert after.segment in ("at_risk", "leaver")
        if after.segment == "new":
            assert earlier.segment == "new"
    # Far enough in the future, everyone without a new purchase has left.
    assert classify(facts, thresholds, now=NOW + timedelta(days=window + 3000), window_days=window).segment == "leaver"


@settings(max_examples=300, deadline=None)
@given(facts=facts_st(), thresholds=thresholds_st)
def test_the_segment_matches_a_reference_reading_of_the_rules(
    facts: CustomerFacts, thresholds: SegmentThresholds
) -> None:
    # The documented precedence, written independently as predicates over day counts.
    t, day = thresholds, timedelta(days=1)
    since_last = (NOW - facts.last_purchase_at) / day
    leaver = since_last > 365 or (
        facts.last_nps is not None
        and facts.last_nps <= 6
        and facts.last_nps_at is not None
        and facts.last_purchase_at <= facts.last_nps_at
        and (NOW - facts.last_nps_at) / day > t.detractor_silence_days
    )
    # The rhythm in seconds (a gap of at least a day), as the rule is stated.
    gap = None if facts.median_gap is None else max(facts.median_gap.total_seconds(), 86400.0)
    since_last_s = (NOW - facts.last_purchase_at).total_seconds()
    at_risk = (facts.orders >= t.rhythm_min_orders and gap is not None and since_last_s > gap * t.rhythm_factor) or (
        facts.p_alive is not None and facts.p_alive < t.p_alive_min
    )
    new = (NOW - facts.first_purchase_at) / day <= t.new_days

    def recent(at: datetime | None) -> bool:
        return at is not None and (NOW - at) / day <= t.advocacy_days

    ambassador = (
        (facts.last_nps is not None and facts.last_nps >= 9 and recent(facts.last_nps_at))
        or recent(facts.last_referral_at)
        or recent(facts.last_review_at)
    )
    years = max(1.0, (NOW - facts.first_purchase_at) / day / 365)
    shopper = (
        facts.priced_orders > 0
        and facts.discounted_orders / facts.priced_orders >= t.price_shopper_min_discounted_share
        and facts.orders / years < t.price_shopper_max_orders_per_year
    )
    expected = next(
        name
        for name, holds in [
            ("leaver", leaver),
            ("at_risk", at_risk),
            ("new", new),
            ("ambassador", ambassador),
            ("price_shopper", shopper),
            ("loyal_passive", True),
        ]
        if holds
    )
    assert classify(facts, thresholds, now=NOW).segment == expected
