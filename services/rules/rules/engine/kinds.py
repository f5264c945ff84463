"""What each kind of rule awards, once the evaluation loop (rules.engine.evaluation) has found that it applies
(within its window, its condition met). One function per kind; each returns the outcome of firing, or of not
firing and why:

- `bonus`: fixed points.
- `line_rule` (points_per_unit, line_multiplier): the eligible amount of the lines it selects, times the
  currency's points per unit, times its factor (points_per_unit) or its multiplier - 1 (line_multiplier).
- `tier_multiplier`: the buyer's points of the rules before it, times the tier's multiplier - 1.
- `engagement`: fixed points for an engagement event, at most `limit.count` times per period; a referral
  rewards the referred customer too.

What follows for every kind (the rule's max_points and campaign budget, its limit counter, stop, then the
caps) is the loop's.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any, Final

from rules.engine.basics import fmt, round_points
from rules.engine.basket import Basket
from rules.engine.compiled import CompiledRule
from rules.engine.outcomes import RuleOutcome
from rules.engine.state import CustomerSnapshot
from rules.ruleset import Tiers
from shared.events import Payload, ReferralConverted

_NO_SKUS: Final[frozenset[str]] = frozenset()


def bonus(compiled: CompiledRule, customer_id: str) -> RuleOutcome:
    return RuleOutcome(
        compiled.rule_id, True, compiled.points, compiled.fixed, customer_id, compiled.pending_days, compiled.campaign
    )


def line_rule(
    compiled: CompiledRule, basket: Basket, scope: dict[str, Mapping[str, Any]], customer_id: str, rounding: str
) -> RuleOutcome:
    skus: Collection[str]
    failed = ""  # a line condition's error on some line (that line counted as not matching)
    if compiled.indexed:
        # Found in the basket's line index (the loop skips an indexed rule that is not): its amount and SKUs.
        amount, skus = basket.amounts[compiled.position], basket.skus[compiled.position]
    elif compiled.basket_total:
        # Every eligible line, and the SKUs do not appear in the explanation: no set to build.
        if not basket.lines:
            return compiled.no_line
        amount, skus = basket.total, _NO_SKUS
    else:
        amount, skus, failed = basket.matching(compiled, scope)
        if not skus:
            return (
                compiled.no_line
                if not failed
                else RuleOutcome(compiled.rule_id, False, 0, f"no eligible line; {failed}")
            )
    rate, currency = basket.rate, basket.currency
    raw = amount * rate * compiled.scale
    points = max(round_points(raw, rounding), 0)
    amount_text = fmt(amount)
    # Equal non-zero values format alike (the text is of the normalized value): skip a second format.
    raw_text = amount_text if amount and raw == amount else fmt(raw)
    arithmetic = compiled.arithmetic(currency, rate)
    if compiled.kind == "line_multiplier":
        explanation = f"lines {', '.join(sorted(skus))}: {amount_text}{arithmetic} = {raw_text} → {points} ({rounding})"
    else:
        explanation = f"{amount_text}{arithmetic} = {raw_text} → {points} ({rounding})"
    if failed:
        explanation += f"; {failed}"
    return RuleOutcome(
        compiled.rule_id, True, points, explanation, customer_id, compiled.pending_days, compiled.campaign
    )


def tier_multiplier(
    compiled: CompiledRule, tiers: Tiers | None, tier: str | None, accumulated: int, customer_id: str, rounding: str
) -> RuleOutcome:
    """`accumulated`: the buyer's points of the rules evaluated before this one."""
    factor = compiled.tier_factors.get(tier)
    if factor is None:
        factor = compiled.tier_factors[tier] = _tier_factor(compiled, tiers, tier)
    excess, multiplier_text = factor
    raw = Decimal(accumulated) * excess
    points = max(round_points(raw, rounding), 0)
    explanation = (
        f"tier {tier or 'none'}: {accumulated} pts of earlier rules * (multiplier {multiplier_text} - 1)"
        f" = {fmt(raw)} → {points} ({rounding})"
    )
    return RuleOutcome(
        compiled.rule_id, True, points, explanation, customer_id, compiled.pending_days, compiled.campaign
    )


def _tier_factor(compiled: CompiledRule, tiers: Tiers | None, tier: str | None) -> tuple[Decimal, str]:
    """(multiplier - 1, the multiplier as the explanation writes it)."""
    multiplier = Decimal(1)
    if tier is not None:
        if tier in compiled.rule.multipliers:
            multiplier = compiled.rule.multipliers[tier]
        else:
            for level in tiers.levels if tiers else ():
                if level.name == tier:
                    multiplier = level.multiplier
                    break
    return multiplier - 1, fmt(multiplier)


def engagement(
    compiled: CompiledRule, customer: CustomerSnapshot, referred: CustomerSnapshot | None, at: datetime, data: Payload
) -> list[RuleOutcome] | RuleOutcome:
    """The fired outcomes (the customer's, and the referred customer's on a referral), or the outcome of
    not firing (the limit reached)."""
    limit = compiled.limit
    if limit is not None and customer.counters.get(compiled.limit_key(at), 0) >= limit.count:
        return RuleOutcome(compiled.rule_id, False, 0, f"limit of {limit.count} per {limit.period} reached")
    rule = compiled.rule
    out = [
        RuleOutcome(
            rule.id,
            True,
            compiled.points,
            compiled.fixed,
            customer.customer_id,
            compiled.pending_days,
            compiled.campaign,
        )
    ]
    if rule.referred_points and isinstance(data, ReferralConverted) and referred is not None:
        out.append(
            RuleOutcome(
                rule.id,
                True,
                rule.referred_points,
                f"{rule.on}, referred customer: {rule.referred_points}",
                referred.customer_id,
                compiled.pending_days,
                compiled.campaign,
            )
        )
    return out
