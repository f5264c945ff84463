"""The pure core of the redemptions per reward and kind (metrics/redemptions.py): footprints of orders against
hand-computed sums, and a property: the sums folded batch by batch from an order's changes, arriving in any
order and any batches, equal a recomputation from all the changes by the definitions (a reference here)."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from metrics.redemptions import COUNTERS, Change, OrderFacts, Sums, conflict, footprint, summarize

D = date.fromisoformat
COUPON = OrderFacts("cpn-10", "coupon", 300, Decimal("10.00"), "EUR")
DISCOUNT = OrderFacts("disc-2", "discount", 200, Decimal("2.00"), "EUR")
GIFT = OrderFacts("mug", "gift", 100, None, None)


def change(day: str, what: str, state: str | None = None, returned: int = 0, hour: int = 12) -> Change:
    at = datetime.fromisoformat(day).replace(hour=hour, tzinfo=UTC)
    return Change(at, f"{what}-{day}-{hour}-{returned}", what, state or what, returned)


class TestFootprint:
    def test_a_coupon_confirmed_by_its_consumption(self) -> None:
        fp = footprint(COUPON, [change("2025-03-01", "reserved"), change("2025-03-02", "coupon_consumed", "confirmed")])
        assert fp.counts == {
            (D("2025-03-01"), "cpn-10", "coupon", "reserved"): 1,
            (D("2025-03-01"), "cpn-10", "coupon", "points_reserved"): 300,
            (D("2025-03-02"), "cpn-10", "coupon", "coupons_consumed"): 1,
            (D("2025-03-02"), "cpn-10", "coupon", "confirmed"): 1,
            (D("2025-03-02"), "cpn-10", "coupon", "points_spent"): 300,
        }
        assert fp.values == {(D("2025-03-02"), "cpn-10", "coupon", "EUR"): Decimal("10.00")}

    def test_an_order_confirmed_before_its_coupon_is_consumed_is_confirmed_once_on_its_day(self) -> None:
        changes = [
            change("2025-03-03", "coupon_consumed", "confirmed"),  # arrives first
            change("2025-03-01", "reserved"),
            change("2025-03-02", "confirmed"),
        ]
        fp = footprint(COUPON, changes)
        confirmed = {k[0]: v for k, v in fp.counts.items() if k[3] == "confirmed"}
        assert confirmed == {D("2025-03-02"): 1}
        assert fp.counts[(D("2025-03-03"), "cpn-10", "coupon", "coupons_consumed")] == 1
        assert fp.values == {(D("2025-03-02"), "cpn-10", "coupon", "EUR"): Decimal("10.00")}

    def test_refunds_give_back_their_increase_of_the_running_total(self) -> None:
        changes = [
            change("2025-03-06", "refunded", "refunded", returned=200),  # the last refund first
            change("2025-03-01", "reserved"),
            change("2025-03-05", "refunded", "confirmed", returned=50),
            change("2025-03-01", "confirmed", hour=13),
        ]
        fp = footprint(DISCOUNT, changes)
        returned = {k[0]: v for k, v in fp.counts.items() if k[3] == "points_returned"}
        # 50 of 200 on the 5th, the other 150 with the refund in full on the 6th.
        assert returned == {D("2025-03-05"): 50, D("2025-03-06"): 150}
        assert {k[0]: v for k, v in fp.counts.items() if k[3] == "refunded"} == {D("2025-03-06"): 1}
        assert fp.counts[(D("2025-03-01"), "disc-2", "discount", "points_spent")] == 200

    def test_a_refund_that_gave_back_nothing_more_adds_nothing(self) -> None:
        changes = [
            change("2025-03-05", "refunded", "confirmed", returned=50),
            change("2025-03-07", "refunded", "confirmed", returned=50),
        ]
        fp = footprint(DISCOUNT, changes)
        assert {k: v for k, v in fp.counts.items() if k[3] == "points_returned"} == {
            (D("2025-03-05"), "disc-2", "discount", "points_returned"): 50
        }

    def test_cancelled_and_expired_orders_spend_nothing(self) -> None:
        cancelled = footprint(GIFT, [change("2025-03-01", "reserved"), change("2025-03-02", "cancelled")])
        expired = footprint(GIFT, [change("2025-03-01", "reserved"), change("2025-03-04", "expired")])
        assert cancelled.counts == {
            (D("2025-03-01"), "mug", "gift", "reserved"): 1,
            (D("2025-03-01"), "mug", "gift", "points_reserved"): 100,
            (D("2025-03-02"), "mug", "gift", "cancelled"): 1,
        }
        assert expired.counts[(D("2025-03-04"), "mug", "gift", "expired")] == 1
        assert cancelled.values == expired.values == {}

    def test_a_gift_without_a_value_counts_no_money(self) -> None:
        fp = footprint(GIFT, [change("2025-03-01", "reserved"), change("2025-03-02", "confirmed")])
        assert fp.counts[(D("2025-03-02"), "mug", "gift", "points_spent")] == 100
        assert fp.values == {}


class TestSums:
    def test_a_late_confirmation_moves_the_order_to_its_day(self) -> None:
        sums = Sums()
        first = [change("2025-03-01", "reserved"), change("2025-03-03", "coupon_consumed", "confirmed")]
        sums.add_order("t", COUPON, [], first)
        sums.add_order("t", COUPON, first, [change("2025-03-02", "confirmed")])
        # The 3rd keeps its consumed coupon and zeros for what moved to the 2nd.
        assert sums.counts[("t", D("2025-03-03"), "cpn-10", "coupon")] == [0, 0, 0, 0, 0, 1, 0, 0, 0]
        assert sums.counts[("t", D("2025-03-02"), "cpn-10", "coupon")] == [0, 1, 0, 0, 0, 0, 0, 300, 0]
        assert sums.counts[("t", D("2025-03-01"), "cpn-10", "coupon")] == [1, 0, 0, 0, 0, 0, 300, 0, 0]
        assert sums.values == {
            ("t", D("2025-03-03"), "cpn-10", "coupon", "EUR"): Decimal(0),
            ("t", D("2025-03-02"), "cpn-10", "coupon", "EUR"): Decimal("10.00"),
        }


class TestConflict:
    def test_the_same_facts_belong_to_the_order(self) -> None:
        assert conflict("O-1", COUPON, OrderFacts("cpn-10", "coupon", 300, Decimal("10.0"), "EUR")) is None

    def test_other_facts_are_named_with_the_known_ones(self) -> None:
        reason = conflict("O-1", COUPON, OrderFacts("cpn-10", "coupon", 301, Decimal("10.00"), "EUR"))
        assert reason == (
            "redemption order 'O-1' is reward 'cpn-10' (coupon, 300 points, value 10.00 EUR) in earlier events; "
            "this event says reward 'cpn-10' (coupon, 301 points, value 10.00 EUR)"
        )
        assert conflict("O-1", GIFT, OrderFacts("mug", "privilege", 100, None, None)) is not None


class TestSummarize:
    def test_per_reward_and_per_kind(self) -> None:
        counts = [
            ("mug", "gift", [2, 1, 1, 0, 0, 0, 200, 100, 0]),
            ("cpn-10", "coupon", [1, 1, 0, 0, 0, 1, 300, 300, 0]),
            ("pen", "gift", [1, 0, 0, 1, 0, 0, 50, 0, 0]),
            ("gone", "privilege", [0] * 9),  # a day whose confirmation moved away
        ]
        values = [
            ("cpn-10", "coupon", "EUR", Decimal("10.00")),
            ("mug", "gift", "EUR", Decimal("7.50")),
            ("mug", "gift", "USD", Decimal("8")),
            ("gone", "privilege", "EUR", Decimal("0.00")),
        ]
        rewards, kinds = summarize(counts, values)
        assert list(rewards) == [("cpn-10", "coupon"), ("mug", "gift"), ("pen", "gift")]
        assert rewards[("mug", "gift")].values == {"EUR": Decimal("7.50"), "USD": Decimal(8)}
        assert list(kinds) == ["gift", "privilege", "discount", "coupon"]
        # Gifts: mug + pen.
        assert kinds["gift"].counts == [3, 1, 1, 1, 0, 0, 250, 100, 0]
        assert kinds["gift"].values == {"EUR": Decimal("7.50"), "USD": Decimal(8)}
        assert kinds["privilege"].counts == [0] * 9
        assert kinds["discount"].values == {}
        assert kinds["coupon"].counts == [1, 1, 0, 0, 0, 1, 300, 300, 0]


# --- the property -------------------------------------------------------------------------------------------

ORIGIN = datetime(2025, 3, 1, 9, tzinfo=UTC)
REWARDS = [COUPON, DISCOUNT, GIFT, OrderFacts("vip", "privilege", 500, Decimal("99.90"), "USD")]


@st.composite
def orders(draw: st.DrawFn) -> list[tuple[OrderFacts, list[Change]]]:
    """Orders as the ledger's state machine makes them (docs/rewards.md), each change hours after the last."""
    out = []
    for n in range(draw(st.integers(min_value=1, max_value=5))):
        facts = draw(st.sampled_from(REWARDS))
        at = ORIGIN + timedelta(hours=draw(st.integers(min_value=0, max_value=200)))
        steps: list[tuple[str, str, int]] = [("reserved", "reserved", 0)]
        ending = draw(st.sampled_from(["cancelled", "expired", "confirmed", "coupon_consumed", None]))
        if ending == "coupon_consumed" and facts.reward_kind != "coupon":
            ending = "confirmed"
        if ending is not None:
            steps.append(
                (ending, "cancelled" if ending == "cancelled" else "expired" if ending == "expired" else "confirmed", 0)
            )
        if ending == "confirmed" and facts.reward_kind == "coupon" and draw(st.booleans()):
            steps.append(("coupon_consumed", "confirmed", 0))
        if ending == "confirmed" and facts.reward_kind == "discount":
            returned = 0
            for _ in range(draw(st.integers(min_value=0, max_value=3))):
                returned = draw(st.integers(min_value=returned, max_value=facts.points))
                steps.append(("refunded", "refunded" if returned == facts.points else "confirmed", returned))
                if returned == facts.points:
                    break
        changes = []
        for i, (what, state, returned) in enumerate(steps):
            at += timedelta(hours=draw(st.integers(min_value=0, max_value=40)))
            changes.append(Change(at, f"o{n}-e{i}", what, state, returned))
        out.append((facts, changes))
    return out


