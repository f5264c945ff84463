"""The earn commands an evaluation plans: one `points.earn` per (customer, pending period), so awards that
mature together travel together. A command's id derives from the tenant, the event, the ruleset version,
the customer and the pending period, so re-evaluating an event names the same commands."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import datetime
from typing import Any, Final

from rules.engine.basics import MEMO_LIMIT, EventRefused, days
from rules.engine.compiled import CompiledRuleset
from rules.engine.outcomes import PlannedEarn, RuleOutcome
from shared.events import MAX_POINTS, CloudEvent, RuleAward

_AWARDS: Final[dict[tuple[str, int, str], RuleAward]] = {}
_validate_award: Final[Callable[[dict[str, Any]], RuleAward]] = RuleAward.__pydantic_validator__.validate_python


def plan_commands(
    ruleset: CompiledRuleset, event: CloudEvent[Any], fired: list[RuleOutcome], at: datetime
) -> list[PlannedEarn]:
    """The commands of the fired outcomes (in trace order, after the caps); raises EventRefused for an award
    beyond what a points command may carry (the ledger's bound): the event is refused, not cut."""
    groups: dict[tuple[str, int], list[RuleAward]] = {}
    group_points: dict[tuple[str, int], int] = {}
    fixed, fixed_longest = ruleset.fixed_explanations, ruleset.fixed_longest
    for outcome in fired:
        points = outcome.points
        cid = outcome.customer_id
        if points <= 0 or not cid:
            continue
        if points > MAX_POINTS:
            raise EventRefused(f"an award of {points} points exceeds the maximum of {MAX_POINTS}")
        explanation = outcome.explanation
        award = (
            _award(outcome.rule_id, points, explanation)
            if len(explanation) <= fixed_longest and explanation in fixed
            # What RuleAward(**fields) runs, without the __init__ call around it.
            else _validate_award({"rule_id": outcome.rule_id, "points": points, "explanation": explanation})
        )
        group = (cid, outcome.pending_days)
        awards = groups.get(group)
        if awards is None:
            groups[group] = [award]
            group_points[group] = points
        else:
            awards.append(award)
            group_points[group] += points
    member = getattr(event.data, "member_id", None)
    buyer = getattr(event.data, "customer_id", None)
    prefix = f"{event.tenantid}|{event.id}{ruleset.command_id_part}"
    out = []
    for group, breakdown in groups.items():
        cid, pending = group
        if group_points[group] > MAX_POINTS:
            raise EventRefused(f"an award of {group_points[group]} points exceeds the maximum of {MAX_POINTS}")
        out.append(
            PlannedEarn(
                # command_id("earn", tenant, event id, ruleset id, version, customer, pending): the same text, hashed.
                "earn-" + hashlib.sha256(f"{prefix}{cid}|{pending}".encode()).hexdigest()[:32],
                cid,
                member if cid == buyer else None,
                group_points[group],
                at + days(pending) if pending else None,
                breakdown,
            )
        )
    return out


def _award(rule_id: str, points: int, explanation: str) -> RuleAward:
    """A RuleAward with a fixed explanation (a bonus: the same on every event); frozen, so shared."""
    key = (rule_id, points, explanation)
    award = _AWARDS.get(key)
    if award is None:
        award = RuleAward(rule_id=rule_id, points=points, explanation=explanation)
        if len(_AWARDS) >= MEMO_LIMIT:
            _AWARDS.clear()
        _AWARDS[key] = award
    return award
