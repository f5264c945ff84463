"""The chaos run's reference calculation against figures worked out by hand, and its stream's invariants."""

from decimal import Decimal

from shared.events import PurchaseCompleted, PurchaseRefunded
from tests.chaos.stream import Reference, Stream


def test_awards_and_clawbacks_by_hand() -> None:
    ref = Reference()
    ref.purchase("c", "o1", Decimal("123.45"))  # 123 + 50 welcome = 173
    ref.purchase("c", "o2", Decimal("10.99"))  # 10, no second welcome
    assert ref.points["c"] == 183
    ref.refund("o1", Decimal("50.00"))  # 173 * 50 / 123.45 = 70.07 -> 70
    assert ref.points["c"] == 113
    ref.refund("o1", Decimal("73.45"))  # all of it: 173 in total, 103 more
    assert ref.points["c"] == 10
    ref.engagement("c", 20)
    assert (ref.points["c"], ref.earns["c"], ref.clawbacks["c"]) == (30, 3, 2)
    assert (ref.purchases, ref.revenue, ref.refunds, ref.engagements) == (2, Decimal("134.44"), 2, 1)
    assert (ref.refunded, ref.issued, ref.clawed) == (Decimal("123.45"), 173 + 10 + 20, 70 + 103)


def test_half_a_point_rounds_up_and_a_refund_worth_nothing_books_no_command() -> None:
    ref = Reference()
    ref.purchase("c", "o1", Decimal("1.00"))  # 1 + 50 = 51
    ref.refund("o1", Decimal("0.01"))  # 51 * 0.01 = 0.51 -> 1
    ref.refund("o1", Decimal("0.001"))  # cumulative 0.011 -> 0.561 -> 1: nothing more
    assert (ref.points["c"], ref.clawbacks["c"]) == (50, 1)
    assert (ref.refunded, ref.issued, ref.clawed) == (Decimal("0.011"), 51, 1)


def test_the_stream_is_seeded_and_refunds_never_exceed_their_order() -> None:
    first, second = Stream("t", customers=5, seed=3), Stream("t", customers=5, seed=3)
    events = [first.next() for _ in range(300)]
    assert [(e.event.id, e.event.data) for e in events] == [
        (s.event.id, s.event.data) for s in (second.next() for _ in range(300))
    ]
    refunded: dict[str, Decimal] = {}
    nets: dict[str, Decimal] = {}
    for sent in events:
        data = sent.event.data
        if isinstance(data, PurchaseCompleted):
            nets[data.order_id] = data.net_amount
        elif isinstance(data, PurchaseRefunded):
            assert data.amount is not None
            refunded[data.original_order_id] = refunded.get(data.original_order_id, Decimal(0)) + data.amount
            assert refunded[data.original_order_id] <= nets[data.original_order_id]
    assert set(first.kinds) == {"purchase", "partial refund", "full refund", "review", "attendance"}