def reference(
    orders: list[tuple[OrderFacts, list[Change]]],
) -> tuple[dict[tuple[object, ...], int], dict[tuple[object, ...], Decimal]]:
    """The sums by the definitions, from every order's changes in time order."""
    counts: dict[tuple[object, ...], int] = {}
    values: dict[tuple[object, ...], Decimal] = {}

    def add(at: datetime, facts: OrderFacts, counter: str, n: int) -> None:
        key = (at.date(), facts.reward_id, facts.reward_kind, counter)
        counts[key] = counts.get(key, 0) + n

    for facts, changes in orders:
        timeline = sorted(changes, key=lambda c: c.occurred_at)
        returned = 0
        for c in timeline:
            if c.change == "reserved":
                add(c.occurred_at, facts, "reserved", 1)
                add(c.occurred_at, facts, "points_reserved", facts.points)
            if c.change in ("cancelled", "expired"):
                add(c.occurred_at, facts, c.change, 1)
            if c.change == "coupon_consumed":
                add(c.occurred_at, facts, "coupons_consumed", 1)
            if c.change == "refunded":
                add(c.occurred_at, facts, "points_returned", c.points_returned - returned)
                returned = c.points_returned
                if c.state == "refunded":
                    add(c.occurred_at, facts, "refunded", 1)
        # Confirmed once: the first change that left the order confirmed.
        confirmation = next((c for c in timeline if c.change in ("confirmed", "coupon_consumed")), None)
        if confirmation is not None:
            add(confirmation.occurred_at, facts, "confirmed", 1)
            add(confirmation.occurred_at, facts, "points_spent", facts.points)
            if facts.value is not None and facts.currency is not None:
                key = (confirmation.occurred_at.date(), facts.reward_id, facts.reward_kind, facts.currency)
                values[key] = values.get(key, Decimal(0)) + facts.value
    return {k: v for k, v in counts.items() if v}, values


