"""Refunds: whether an order can take a refund, and the clawbacks of its stored awards. A refund is never
re-evaluated with today's rules: it takes back a share of what the order earned."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from rules.engine.basics import EventRefused, command_id, round_points
from shared.events import PurchaseRefunded


def check_refund(refund: PurchaseRefunded, *, order_id: str, customer_id: str, currency: str) -> Decimal:
    """The amount a refund of this order (its id, customer and currency) asks back; raises EventRefused for a
    refund the order cannot take."""
    if refund.customer_id != customer_id:
        raise EventRefused(
            f"refund customer does not match the order's customer: refund {refund.refund_id!r} names "
            f"customer {refund.customer_id!r}, not the customer of order {order_id!r}"
        )
    if refund.currency != currency:
        raise EventRefused(f"refund in {refund.currency} of order {order_id!r} paid in {currency}")
    amount = refund_amount(refund)
    if amount <= 0:
        raise EventRefused("a refund needs a positive amount or returned lines")
    return amount


@dataclass(frozen=True)
class AwardRecord:
    command_id: str
    customer_id: str
    points: int
    clawed_back: int


@dataclass(frozen=True)
class PlannedClawback:
    command_id: str
    original_command_id: str
    customer_id: str
    points: int


def refund_amount(refund: PurchaseRefunded) -> Decimal:
    if refund.amount is not None:
        return refund.amount
    return sum((line.amount for line in refund.lines), Decimal(0))


def plan_clawbacks(
    tenant: str,
    refund_event_id: str,
    awards: Sequence[AwardRecord],
    *,
    order_net: Decimal,
    refunded_before: Decimal,
    refunded_now: Decimal,
) -> list[PlannedClawback]:
    """Claws back the stored awards in proportion to the refunded share of the order's net amount.

    Computed on the cumulative refunded share, so several partial refunds add up to exactly the
    award and a full refund returns every point; never re-evaluated with today's rules.
    """
    total = refunded_before + refunded_now
    share = Decimal(1) if order_net <= 0 else min(total / order_net, Decimal(1))
    out = []
    for award in awards:
        target = round_points(Decimal(award.points) * share, "half_up")
        claw = min(target, award.points) - award.clawed_back
        if claw > 0:
            out.append(
                PlannedClawback(
                    command_id=command_id("claw", tenant, refund_event_id, award.command_id),
                    original_command_id=award.command_id,
                    customer_id=award.customer_id,
                    points=claw,
                )
            )
    return out
