"""The pure rewards rules without a database: eligibility and its reasons, limits per period, the order
state machine (a hypothesis state machine against a simple model), proportional refunds, coupon codes,
and the Book's giving back of a captured hold."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ledger.domain import AccountState, Book, HoldState, Meta, Policy
from ledger.errors import (
    CouponNotUsable,
    HoldNotActive,
    InsufficientPoints,
    LimitReached,
    NotEligible,
    OutOfStock,
    RedemptionStateConflict,
)
from ledger.rewards import (
    CustomerContext,
    Order,
    Redeemer,
    Reward,
    RewardsConfig,
    check_redeemable,
    money_value,
    new_coupon_code,
    period_start,
    unavailable,
    used_in_period,
)

NOW = datetime(2026, 12, 5, 10, 30, tzinfo=UTC)  # a Saturday
TIERS = RewardsConfig(("silver", "gold", "platinum"), Decimal("0.01"), "EUR")


def gift(**fields: object) -> Reward:
    return Reward(**{"reward_id": "r", "name": "R", "kind": "gift", "points": 100, **fields})  # type: ignore[arg-type]


def reasons(reward: Reward, customer: CustomerContext, **kw: object) -> list[str]:
    return [r for r, _ in unavailable(reward, TIERS, customer, now=NOW, **kw)]  # type: ignore[arg-type]


class TestPeriods:
    @pytest.mark.parametrize(
        ("period", "start"),
        [
            ("day", datetime(2026, 12, 5, tzinfo=UTC)),
            ("week", datetime(2026, 11, 30, tzinfo=UTC)),  # the Monday before
            ("month", datetime(2026, 12, 1, tzinfo=UTC)),
            ("year", datetime(2026, 1, 1, tzinfo=UTC)),
            ("ever", None),
        ],
    )
    def test_calendar_periods_in_utc(self, period: str, start: datetime | None) -> None:
        assert period_start(period, NOW) == start  # type: ignore[arg-type]

    @given(
        days=st.lists(st.tuples(st.integers(0, 800), st.integers(1, 5)), max_size=30),
        period=st.sampled_from(["day", "week", "month", "year", "ever"]),
    )
    def test_used_counts_the_days_from_the_period_start(self, days: list[tuple[int, int]], period: str) -> None:
        rows = [(datetime(2026, 12, 5, tzinfo=UTC) - timedelta(days=d), n) for d, n in days]
        start = {"day": 0, "week": 5, "month": 4, "year": 338, "ever": 10**6}[period]
        assert used_in_period(rows, period, NOW) == sum(n for d, n in days if d <= start)  # type: ignore[arg-type]


class TestEligibility:
    def test_a_plain_reward_with_points_is_redeemable(self) -> None:
        assert reasons(gift(), CustomerContext(available=100)) == []

    def test_every_reason_is_reported_in_order(self) -> None:
        reward = gift(
            status="retired",
            available_until=NOW,
            min_tier="gold",
            stock=0,
            limit_count=1,
            limit_period="week",
        )
        customer = CustomerContext(
            available=99,
            tier="silver",
            redeemers=(Redeemer("anna"),),
            redeemed={"r": [(datetime(2026, 12, 1, tzinfo=UTC), 1)]},
        )
        assert reasons(reward, customer, member_id="bob") == [
            "retired",
            "no_longer_available",
            "tier",
            "member",
            "limit",
            "stock",
            "points",
        ]

    @pytest.mark.parametrize(
        ("tier", "ok"), [(None, False), ("silver", False), ("gold", True), ("platinum", True), ("bronze", False)]
    )
    def test_tier_restriction_follows_the_programmes_order(self, tier: str | None, ok: bool) -> None:
        assert (reasons(gift(min_tier="gold"), CustomerContext(available=100, tier=tier)) == []) is ok

    def test_windows_include_the_start_and_exclude_the_end(self) -> None:
        customer = CustomerContext(available=100)
        assert reasons(gift(available_from=NOW), customer) == []
        assert reasons(gift(available_from=NOW + timedelta(seconds=1)), customer) == ["not_yet_available"]
        assert reasons(gift(available_until=NOW + timedelta(seconds=1)), customer) == []
        assert reasons(gift(available_until=NOW), customer) == ["no_longer_available"]

    def test_members_and_their_maximum(self) -> None:
        customer = CustomerContext(available=1000, redeemers=(Redeemer("anna"), Redeemer("bob", max_points=99)))
        assert reasons(gift(), customer, member_id="anna") == []
        assert reasons(gift(), customer, member_id="bob") == ["member"]
        assert reasons(gift(points=99), customer, member_id="bob") == []
        assert reasons(gift(), customer) == ["member"]
        assert reasons(gift(), CustomerContext(available=1000), member_id="anyone") == []

    def test_a_limit_counts_only_the_current_period(self) -> None:
        last_month = [(datetime(2026, 11, 30, tzinfo=UTC), 3)]
        reward = gift(limit_count=1, limit_period="month")
        assert reasons(reward, CustomerContext(available=100, redeemed={"r": last_month})) == []
        this_month = [(datetime(2026, 12, 1, tzinfo=UTC), 1)]
        assert reasons(reward, CustomerContext(available=100, redeemed={"r": this_month})) == ["limit"]

    def test_errors_are_raised_by_the_first_reason(self) -> None:
        def check(reward: Reward, customer: CustomerContext, stock: int | None = None) -> None:
            check_redeemable(reward, TIERS, customer, now=NOW, member_id=None, stock_left=stock, account_id="acme")

        with pytest.raises(NotEligible) as not_eligible:
            check(gift(min_tier="gold", stock=0), CustomerContext(available=0))
        assert not_eligible.value.extra["reason"] == "tier"
        limited = gift(limit_count=1, limit_period="day", stock=0)
        with pytest.raises(LimitReached):
            check(limited, CustomerContext(available=0, redeemed={"r": [(NOW, 1)]}))
        with pytest.raises(OutOfStock):
            check(gift(), CustomerContext(available=0), stock=0)
        with pytest.raises(InsufficientPoints) as short:
            check(gift(), CustomerContext(available=-5))
        assert (short.value.extra["requested"], short.value.extra["available"]) == (100, 0)
        check(gift(stock=0), CustomerContext(available=100), stock=1)  # the locked row's stock decides

    def test_a_discount_needs_the_point_value(self) -> None:
        discount = gift(kind="discount", points=333)
        assert reasons(discount, CustomerContext(available=1000)) == []
        missing = unavailable(discount, RewardsConfig(), CustomerContext(available=1000), now=NOW)
        assert [r for r, _ in missing] == ["not_configured"]
        assert money_value(discount, TIERS) == (Decimal("3.33"), "EUR")
        assert money_value(gift(kind="discount", points=7), RewardsConfig((), Decimal("0.0015"), "EUR")) == (
            Decimal("0.01"),  # 0.0105 rounded down to the cent
            "EUR",
        )
        assert money_value(gift(value=Decimal("12.5"), currency="USD"), TIERS) == (Decimal("12.5"), "USD")
        # A value the events could not carry (money is bounded by 10^12) makes the discount unavailable.
        dear = RewardsConfig((), Decimal("1000"), "EUR")
        assert [
            r for r, _ in unavailable(gift(kind="discount", points=10**9), dear, CustomerContext(10**12), now=NOW)
        ] == []
        too_dear = unavailable(gift(kind="discount", points=10**9 + 1), dear, CustomerContext(10**12), now=NOW)
        assert [r for r, _ in too_dear] == ["not_configured"]


class TestCouponCodes:
    def test_codes_are_long_random_and_unambiguous(self) -> None:
        codes = {new_coupon_code() for _ in range(2000)}
        assert len(codes) == 2000
        for code in codes:
            assert re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{4}(-[0-9A-HJKMNP-TV-Z]{4}){3}", code), code


def order(points: int = 500, amount: str = "200") -> Order:
    return Order("o-1", "discount", points, "reserved", NOW + timedelta(minutes=15), order_amount=Decimal(amount))


class TestOrders:
    def test_confirm_only_in_time(self) -> None:
        late = order()
        with pytest.raises(RedemptionStateConflict):
            late.confirm(NOW + timedelta(minutes=15))
        assert late.state == "reserved"
        late.expire(NOW + timedelta(minutes=15))
        assert late.state in ("expired",)
        early = order()
        with pytest.raises(RedemptionStateConflict):
            early.expire(NOW)

    def test_partial_refunds_round_down_and_the_last_gives_the_rest(self) -> None:
        o = order(points=500, amount="300")
        o.confirm(NOW)
        assert o.refund(Decimal("100")) == 166  # 500 x 100/300 = 166.67
        assert o.refund(Decimal("100")) == 167  # 333 in total
        assert o.state == "confirmed"
        assert o.refund(Decimal("150")) == 167  # more than the rest of the order: everything left
        assert (o.state, o.points_returned, o.refunded_amount) == ("refunded", 500, Decimal("300"))
        with pytest.raises(RedemptionStateConflict):
            o.refund(Decimal("1"))

    def test_a_coupon_is_consumed_once_and_confirms_a_reservation(self) -> None:
        o = order()
        assert o.consume_coupon("issued", NOW) is True
        assert o.state == "confirmed"
        with pytest.raises(CouponNotUsable):
            o.consume_coupon("consumed", NOW)
        cancelled = order()
        cancelled.cancel()
        with pytest.raises(CouponNotUsable):
            cancelled.consume_coupon("issued", NOW)

    @given(
        points=st.integers(1, 10**12),
        amount=st.decimals(Decimal("0.01"), Decimal("1000000"), places=2),
        refunds=st.lists(st.decimals(Decimal("0.01"), Decimal("1000000"), places=2), max_size=12),
    )
    def test_refunds_never_give_back_more_than_the_share_refunded(
        self, points: int, amount: Decimal, refunds: list[Decimal]
    ) -> None:
        o = Order("o", "discount", points, "confirmed", NOW, order_amount=amount)
        given_back = 0
        refunded = Decimal(0)
        for r in refunds:
            if o.state != "confirmed":
                break
            given_back += o.refund(r)
            refunded = min(refunded + r, amount)
            # The reference: the floor of the refunded share, all of it once fully refunded.
            expected = points if refunded == amount else points * refunded // amount
            assert given_back == expected
            assert 0 <= given_back <= points


class OrderMachine(RuleBasedStateMachine):
    """Random sequences of changes against a model of the documented transitions."""

    def __init__(self) -> None:
        super().__init__()
        self.order = Order("o", "coupon", 120, "reserved", NOW + timedelta(minutes=15), order_amount=Decimal("40"))
        self.model = "reserved"
        self.returned = 0
        self.coupon = "issued"

    def attempt(self, allowed: bool, action: object) -> bool:
        before = (self.order.state, self.order.points_returned)
        try:
            action()  # type: ignore[operator]
        except (RedemptionStateConflict, CouponNotUsable):
            assert not allowed
            assert (self.order.state, self.order.points_returned) == before  # a refused change changes nothing
            return False
        assert allowed
        return True

    @rule(late=st.booleans())
    def confirm(self, late: bool) -> None:
        at = NOW + timedelta(minutes=20 if late else 1)
        if self.attempt(self.model == "reserved" and not late, lambda: self.order.confirm(at)):
            self.model = "confirmed"

    @rule()
    def cancel(self) -> None:
        if self.attempt(self.model == "reserved", self.order.cancel):
            self.model = "cancelled"

    @rule(late=st.booleans())
    def expire(self, late: bool) -> None:
        at = NOW + timedelta(minutes=20 if late else 1)
        if self.attempt(self.model == "reserved" and late, lambda: self.order.expire(at)):
            self.model = "expired"

    @rule()
    def consume(self) -> None:
        allowed = self.coupon == "issued" and self.model in ("reserved", "confirmed")
        if self.attempt(allowed, lambda: self.order.consume_coupon(self.coupon, NOW)):  # type: ignore[arg-type]
            self.coupon = "consumed"
            self.model = "confirmed"

    @precondition(lambda self: self.model != "refunded")
    @rule(amount=st.integers(1, 50))
    def refund(self, amount: int) -> None:
        back: list[int] = []
        if self.attempt(self.model == "confirmed", lambda: back.append(self.order.refund(Decimal(amount)))):
            self.returned += back[0]
            if self.returned == 120:
                self.model = "refunded"

    @invariant()
    def matches_the_model(self) -> None:
        assert self.order.state == self.model
        assert self.order.points_returned == self.returned
        assert 0 <= self.returned <= 120


TestOrderMachine = OrderMachine.TestCase
TestOrderMachine.settings = settings(max_examples=200, stateful_step_count=20, deadline=None)


class TestReturnCaptured:
    def book(self) -> tuple[Book, HoldState]:
        book = Book("t", Policy(), NOW, {"acme": AccountState("acme")})
        meta = Meta(kind="earn", source="test")
        book.earn("acme", 100, meta, lot_id="early")
        book.now = NOW + timedelta(days=30)
        book.earn("acme", 100, meta, lot_id="late")
        hold = HoldState(
            uuid.uuid4(), "acme", 150, 0, "active", [], None, None, NOW + timedelta(days=31), NOW + timedelta(days=30)
        )
        book.reserve(hold, Meta(kind="hold", source="test"))
        return book, hold

    def test_only_a_captured_hold_gives_points_back(self) -> None:
        book, hold = self.book()
        with pytest.raises(HoldNotActive):
            book.return_captured(hold, 10, Meta(kind="redeem_return", source="t"), lot_prefix="x")

    def test_points_come_back_with_the_expiry_of_the_lots_taken_last_first(self) -> None:
        book, hold = self.book()
        book.capture(hold, 150, Meta(kind="capture", source="t"))
        book.return_captured(hold, 80, Meta(kind="redeem_return", source="t"), lot_prefix="ret")
        account = book.account("acme")
        assert (account.available, account.held, account.redeemed) == (50 + 80, 0, 70)
        # The hold took 100 of "early" and 50 of "late": the last 50 come back as "late", 30 as "early".
        returned = {
            lot.lot_id: (lot.remaining, lot.expires_at) for lot in book.lots.values() if lot.lot_id.startswith("ret")
        }
        assert returned == {
            "ret:0": (50, book.lots["late"].expires_at),
            "ret:1": (30, book.lots["early"].expires_at),
        }
        system = [e for e in book.entries if e["kind"] == "redeem_return"]
        assert sorted(e["points"] for e in system) == [-80, 80]
        assert sum(e["points"] for e in book.entries) == 0