@settings(max_examples=300, deadline=None)
@given(orders(), st.randoms(use_true_random=False), st.integers(min_value=1, max_value=6))
def test_sums_folded_in_any_order_and_batches_equal_the_definitions(
    drawn: list[tuple[OrderFacts, list[Change]]], rng: random.Random, batches: int
) -> None:
    arrivals = [(i, c) for i, (_, changes) in enumerate(drawn) for c in changes]
    rng.shuffle(arrivals)
    cuts = sorted(rng.randint(0, len(arrivals)) for _ in range(batches - 1))
    sums = Sums()
    seen: dict[int, list[Change]] = {i: [] for i in range(len(drawn))}
    for lo, hi in zip([0, *cuts], [*cuts, len(arrivals)], strict=True):
        batch: dict[int, list[Change]] = {}
        for i, c in arrivals[lo:hi]:
            batch.setdefault(i, []).append(c)
        for i, new in batch.items():
            sums.add_order("t", drawn[i][0], seen[i], new)
            seen[i].extend(new)
    counts: dict[tuple[object, ...], int] = {}
    for (_, day, reward, kind), row in sums.counts.items():
        for counter, n in zip(COUNTERS, row, strict=True):
            if n:
                counts[(day, reward, kind, counter)] = counts.get((day, reward, kind, counter), 0) + n
    expected_counts, expected_values = reference(drawn)
    assert {k: v for k, v in counts.items() if v} == expected_counts
    values = {k[1:]: v for k, v in sums.values.items() if v}
    assert values == {k: v for k, v in expected_values.items() if v}
