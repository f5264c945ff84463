"""What an evaluation returns: each rule's outcome (the trace), the earn commands it plans, and the whole.

The classes built per event are dataclasses with init=False and an __init__ of their own: mypyc compiles
that one, while the one the decorator would generate runs interpreted and is called with its arguments
packed in a tuple and a dict. The decorator still gives them == and repr.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from shared.events import RuleAward


@dataclass(slots=True, init=False)
class RuleOutcome:
    """Whether a rule fired, its points (after its own limits and the caps) and the arithmetic as text."""

    rule_id: str
    fired: bool
    points: int
    explanation: str
    customer_id: str | None
    pending_days: int
    campaign: str | None

    def __init__(
        self,
        rule_id: str,
        fired: bool,
        points: int,
        explanation: str,
        customer_id: str | None = None,
        pending_days: int = 0,
        campaign: str | None = None,
    ) -> None:
        self.rule_id = rule_id
        self.fired = fired
        self.points = points
        self.explanation = explanation
        self.customer_id = customer_id
        self.pending_days = pending_days
        self.campaign = campaign


@dataclass(init=False)
class PlannedEarn:
    """One `points.earn` command: a customer's awards that mature together."""

    command_id: str
    customer_id: str
    member_id: str | None
    points: int
    matures_at: datetime | None
    breakdown: list[RuleAward]

    def __init__(
        self,
        command_id: str,
        customer_id: str,
        member_id: str | None,
        points: int,
        matures_at: datetime | None,
        breakdown: list[RuleAward],
    ) -> None:
        self.command_id = command_id
        self.customer_id = customer_id
        self.member_id = member_id
        self.points = points
        self.matures_at = matures_at
        self.breakdown = breakdown


@dataclass(init=False)
class Evaluation:
    ruleset_id: str
    version: int
    event_id: str
    customer_id: str
    trace: list[RuleOutcome]
    commands: list[PlannedEarn]
    campaign_points: dict[str, int]
    counters: dict[str, dict[str, int]]  # customer -> counter key -> increment
    points_by_customer: dict[str, int]

    def __init__(
        self,
        ruleset_id: str,
        version: int,
        event_id: str,
        customer_id: str,
        trace: list[RuleOutcome],
        commands: list[PlannedEarn],
        campaign_points: dict[str, int],
        counters: dict[str, dict[str, int]],
        points_by_customer: dict[str, int],
    ) -> None:
        self.ruleset_id = ruleset_id
        self.version = version
        self.event_id = event_id
        self.customer_id = customer_id
        self.trace = trace
        self.commands = commands
        self.campaign_points = campaign_points
        self.counters = counters
        self.points_by_customer = points_by_customer

    @property
    def total_points(self) -> int:
        return sum(c.points for c in self.commands)
