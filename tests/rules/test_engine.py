"""The pure rule engine: every action kind, priorities, caps, windows, tiers and refunds, with the
expected points worked out by hand in each test."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rules import ruleset as rs
from rules.engine import (
    INPUT_CHARACTERS,
    INPUT_ITEMS,
    AwardRecord,
    CompiledRuleset,
    Condition,
    CustomerSnapshot,
    Evaluation,
    EventRefused,
    _fields_read,
    _fmt,
    _kept_from,
    _months_back_from,
    apply_event,
    check_referral,
    check_refund,
    command_id,
    evaluate,
    month_key,
    plan_clawbacks,
    review_tier,
)
from shared.events import EventAttended, SurveyAnswered, business_id, make_event
from tests.rules.helpers import interpreted_engine
from tests.rules.samples import (
    BASE,
    NESTED_COMPREHENSIONS,
    T0,
    TIERS,
    custom,
    doc,
    line,
    order,
    referral,
    refund,
    review,
)

TENANT = "t-engine"


def compiled(document: dict[str, Any], version: int = 1) -> CompiledRuleset:
    return CompiledRuleset.compile("main", version, rs.parse(document))


def run(document: dict[str, Any], event: Any, state: CustomerSnapshot | None = None, **kw: Any) -> Evaluation:
    return evaluate(compiled(document), event, state or CustomerSnapshot(event.data.customer_id), **kw)


def points(evaluation: Evaluation) -> dict[str, int]:
    return {o.rule_id: o.points for o in evaluation.trace if o.fired}


class TestPointsPerUnit:
    def test_floor_rounding_of_net_amount(self) -> None:
        # 2 x 10.75 = 21.50 -> 21 points at 1/EUR, floor
        ev = run(doc(BASE), order(TENANT, "c", [line("A", "tools", "2", "10.75")]))
        assert ev.total_points == 21
        assert "21.5 EUR eligible * 1 pt/EUR" in ev.commands[0].breakdown[0].explanation

    def test_an_order_with_totals_only_earns_on_its_net_amount(self) -> None:
        event = order(TENANT, "c", [], net="250.70")
        evaluation = run(
            doc(BASE, {"id": "x2", "kind": "line_multiplier", "categories": ["tools"], "multiplier": "2"}), event
        )
        assert points(evaluation) == {"base": 250}
        assert evaluation.total_points == 250

    def test_an_award_over_a_commands_maximum_refuses_the_event(self) -> None:
        # 8 x 10^11 EUR: at 1 pt/EUR within the 10^12 a points command carries, at 2 pt/EUR over it.
        event = order(TENANT, "c", [], net="800000000000")
        assert run(doc(BASE), event).total_points == 8 * 10**11
        with pytest.raises(EventRefused, match="exceeds the maximum of 1000000000000"):
            run(doc(BASE, currencies={"EUR": {"points_per_unit": "2"}}), event)
        # Two awards within the bound whose command together is over it.
        with pytest.raises(EventRefused, match="an award of 1600000000000 points"):
            run(doc(BASE, {**BASE, "id": "again"}), event)

    def test_half_up_rounding_and_rate_per_currency(self) -> None:
        # 21.50 USD x 2 pts/USD = 43.00; 10.25 x 2 = 20.50 -> half_up 21
        document = doc(BASE, currencies={"USD": {"points_per_unit": "2"}}, rounding="half_up")
        assert run(document, order(TENANT, "c", [line("A", "x", "1", "10.25")], currency="USD")).total_points == 21

    def test_factor(self) -> None:
        # 40.00 x 1 x 0.5 = 20
        document = doc({**BASE, "factor": "0.5"})
        assert run(document, order(TENANT, "c", [line("A", "x", "4", "10")])).total_points == 20

    def test_exclusions_gift_cards_shipping_and_discounted_lines(self) -> None:
        lines = [
            line("A", "tools", "1", "100"),
            line("GIFT", "gift", "1", "50", gift_card=True),
            line("SHIP", "shipping", "1", "7.50", shipping=True),
            line("B", "tools", "1", "30", discount=Decimal("5")),
        ]
        # default exclusions: gift cards and shipping out -> 100 + (30 - 5) = 125
        assert run(doc(BASE), order(TENANT, "c", lines)).total_points == 125
        # discounted lines excluded too -> 100
        document = doc(BASE, exclusions={"discounted_lines": True})
        assert run(document, order(TENANT, "c", lines)).total_points == 100
        # nothing excluded -> 100 + 50 + 7.50 + 25 = 182.50 -> 182
        document = doc(BASE, exclusions={"gift_cards": False, "shipping": False})
        assert run(document, order(TENANT, "c", lines)).total_points == 182

    def test_excluded_category(self) -> None:
        document = doc(BASE, exclusions={"categories": ["tobacco"]})
        lines = [line("A", "tools", "1", "10"), line("T", "tobacco", "1", "90")]
        assert run(document, order(TENANT, "c", lines)).total_points == 10

    def test_unknown_currency_is_refused(self) -> None:
        with pytest.raises(EventRefused, match="unknown currency 'JPY'"):
            run(doc(BASE), order(TENANT, "c", [line("A", "x", "1", "10")], currency="JPY"))


class TestLineMultiplier:
    def test_by_sku_and_by_category(self) -> None:
        lines = [line("HERO", "tools", "1", "20"), line("P1", "paint", "2", "5"), line("X", "misc", "1", "3")]
        document = doc(
            BASE,
            {"id": "hero-x3", "kind": "line_multiplier", "skus": ["HERO"], "multiplier": "3"},
            {"id": "paint-x2", "kind": "line_multiplier", "categories": ["paint"], "multiplier": "2"},
        )
        # base 20 + 10 + 3 = 33; HERO extra 20 x (3-1) = 40; paint extra 10 x (2-1) = 10
        ev = run(document, order(TENANT, "c", lines))
        assert points(ev) == {"base": 33, "hero-x3": 40, "paint-x2": 10}
        assert ev.total_points == 83

    def test_line_condition_in_cel(self) -> None:
        lines = [line("A", "tools", "10", "2"), line("B", "tools", "1", "50")]
        document = doc(
            BASE, {"id": "bulk", "kind": "line_multiplier", "line_when": "line.quantity >= 10.0", "multiplier": "1.5"}
        )
        # base 20 + 50 = 70; bulk line A: 20 x 0.5 = 10
        assert points(run(document, order(TENANT, "c", lines))) == {"base": 70, "bulk": 10}


class TestBonuses:
    def test_first_purchase(self) -> None:
        document = doc(BASE, {"id": "first", "kind": "bonus", "points": 100, "when": "customer.purchase_count == 0"})
        event = order(TENANT, "c", [line("A", "x", "1", "10")])
        assert run(document, event).total_points == 110
        assert run(document, event, CustomerSnapshot("c", purchase_count=1)).total_points == 10

    def test_nth_purchase(self) -> None:
        document = doc({"id": "third", "kind": "bonus", "points": 30, "when": "customer.purchase_count + 1 == 3"})
        event = order(TENANT, "c", [line("A", "x", "1", "10")])
        assert run(document, event, CustomerSnapshot("c", purchase_count=2)).total_points == 30
        assert run(document, event, CustomerSnapshot("c", purchase_count=3)).total_points == 0

    def test_cross_sell_first_purchase_in_a_new_category(self) -> None:
        document = doc(
            {
                "id": "cross",
                "kind": "bonus",
                "points": 25,
                "when": "customer.purchase_count > 0 && size(event.new_categories) > 0",
            }
        )
        event = order(TENANT, "c", [line("A", "tools", "1", "10"), line("B", "paint", "1", "10")])
        known = CustomerSnapshot("c", purchase_count=4, categories={"tools"})
        assert run(document, event, known).total_points == 25
        seen_all = CustomerSnapshot("c", purchase_count=4, categories={"tools", "paint"})
        assert run(document, event, seen_all).total_points == 0

    def test_up_sell_order_above_an_amount(self) -> None:
        document = doc({"id": "up", "kind": "bonus", "points": 75, "when": "event.net_amount >= 500.0"})
        assert run(document, order(TENANT, "c", [line("A", "x", "1", "500")])).total_points == 75
        assert run(document, order(TENANT, "c", [line("A", "x", "1", "499.99")])).total_points == 0


class TestTierMultiplier:
    def test_multiplies_the_points_of_earlier_rules(self) -> None:
        document = doc(BASE, {"id": "tier", "kind": "tier_multiplier", "priority": -1}, tiers=TIERS)
        event = order(TENANT, "c", [line("A", "x", "1", "41")])
        # Gold x2: 41 + 41 x (2 - 1) = 82; Silver x1.5: 41 + floor(20.5) = 61; Bronze: 41
        assert run(document, event, CustomerSnapshot("c", tier="Gold")).total_points == 82
        assert run(document, event, CustomerSnapshot("c", tier="Silver")).total_points == 61
        assert run(document, event, CustomerSnapshot("c", tier="Bronze")).total_points == 41

    def test_rule_level_multipliers_override_the_tier_definition(self) -> None:
        document = doc(
            BASE, {"id": "tier", "kind": "tier_multiplier", "priority": -1, "multipliers": {"Gold": "3"}}, tiers=TIERS
        )
        assert (
            run(
                document, order(TENANT, "c", [line("A", "x", "1", "10")]), CustomerSnapshot("c", tier="Gold")
            ).total_points
            == 30
        )


class TestCampaigns:
    def test_date_window(self) -> None:
        document = doc(
            BASE,
            {"id": "spring", "kind": "bonus", "points": 40, "campaign": "spring"},
            campaigns={"spring": {"starts_at": "2026-03-01T00:00:00Z", "ends_at": "2026-04-01T00:00:00Z"}},
        )
        lines = [line("A", "x", "1", "10")]
        assert run(document, order(TENANT, "c", lines, at=T0)).total_points == 50
        assert run(document, order(TENANT, "c", lines, at=T0 + timedelta(days=30))).total_points == 10
        before = run(document, order(TENANT, "c", lines, at=T0 - timedelta(days=10)))
        assert before.total_points == 10
        assert "not yet valid" in next(o.explanation for o in before.trace if o.rule_id == "spring")

    def test_rule_validity_window(self) -> None:
        document = doc({**BASE, "valid_until": "2026-03-10T12:00:00Z"})
        assert run(document, order(TENANT, "c", [line("A", "x", "1", "10")], at=T0)).total_points == 0

    def test_budget_limits_the_campaign_points(self) -> None:
        document = doc(
            {"id": "promo", "kind": "bonus", "points": 40, "campaign": "promo"},
            campaigns={"promo": {"budget": 100}},
        )
        event = order(TENANT, "c", [line("A", "x", "1", "10")])
        assert run(document, event, campaign_spent={"promo": 0}).total_points == 40
        # 100 - 70 spent = 30 left
        ev = run(document, event, campaign_spent={"promo": 70})
        assert ev.total_points == 30
        assert ev.campaign_points == {"promo": 30}
        assert run(document, event, campaign_spent={"promo": 100}).commands == []


class TestCaps:
    def test_rule_max_points(self) -> None:
        document = doc({**BASE, "max_points": 50})
        assert run(document, order(TENANT, "c", [line("A", "x", "1", "80")])).total_points == 50

    def test_per_order_cap_trims_the_lowest_priority_rule_first(self) -> None:
        document = doc(
            BASE,
            {"id": "bonus", "kind": "bonus", "points": 50, "priority": 10},
            caps={"per_order": 100},
        )
        # base 80 (priority 100) + bonus 50 (priority 10) = 130 -> cut 30 from the bonus
        ev = run(document, order(TENANT, "c", [line("A", "x", "1", "80")]))
        assert points(ev) == {"base": 80, "bonus": 20}

    def test_per_customer_per_period_cap_counts_earlier_awards(self) -> None:
        document = doc(BASE, caps={"per_customer": {"points": 100, "period": "month"}})
        state = CustomerSnapshot("c", counters={"cap:month:2026-03": 70})
        ev = run(document, order(TENANT, "c", [line("A", "x", "1", "80")]), state)
        assert ev.total_points == 30
        assert ev.counters["c"]["cap:month:2026-03"] == 30
        # next month starts afresh
        april = order(TENANT, "c", [line("A", "x", "1", "80")], at=T0 + timedelta(days=30))
        assert run(document, april, state).total_points == 80


class TestPriorityAndStop:
    def test_stop_skips_lower_priorities(self) -> None:
        document = doc(
            {"id": "low", "kind": "bonus", "points": 5, "priority": 1},
            {
                "id": "vip",
                "kind": "bonus",
                "points": 100,
                "priority": 50,
                "stop": True,
                "when": "event.net_amount > 1000.0",
            },
            {"id": "mid", "kind": "bonus", "points": 10, "priority": 20},
        )
        big = run(document, order(TENANT, "c", [line("A", "x", "1", "2000")]))
        assert points(big) == {"vip": 100}
        small = run(document, order(TENANT, "c", [line("A", "x", "1", "10")]))
        assert [o.rule_id for o in small.trace if o.fired] == ["mid", "low"]
        assert small.total_points == 15

    def test_equal_priority_keeps_document_order(self) -> None:
        document = doc(
            {"id": "b", "kind": "bonus", "points": 1, "stop": True},
            {"id": "a", "kind": "bonus", "points": 2},
        )
        assert points(run(document, order(TENANT, "c", [line("A", "x", "1", "1")]))) == {"b": 1}


class TestEngagement:
    def test_review_with_a_monthly_limit(self) -> None:
        document = doc(
            {
                "id": "review",
                "kind": "engagement",
                "on": "review.posted",
                "points": 20,
                "limit": {"count": 2, "period": "month"},
            }
        )
        assert run(document, review(TENANT, "c")).total_points == 20
        full = CustomerSnapshot("c", counters={"limit:review:month:2026-03": 2})
        ev = run(document, review(TENANT, "c"), full)
        assert ev.total_points == 0
        assert "limit of 2 per month reached" in ev.trace[0].explanation

    def test_referral_awards_referrer_and_referred(self) -> None:
        document = doc(
            {"id": "ref", "kind": "engagement", "on": "referral.converted", "points": 200, "referred_points": 50}
        )
        ev = run(document, referral(TENANT, "a", "b"), referred=CustomerSnapshot("b"))
        assert {(c.customer_id, c.points) for c in ev.commands} == {("a", 200), ("b", 50)}
        assert len({c.command_id for c in ev.commands}) == 2

    def test_declared_custom_event(self) -> None:
        document = doc(
            {
                "id": "webinar",
                "kind": "engagement",
                "on": "custom.webinar",
                "points": 15,
                "when": "event.minutes >= 30",
            },
            custom_events=["webinar"],
        )
        assert run(document, custom(TENANT, "c", "webinar", minutes=45)).total_points == 15
        assert run(document, custom(TENANT, "c", "webinar", minutes=10)).total_points == 0
        with pytest.raises(EventRefused, match="not declared"):
            run(document, custom(TENANT, "c", "podcast"))

    def test_purchase_rules_ignore_engagement(self) -> None:
        assert run(doc(BASE), review(TENANT, "c")).commands == []


class TestPendingAndCommands:
    def test_pending_days_per_rule_split_commands(self) -> None:
        document = doc(BASE, {"id": "bonus", "kind": "bonus", "points": 10, "pending_days": 0}, pending_days=14)
        ev = run(document, order(TENANT, "c", [line("A", "x", "1", "30")]))
        by_points = {c.points: c for c in ev.commands}
        assert by_points[30].matures_at == T0 + timedelta(days=14)
        assert by_points[10].matures_at is None

    def test_same_input_same_command_ids_and_breakdown(self) -> None:
        document = doc(BASE, {"id": "first", "kind": "bonus", "points": 100, "when": "customer.purchase_count == 0"})
        event = order(TENANT, "c", [line("A", "x", "1", "10")])
        first, again = run(document, event), run(document, event)
        assert first.commands == again.commands
        other_version = evaluate(compiled(document, version=2), event, CustomerSnapshot("c"))
        assert other_version.commands[0].command_id != first.commands[0].command_id


class TestState:
    def test_apply_event_updates_the_customer(self) -> None:
        state = CustomerSnapshot("c")
        event = order(TENANT, "c", [line("A", "tools", "2", "50"), line("B", "paint", "1", "20")])
        apply_event(state, event, spend_factor=Decimal(1), points=120, counters={"cap:month:2026-03": 120})
        assert state.purchase_count == 1
        assert state.first_purchase_at == T0 == state.last_purchase_at
        assert state.spend_12m(T0) == Decimal(120)
        assert state.points_12m(T0) == 120
        assert state.categories == {"tools", "paint"}
        # a year and a month later the spend has rolled out of the 12-month window
        assert state.spend_12m(T0 + timedelta(days=400)) == 0


class TestTiers:
    def test_upgrade_at_once_downgrade_one_level_at_review(self) -> None:
        tiers = rs.Tiers.model_validate(TIERS)
        state = CustomerSnapshot("c", spend_by_month={"2026-03": Decimal(6000)})
        change = review_tier(state, tiers, T0)
        assert change is not None
        assert (change.previous, change.tier) == (None, "Gold")
        # 13 months later nothing counts any more: qualified Bronze, but one level per review -> Silver
        later = T0 + timedelta(days=400)
        down = review_tier(state, tiers, later)
        assert down is not None
        assert (down.previous, down.tier) == ("Gold", "Silver")
        # the next review is 90 days away: no change before, one more level after
        assert review_tier(state, tiers, later + timedelta(days=10)) is None
        final = review_tier(state, tiers, later + timedelta(days=91))
        assert final is not None
        assert final.tier == "Bronze"

    def test_points_basis(self) -> None:
        tiers = rs.Tiers.model_validate({**TIERS, "basis": "points_12m"})
        state = CustomerSnapshot("c", tier="Bronze", points_by_month={"2026-03": 1000})
        change = review_tier(state, tiers, T0)
        assert change is not None
        assert change.tier == "Silver"


class TestClawbacks:
    def test_proportional_and_cumulative(self) -> None:
        awards = [AwardRecord("earn-1", "c", 101, 0)]
        # 30 of 100 refunded: 101 x 0.3 = 30.3 -> 30
        first = plan_clawbacks(
            TENANT, "r1", awards, order_net=Decimal(100), refunded_before=Decimal(0), refunded_now=Decimal(30)
        )
        assert [p.points for p in first] == [30]
        # the rest (70): the total clawed is 101, so 71 now
        after = [AwardRecord("earn-1", "c", 101, 30)]
        rest = plan_clawbacks(
            TENANT, "r2", after, order_net=Decimal(100), refunded_before=Decimal(30), refunded_now=Decimal(70)
        )
        assert [p.points for p in rest] == [71]
        assert rest[0].command_id != first[0].command_id
        assert rest[0].original_command_id == "earn-1"


class TestConditions:
    def test_fields_read(self) -> None:
        assert _fields_read("event.net_amount > 1.0 && event.channel == 'x'", "event") == ("channel", "net_amount")
        assert _fields_read("size(event) > 1", "event") is None
        assert _fields_read("event['x'] == 1", "event") is None
        # a bare name inside a string is taken as a whole-map use: slower, never wrong
        assert _fields_read("customer.tier == 'event' && event.x", "event") is None

    def test_memoized_projection_equals_full_evaluation(self) -> None:
        import cel

        source = "event.net_amount > 100.0 && customer.tier in ['Gold', 'Silver'] && size(event.categories) > 1"
        condition = Condition(source)
        program = cel.compile(source)
        cases = [
            ({"net_amount": 150.0, "categories": ("a", "b"), "channel": "x"}, {"tier": "Gold", "purchase_count": 1}),
            ({"net_amount": 150.0, "categories": ("a",), "channel": "x"}, {"tier": "Gold", "purchase_count": 1}),
            ({"net_amount": 50.0, "categories": ("a", "b"), "channel": "y"}, {"tier": "Silver", "purchase_count": 2}),
            ({"net_amount": 150.0, "categories": ("a", "b"), "channel": "y"}, {"tier": "", "purchase_count": 2}),
        ]
        for event, customer in cases * 2:  # the second round is answered from the memo
            expected = program.execute({"event": event, "customer": customer})
            assert condition({"event": event, "customer": customer}) is expected

    def test_a_failing_condition_does_not_fire(self) -> None:
        document = doc({"id": "bad", "kind": "bonus", "points": 5, "when": "event.rating > 3"})
        ev = run(document, order(TENANT, "c", [line("A", "x", "1", "1")]))
        assert ev.total_points == 0
        assert "failed" in ev.trace[0].explanation


class TestFastPaths:
    """The per-version shortcuts (restricted views, Python comparisons, shared skipped outcomes) give
    exactly what CEL over the full views gives."""

    def test_line_rule_with_skus_and_a_line_condition(self) -> None:
        # The line view holds only `quantity` (what the condition reads); the SKU filter reads the line.
        rule = {"id": "bulk-a", "kind": "line_multiplier", "skus": ["A"], "line_when": "line.quantity >= 10.0"}
        document = doc(BASE, {**rule, "multiplier": "2"})
        ev = run(
            document,
            order(TENANT, "c", [line("A", "x", "10", "1"), line("B", "x", "10", "1"), line("A", "x", "1", "5")]),
        )
        # base 25; bulk-a: only the first line (A, 10 units) = 10 * (2 - 1) = 10
        assert points(ev) == {"base": 25, "bulk-a": 10}
        assert "lines A: 10 EUR" in next(o.explanation for o in ev.trace if o.rule_id == "bulk-a")

    @pytest.mark.parametrize(
        "source",
        [
            "event.net_amount >= 20.0",
            "event.net_amount < 20.0",
            "event.net_amount == 25.0",
            "event.line_count > 1",
            "event.line_count != 2",
            "event.channel == 'webshop'",
            'event.channel != "erp"',
            "event.net_amount >= 20",  # int literal against a double: CEL decides (no Python shortcut)
            "event.channel < 'x'",  # string ordering: CEL decides
        ],
    )
    def test_simple_comparisons_match_cel(self, source: str) -> None:
        import cel

        event = order(TENANT, "c", [line("A", "x", "2", "10"), line("B", "y", "1", "5")])
        document = doc(BASE, {"id": "b", "kind": "bonus", "points": 7, "when": source})
        ev = run(document, event)
        view = {"net_amount": 25.0, "line_count": 2, "channel": "webshop"}
        try:
            expected: object = cel.compile(source).execute({"event": view, "customer": {}})
        except Exception:  # any CEL failure counts as not met
            expected = "failed"
        fired = next(o for o in ev.trace if o.rule_id == "b").fired
        assert fired is (expected is True)

    def test_skipped_outcomes_are_shared_and_stay_unchanged(self) -> None:
        document = doc(
            BASE,
            {"id": "never", "kind": "bonus", "points": 5, "when": "event.net_amount > 1000000.0"},
            caps={"per_order": 10, "per_customer": {"points": 15, "period": "month"}},
        )
        c = compiled(document)
        state = CustomerSnapshot("c")
        totals, shared = [], set()
        # 1 EUR: 1 point; 50 EUR: the per-order cap trims to 10; 70 EUR: 11 of 15 this month, 4 left.
        for amount in ("1", "50", "70"):
            event = order(TENANT, "c", [line("A", "x", "1", amount)])
            ev = evaluate(c, event, state)
            apply_event(
                state, event, spend_factor=Decimal(1), points=ev.total_points, counters=ev.counters.get("c", {})
            )
            totals.append(ev.total_points)
            shared.add(id(next(o for o in ev.trace if o.rule_id == "never")))
        assert totals == [1, 10, 4]
        assert len(shared) == 1
        a = next(o for o in ev.trace if o.rule_id == "never")
        assert (a.fired, a.points, a.customer_id) == (False, 0, None)
        explanation = a.explanation
        assert explanation.startswith("condition not met")

    def test_re_evaluation_is_identical(self) -> None:
        document = doc(
            BASE,
            {"id": "cat", "kind": "line_multiplier", "categories": ["x"], "multiplier": "1.5"},
            {"id": "big", "kind": "bonus", "points": 9, "when": "event.net_amount >= 20.0"},
            caps={"per_order": 30},
        )
        event = order(TENANT, "c", [line("A", "x", "2", "10"), line("B", "y", "1", "5")])
        c = compiled(document)
        runs = [evaluate(c, event, CustomerSnapshot("c")) for _ in range(3)]
        shapes = [
            (
                [(o.rule_id, o.fired, o.points, o.explanation) for o in r.trace],
                [(p.command_id, p.points, p.breakdown) for p in r.commands],
            )
            for r in runs
        ]
        assert shapes[0] == shapes[1] == shapes[2]
        # base 25, cat 20 * 0.5 = 10, big 9: 44, per-order cap 30 trims the lowest priority first
        assert runs[0].total_points == 30

    @pytest.mark.parametrize(
        "source",
        [
            "event.net_amount >= 20.0",  # a simple comparison per literal type
            "event.line_count > 1",
            "customer.tier == 'Gold'",
            "size(event.categories) > 1",  # one field, memoized
            "customer.purchase_count > 0 && size(event.new_categories) > 0",  # two fields
            "event.net_amount > 10.0 && event.channel == 'webshop' && customer.tier != 'Gold'",  # three
        ],
    )
    def test_specialised_checks_match_cel(self, source: str) -> None:
        import cel

        program = cel.compile(source)
        events: list[dict[str, Any]] = [
            {"net_amount": 25.0, "line_count": 2, "channel": "webshop", "categories": ("a", "b"), "new_categories": ()},
            {"net_amount": 5.0, "line_count": 1, "channel": "erp", "categories": ("a",), "new_categories": ("a",)},
            {"net_amount": 25, "line_count": 2.0, "channel": "webshop"},  # other types, fields missing: CEL decides
            {},
        ]
        customers: list[dict[str, Any]] = [{"tier": "Gold", "purchase_count": 2}, {"tier": "", "purchase_count": 0}, {}]
        for event in events:
            for customer in customers:
                scope = {"event": event, "customer": customer}
                try:
                    expected: object = program.execute(scope)
                except Exception:  # any CEL failure counts as not met
                    expected = "failed"
                condition = Condition(source)  # a fresh memo: a miss, then a hit, then no memo
                for memo in (True, True, False):
                    result = condition(scope, memo)
                    assert (result if isinstance(result, bool) else "failed") == expected, (scope, memo)

    def test_line_rules_of_every_shape(self) -> None:
        document = doc(
            BASE,
            {"id": "double", "kind": "points_per_unit", "factor": "2", "max_points": 30, "priority": 50},
            {
                "id": "bulk-x",
                "kind": "line_multiplier",
                "categories": ["x"],
                "line_when": "line.quantity >= 2.0",
                "multiplier": "1.5",
            },
            {"id": "promo", "kind": "line_multiplier", "skus": ["B"], "multiplier": "2", "campaign": "c"},
            campaigns={"c": {"budget": 3}},
        )
        c = compiled(document)
        ev = evaluate(
            c,
            order(TENANT, "c", [line("A", "x", "2", "10"), line("B", "y", "1", "5"), line("C", "x", "1", "7")]),
            CustomerSnapshot("c"),
        )
        # whole basket 32; double 64, capped; bulk-x: line A only, 20 * 0.5; promo: line B, 5, budget 3
        assert [(o.rule_id, o.fired, o.points, o.explanation, o.campaign) for o in ev.trace] == [
            ("base", True, 32, "32 EUR eligible * 1 pt/EUR * factor 1 = 32 → 32 (floor)", None),
            (
                "double",
                True,
                30,
                "32 EUR eligible * 1 pt/EUR * factor 2 = 64 → 64 (floor); capped at the rule's max_points 30",
                None,
            ),
            ("bulk-x", True, 10, "lines A: 20 EUR * 1 pt/EUR * (multiplier 1.5 - 1) = 10 → 10 (floor)", None),
            (
                "promo",
                True,
                3,
                "lines B: 5 EUR * 1 pt/EUR * (multiplier 2 - 1) = 5 → 5 (floor); campaign 'c' budget leaves 3",
                "c",
            ),
        ]
        assert ev.campaign_points == {"c": 3}
        # Every line excluded: no line rule fires, each for the same shared reason.
        gift = evaluate(c, order(TENANT, "c", [line("B", "x", "2", "10", gift_card=True)]), CustomerSnapshot("c"))
        assert [(o.rule_id, o.fired, o.explanation) for o in gift.trace] == [
            (rule_id, False, "no eligible line") for rule_id in ("base", "double", "bulk-x", "promo")
        ]
        assert gift.commands == []

    def test_new_categories_keep_their_order(self) -> None:
        document = doc(
            {
                "id": "new-yz",
                "kind": "bonus",
                "points": 5,
                "when": "size(event.new_categories) == 2 && event.new_categories[0] == 'y'",
            }
        )
        event = order(TENANT, "c", [line("A", "z", "1", "1"), line("B", "x", "1", "1"), line("C", "y", "1", "1")])
        ev = run(document, event, CustomerSnapshot("c", categories={"x"}))
        assert points(ev) == {"new-yz": 5}

    def test_state_drops_only_what_is_past(self) -> None:
        # At T0 (2026-03-10) the last 13 months start at 2025-03; counters of periods before 2025 go.
        state = CustomerSnapshot(
            "c",
            spend_by_month={"2024-12": Decimal(1), "2025-03": Decimal(2), "2026-02": Decimal(3)},
            points_by_month={"2025-02": 4, "2025-04": 5},
            counters={"cap:month:2024-12": 5, "limit:r:week:2025-W10": 1, "limit:r:day:2026-03-09": 1, "plain": 2},
        )
        event = order(TENANT, "c", [line("A", "x", "1", "10")])
        apply_event(state, event, spend_factor=Decimal(1), points=7, counters={"cap:month:2026-03": 7})
        assert state.spend_by_month == {"2025-03": Decimal(2), "2026-02": Decimal(3), "2026-03": Decimal(10)}
        assert state.points_by_month == {"2025-04": 5, "2026-03": 7}
        assert state.counters == {
            "limit:r:week:2025-W10": 1,
            "limit:r:day:2026-03-09": 1,
            "plain": 2,
            "cap:month:2026-03": 7,
        }

    @pytest.mark.parametrize(
        "text", ["0", "-0", "0.000", "12.3400", "1E+5", "1.20E+3", "1E-6", "1E-7", "-2.5E-9", "NaN", "-Infinity"]
    )
    def test_formatting_edge_cases(self, text: str) -> None:
        assert _fmt(Decimal(text)) == format(Decimal(text).normalize(), "f")

    @settings(max_examples=500, deadline=None)
    @given(value=st.decimals(allow_nan=False, allow_infinity=False))
    def test_formatting_equals_fixed_point_of_the_normalized_value(self, value: Decimal) -> None:
        assert _fmt(value) == format(value.normalize(), "f")

    def test_line_explanations_per_currency_on_a_warm_version(self) -> None:
        # The arithmetic text is cached per currency on the version: switching currencies on one compiled
        # version writes what a fresh version writes for each event.
        document = doc(
            BASE,
            {"id": "tools", "kind": "line_multiplier", "categories": ["tools"], "multiplier": "1.5"},
            {"id": "tier", "kind": "tier_multiplier", "priority": -10},
            currencies={"EUR": {"points_per_unit": "1"}, "USD": {"points_per_unit": "2.50"}},
            tiers=TIERS,
        )
        warm = compiled(document)
        events = [
            order(TENANT, "c", [line("A", "tools", "3", "10.10")], currency=currency)
            for currency in ("EUR", "USD", "EUR", "USD")
        ]
        for event in events:
            state = CustomerSnapshot("c", tier="Silver")
            got = evaluate(warm, event, state)
            fresh = evaluate(compiled(document), event, CustomerSnapshot("c", tier="Silver"))
            assert [(o.rule_id, o.points, o.explanation) for o in got.trace] == [
                (o.rule_id, o.points, o.explanation) for o in fresh.trace
            ]
        usd = evaluate(warm, events[1], CustomerSnapshot("c", tier="Silver"))
        assert [o.explanation for o in usd.trace] == [
            "30.3 USD eligible * 2.5 pt/USD * factor 1 = 75.75 → 75 (floor)",
            "lines A: 30.3 USD * 2.5 pt/USD * (multiplier 1.5 - 1) = 37.875 → 37 (floor)",
            "tier Silver: 112 pts of earlier rules * (multiplier 1.5 - 1) = 56 → 56 (floor)",
        ]
        # The awards are built with the groups, the id from the version's cached part: what command_id gives.
        (earn,) = usd.commands
        assert earn.command_id == command_id("earn", TENANT, events[1].id, "main", 1, "c", 0)
        assert (earn.points, [(a.rule_id, a.points) for a in earn.breakdown]) == (
            168,
            [("base", 75), ("tools", 37), ("tier", 56)],
        )

    @settings(max_examples=300, deadline=None)
    @given(
        at=st.datetimes(min_value=datetime(1000, 2, 1), max_value=datetime(9998, 12, 1)),
        offset=st.integers(min_value=-23, max_value=23),
    )
    def test_cached_month_texts_equal_their_formatting(self, at: datetime, offset: int) -> None:
        aware = at.replace(tzinfo=timezone(timedelta(hours=offset)))
        utc = aware.astimezone(UTC)
        assert month_key(aware) == f"{utc.year:04d}-{utc.month:02d}"
        assert _kept_from(at.year, at.month) == (min(_months_back_from(at.year, at.month, 13)), str(at.year - 1))


class TestEventChecks:
    def test_business_ids_of_each_event_type(self) -> None:
        assert business_id(order(TENANT, "c1", [line("A", "x", "1", "1")])) is None, "an order row records it"
        assert business_id(custom(TENANT, "c1", "podcast")) is None
        refunded = refund(TENANT, "c1", "SO-1", "5")
        assert business_id(refunded) == ("refund_id", refunded.data.refund_id)
        posted = review(TENANT, "c1")
        assert business_id(posted) == ("review_id", posted.data.review_id)
        converted = referral(TENANT, "c1", "c2")
        assert business_id(converted) == ("referral_id", converted.data.referral_id)
        attended = make_event(
            "event.attended",
            EventAttended(attendance_id="A-1", customer_id="c1", event_name="expo"),
            tenant_id=TENANT,
            source="tests",
        )
        assert business_id(attended) == ("attendance_id", "A-1")

    def test_a_survey_counts_once_per_respondent_not_once(self) -> None:
        def answer(customer: str, member: str | None, survey: str = "NPS-1") -> Any:
            data = SurveyAnswered(survey_id=survey, customer_id=customer, member_id=member, nps=9)
            return business_id(make_event("survey.answered", data, tenant_id=TENANT, source="tests"))

        assert answer("c1", None) == answer("c1", None)
        assert len({answer("c1", None), answer("c2", None), answer("c1", "m1"), answer("c1", None, "NPS-2")}) == 4
        assert answer("c|1", None, "S") != answer("1", None, "S|c"), "no two respondents read the same"
        assert answer("c1", None) == ("survey_answer", '["NPS-1","c1",null]')
        long = answer("c" * 200, "m" * 200, "s" * 200)
        assert long is not None
        assert len(long[1]) <= 200, "fits a tracking row"

    def test_a_self_referral_is_refused(self) -> None:
        with pytest.raises(EventRefused, match="self-referral: customer 'c1' cannot refer itself"):
            check_referral(referral(TENANT, "c1", "c1").data)
        check_referral(referral(TENANT, "c1", "c2").data)

    def test_a_refund_must_name_the_orders_customer_and_currency_and_an_amount(self) -> None:
        def check(event: Any, customer: str = "c1", currency: str = "EUR") -> Decimal:
            return check_refund(event.data, order_id="SO-1", customer_id=customer, currency=currency)

        assert check(refund(TENANT, "c1", "SO-1", "5")) == Decimal(5)
        with pytest.raises(EventRefused, match="refund customer does not match the order's customer"):
            check(refund(TENANT, "c2", "SO-1", "5"))
        with pytest.raises(EventRefused, match="refund in USD of order 'SO-1' paid in EUR"):
            check(refund(TENANT, "c1", "SO-1", "5", currency="USD"))
        with pytest.raises(EventRefused, match="positive amount"):
            check(refund(TENANT, "c1", "SO-1", "0"))


# Conditions that fail at run time, one per class of error CEL raises (or answers without a bool).
FAILING_CONDITIONS = [
    ("event.line_count / customer.purchase_count > 0", "ZeroDivisionError"),
    ("event.line_count % customer.purchase_count == 0", "ZeroDivisionError"),
    ("event.line_count + 9223372036854775807 > 0", "OverflowError"),
    ("uint(-event.line_count) > 0u", "OverflowError"),
    ("timestamp('9999-12-31T23:59:59Z') + duration('1s') > event.time", "OverflowError"),
    ("event.skus[5] == 'A'", "IndexError"),
    ("event.nps > 3", "KeyError"),  # a field a purchase does not have
    ("{'webshop': 1}[event.channel + 'x'] == 1", "KeyError"),
    ("event.net_amount + 1 > 2.0", "TypeError"),  # double + int: no such overload
    ("int(event.channel) > 0", "RuntimeError"),
    ("event.channel.matches('[')", "RuntimeError"),  # an invalid regular expression
    ("event.line_count", "not a bool"),
]


class TestConditionErrors:
    """Whatever goes wrong while running a condition, the rule's condition is not met, the reason is in
    its outcome, and the other rules (the base points) are awarded as usual."""

    @pytest.mark.parametrize(("source", "reason"), FAILING_CONDITIONS)
    def test_a_runtime_error_is_not_met_with_its_reason(self, source: str, reason: str) -> None:
        document = doc(BASE, {"id": "risky", "kind": "bonus", "points": 40, "when": source})
        ev = run(document, order(TENANT, "c", [line("A", "x", "2", "10"), line("B", "y", "1", "5")]))
        assert points(ev) == {"base": 25}
        assert ev.total_points == 25
        [earn] = ev.commands
        assert [(a.rule_id, a.points) for a in earn.breakdown] == [("base", 25)]
        risky = next(o for o in ev.trace if o.rule_id == "risky")
        assert (risky.fired, risky.points) == (False, 0)
        assert reason in risky.explanation
        assert "counts as not met" in risky.explanation or "not a bool" in risky.explanation
        assert source in risky.explanation

    @pytest.mark.parametrize(("source", "reason"), FAILING_CONDITIONS[:4])
    def test_a_line_condition_error_leaves_that_line_out(self, source: str, reason: str) -> None:
        # The condition fails on line B only (A matches by SKU first), so the rule fires for line A alone.
        line_source = "line.sku == 'A' || " + source.replace("event.line_count", "int(line.quantity)").replace(
            "customer.purchase_count", "(int(line.quantity) - 1)"
        )
        rule = {"id": "bulk", "kind": "line_multiplier", "multiplier": "2", "line_when": line_source}
        ev = run(doc(BASE, rule), order(TENANT, "c", [line("A", "x", "2", "10"), line("B", "y", "1", "5")]))
        assert points(ev) == {"base": 25, "bulk": 20}
        bulk = next(o for o in ev.trace if o.rule_id == "bulk")
        assert "lines A: 20 EUR" in bulk.explanation
        assert "line 'B' not matched" in bulk.explanation
        assert reason in bulk.explanation

    def test_a_line_condition_failing_on_every_line_says_why_no_line_matched(self) -> None:
        rule = {"id": "bulk", "kind": "line_multiplier", "multiplier": "2", "line_when": "int(line.sku) > 0"}
        ev = run(doc(BASE, rule), order(TENANT, "c", [line("A", "x", "2", "10")]))
        assert points(ev) == {"base": 20}
        bulk = next(o for o in ev.trace if o.rule_id == "bulk")
        assert bulk.explanation.startswith("no eligible line; line 'A' not matched")
        assert "RuntimeError" in bulk.explanation

    def test_inputs_over_the_budget_are_not_met(self) -> None:
        document = doc(BASE, {"id": "many", "kind": "bonus", "points": 5, "when": "size(event.skus) > 0"})
        lines = [line(f"S{i}", "x", "1", "1") for i in range(INPUT_ITEMS + 1)]
        ev = run(document, order(TENANT, "c", lines))
        assert points(ev) == {"base": INPUT_ITEMS + 1}
        many = next(o for o in ev.trace if o.rule_id == "many")
        assert not many.fired
        assert f"more than {INPUT_ITEMS} list items" in many.explanation
        # within the budget the same condition is met
        assert points(run(document, order(TENANT, "c", lines[:100]))) == {"base": 100, "many": 5}

    def test_text_over_the_budget_is_not_met(self) -> None:
        rule = {"id": "w", "kind": "engagement", "on": "custom.webinar", "points": 15, "when": "size(event.note) > 0"}
        document = doc(BASE, rule, custom_events=["webinar"])
        long = run(document, custom(TENANT, "c", "webinar", note="x" * (INPUT_CHARACTERS + 1)))
        assert long.total_points == 0
        assert f"more than {INPUT_CHARACTERS} characters" in long.trace[0].explanation
        assert run(document, custom(TENANT, "c", "webinar", note="x" * 100)).total_points == 15

    def test_a_stored_condition_over_the_limits_is_refused_not_run(self) -> None:
        # A version stored before the limits existed: validation is bypassed, the engine refuses to run it.
        rule = {"id": "nested", "kind": "bonus", "points": 5, "when": NESTED_COMPREHENSIONS}
        document = rs.RulesetDocument.model_validate(doc(BASE, rule))
        ev = evaluate(
            CompiledRuleset.compile("main", 1, document),
            order(TENANT, "c", [line("A", "x", "1", "10")]),
            CustomerSnapshot("c"),
        )
        assert points(ev) == {"base": 10}
        nested = next(o for o in ev.trace if o.rule_id == "nested")
        assert "refused" in nested.explanation
        assert "nested comprehensions" in nested.explanation

    def test_a_panic_of_the_library_is_not_met(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # pyo3 raises a Rust panic as PanicException, a BaseException: it counts as not met too, while
        # a cancellation still propagates. (No condition is known to make the library panic.)
        class PanicException(BaseException):
            pass

        class Panicking:
            def __init__(self, error: BaseException) -> None:
                self.error = error

            def execute(self, args: object) -> object:
                raise self.error

        # The interpreted engine: a compiled Condition's `program` only takes a cel.Program.
        condition = interpreted_engine().Condition("size(event.skus) > 0")
        scope = {"event": {"skus": ["A"]}, "customer": {}}
        monkeypatch.setattr(condition, "program", Panicking(PanicException("index out of bounds")))
        result = condition(scope, memo=False)
        assert isinstance(result, str)
        assert "PanicException" in result
        monkeypatch.setattr(condition, "program", Panicking(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            condition(scope, memo=False)
