"""Evaluation: (event, compiled ruleset version, customer state) -> the outcome of every rule and the earn
commands, with their arithmetic. Deterministic: the inputs fully decide the result (the event's time,
never the wall clock).

The loop walks the version's rules for the event's type in evaluation order. A rule applies when its line
index finds a line for it (an indexed line rule), the event's time is within its window (validity and
campaign) and its condition is met; then its kind decides what it awards (rules.engine.kinds), and its
max_points, campaign budget, limit counter and stop follow. The caps trim the fired awards last
(rules.engine.caps), and the commands group them (rules.engine.commands).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from rules.engine.basics import EventRefused, cap_key, event_time
from rules.engine.basket import Basket
from rules.engine.caps import apply_caps, fired_totals
from rules.engine.commands import plan_commands
from rules.engine.compiled import CompiledRule, CompiledRuleset
from rules.engine.kinds import bonus, engagement, line_rule, tier_multiplier
from rules.engine.outcomes import Evaluation, RuleOutcome
from rules.engine.state import CustomerSnapshot
from rules.engine.views import customer_view, event_view
from rules.ruleset import PURCHASE
from shared.events import (
    CUSTOM_TYPE_PREFIX,
    CloudEvent,
    PurchaseCompleted,
    ReferralConverted,
)


def evaluate(
    ruleset: CompiledRuleset,
    event: CloudEvent[Any],
    customer: CustomerSnapshot,
    *,
    referred: CustomerSnapshot | None = None,
    campaign_spent: Mapping[str, int] | None = None,
) -> Evaluation:
    """Evaluates one event; raises EventRefused when the ruleset cannot take it."""
    at = event_time(event)
    basket = _basket(ruleset, event)
    scope: dict[str, Mapping[str, Any]] = {
        "event": event_view(event, customer, ruleset.event_fields),
        "customer": customer_view(customer, at, ruleset.customer_fields),
    }
    run = _Run(customer, referred, at, dict(campaign_spent) if campaign_spent else {})
    memo = not event.type.startswith(CUSTOM_TYPE_PREFIX)  # see Condition.__call__
    for compiled in ruleset.by_type.get(event.type, ()):
        skipped = _skipped(compiled, basket, at, scope, memo)
        if skipped is not None:
            run.trace.append(skipped)
        elif not run.fire(compiled, ruleset, basket, scope, event):
            break  # the rule stops the evaluation

    caps = ruleset.document.caps
    counter = cap_key(caps.per_customer.period, at) if caps.per_customer is not None else ""
    if caps.per_order is not None or caps.per_customer is not None:
        # `accumulated` is the buyer's fired total; the outcomes are summed only when another customer has some.
        totals: dict[str | None, int] = (
            fired_totals(run.fired) if referred is not None else {customer.customer_id: run.accumulated}
        )
        apply_caps(
            caps, run.fired, customer, referred, is_purchase=event.type == PURCHASE, totals=totals, counter=counter
        )
    points_by_customer: dict[str, int] = {}
    campaign_points: dict[str, int] = {}
    for outcome in run.fired:  # final after the caps
        points = outcome.points
        if points and outcome.customer_id:
            points_by_customer[outcome.customer_id] = points_by_customer.get(outcome.customer_id, 0) + points
        if points and outcome.campaign:
            campaign_points[outcome.campaign] = campaign_points.get(outcome.campaign, 0) + points
    commands = plan_commands(ruleset, event, run.fired, at)
    if caps.per_customer is not None:
        for cid, points in points_by_customer.items():
            run.counters.setdefault(cid, {})[counter] = points
    return Evaluation(
        ruleset.ruleset_id,
        ruleset.version,
        event.id,
        customer.customer_id,
        run.trace,
        commands,
        campaign_points,
        run.counters,
        points_by_customer,
    )


def _basket(ruleset: CompiledRuleset, event: CloudEvent[Any]) -> Basket:
    """The order's lines as the line rules see them (empty for engagement); refuses an event the version
    cannot take (an undeclared custom type, a currency it does not configure)."""
    data = event.data
    if event.type.startswith(CUSTOM_TYPE_PREFIX) and not ruleset.declares(event.type):
        raise EventRefused(
            f"custom event type {event.type!r} is not declared in ruleset {ruleset.ruleset_id!r} v{ruleset.version}"
        )
    if not isinstance(data, PurchaseCompleted):
        return Basket.empty()
    currencies = ruleset.document.currencies
    config = currencies.get(data.currency)
    if config is None:
        raise EventRefused(
            f"unknown currency {data.currency!r}: ruleset {ruleset.ruleset_id!r} v{ruleset.version} "
            f"configures {sorted(currencies)}"
        )
    return Basket.of(ruleset, data, config.points_per_unit)


def _skipped(
    compiled: CompiledRule, basket: Basket, at: datetime, scope: dict[str, Mapping[str, Any]], memo: bool
) -> RuleOutcome | None:
    """The outcome of a rule that does not apply (no line for it, outside its window, its condition not
    met), or None when it applies."""
    if compiled.indexed and compiled.position not in basket.amounts:
        return compiled.no_line
    if compiled.windowed:
        if compiled.starts is not None and at < compiled.starts:
            return compiled.not_yet_valid
        if compiled.ends is not None and at >= compiled.ends:
            return compiled.no_longer_valid
    when = compiled.when
    if when is not None:
        met = when.check(scope, memo)
        if met is not True:
            return compiled.condition_not_met if met is False else RuleOutcome(compiled.rule_id, False, 0, str(met))
    return None


class _Run:
    """The outcomes of one evaluation so far, and what the rules after them read of them."""

    def __init__(
        self, customer: CustomerSnapshot, referred: CustomerSnapshot | None, at: datetime, spent: dict[str, int]
    ) -> None:
        self.customer = customer
        self.referred = referred
        self.at = at
        self.spent = spent  # campaign -> points spent from its budget, this event's included
        self.trace: list[RuleOutcome] = []
        self.fired: list[RuleOutcome] = []  # the fired outcomes, in trace order
        self.accumulated = 0  # the buyer's points so far, which a tier multiplier scales
        self.counters: dict[str, dict[str, int]] = {}  # customer -> counter key -> increment

    def fire(
        self,
        compiled: CompiledRule,
        ruleset: CompiledRuleset,
        basket: Basket,
        scope: dict[str, Mapping[str, Any]],
        event: CloudEvent[Any],
    ) -> bool:
        """Records what a rule that applies awards; False when the rule stops the evaluation."""
        customer_id = self.customer.customer_id
        outcomes: list[RuleOutcome] | RuleOutcome
        if compiled.bonus:
            outcomes = bonus(compiled, customer_id)
        elif compiled.line_rule:
            outcomes = line_rule(compiled, basket, scope, customer_id, ruleset.rounding)
        elif compiled.tier:
            tier = self.customer.tier
            outcomes = tier_multiplier(compiled, ruleset.tiers, tier, self.accumulated, customer_id, ruleset.rounding)
        else:
            outcomes = engagement(compiled, self.customer, self.referred, self.at, event.data)
        if isinstance(outcomes, RuleOutcome):
            if not outcomes.fired:
                self.trace.append(outcomes)
                return True
            if compiled.plain:  # no max_points, campaign, limit or stop: nothing to adjust
                self.accumulated += outcomes.points
                self.trace.append(outcomes)
                self.fired.append(outcomes)
                return True
            outcomes = [outcomes]
        for outcome in outcomes:
            self._limit(compiled, outcome)
            if outcome.customer_id == customer_id:
                self.accumulated += outcome.points
            self.trace.append(outcome)
            self.fired.append(outcome)
        if compiled.limit is not None:
            self.counters.setdefault(customer_id, {})[compiled.limit_key(self.at)] = 1
        if compiled.stop:
            self.trace[-1].explanation += "; stop: no lower-priority rule is evaluated"
            return False
        return True

    def _limit(self, compiled: CompiledRule, outcome: RuleOutcome) -> None:
        """Cuts a fired outcome to the rule's max_points and to what its campaign's budget has left."""
        max_points = compiled.max_points
        if max_points is not None and outcome.points > max_points:
            outcome.explanation += f"; capped at the rule's max_points {max_points}"
            outcome.points = max_points
        campaign, budget = compiled.campaign, compiled.budget
        if campaign is not None and budget is not None:
            left = max(budget - self.spent.get(campaign, 0), 0)
            if outcome.points > left:
                outcome.explanation += f"; campaign {campaign!r} budget leaves {left}"
                outcome.points = left
            self.spent[campaign] = self.spent.get(campaign, 0) + outcome.points


def check_referral(referral: ReferralConverted) -> None:
    """A customer cannot refer itself: both sides' rewards would go to one customer."""
    if referral.referred_customer_id == referral.customer_id:
        raise EventRefused(f"self-referral: customer {referral.customer_id!r} cannot refer itself")
