"""The ruleset's caps on what an event awards: per order (a purchase's total for the buyer) and per customer
and period (what a customer may earn in a day, week, month, quarter or year). A cap trims the
lowest-priority awards first, so the rules the programme ranks highest keep theirs."""

from __future__ import annotations

from rules.engine.outcomes import RuleOutcome
from rules.engine.state import CustomerSnapshot
from rules.ruleset import Caps


def apply_caps(
    caps: Caps,
    fired: list[RuleOutcome],
    customer: CustomerSnapshot,
    referred: CustomerSnapshot | None,
    *,
    is_purchase: bool,
    totals: dict[str | None, int],
    counter: str,
) -> None:
    """Trims the `fired` outcomes (in trace order) to the caps. `totals`: the fired points per customer;
    `counter`: the per-customer cap's counter key for the event's period ("" without that cap)."""
    # A cap's text is written only where it trims (its total is over the cap), so _trim takes it ready-made.
    per_order = caps.per_order
    if is_purchase and per_order is not None:
        total = totals.get(customer.customer_id, 0)
        if total > per_order:
            _trim(fired, customer.customer_id, per_order, f"per-order cap {per_order}", total)
            totals[customer.customer_id] = per_order
    cap = caps.per_customer
    if cap is not None:
        for snapshot in (customer, referred):
            if snapshot is None:
                continue
            left = max(cap.points - snapshot.counters.get(counter, 0), 0)
            total = totals.get(snapshot.customer_id, 0)
            if total <= left:
                continue
            _trim(
                fired, snapshot.customer_id, left, f"per-customer cap {cap.points} per {cap.period}, {left} left", total
            )
            totals[snapshot.customer_id] = left


def fired_totals(fired: list[RuleOutcome]) -> dict[str | None, int]:
    totals: dict[str | None, int] = {}
    for outcome in fired:
        totals[outcome.customer_id] = totals.get(outcome.customer_id, 0) + outcome.points
    return totals


def _trim(fired: list[RuleOutcome], customer_id: str, allowed: int, why: str, total: int) -> None:
    """Cuts the customer's fired points from `total` down to `allowed`; `why` names the cap in the
    explanation of each award it cuts."""
    excess = total - allowed
    if excess <= 0:
        return
    suffix = f" by the {why}"
    for outcome in reversed(fired):
        if excess <= 0:
            return
        points = outcome.points
        if points == 0 or outcome.customer_id != customer_id:
            continue
        cut = min(points, excess)
        outcome.points = points - cut
        outcome.explanation += f"; -{cut}{suffix}"
        excess -= cut
