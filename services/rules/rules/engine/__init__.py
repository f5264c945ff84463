"""The rules engine: pure rule evaluation, (event, ruleset version, customer state) -> awards with their
arithmetic. No I/O, nothing awaited. The consumer (rules.batch) and `POST /v1/simulate` call the same
`evaluate`, so a simulation equals the award the pipeline produces for the same event and state.

One module per concern (docs/rules.md, Code):

- `basics`: command ids, periods and months, rounding and the text of numbers, EventRefused.
- `conditions`: CEL conditions, memoized on the fields they read, within an evaluation budget.
- `compiled`: a ruleset version compiled for evaluation (rule order per event type, windows, line index).
- `views`: what `event`, `customer` and `line` mean in a condition.
- `state`: the customer state, how events and refunds change it, the tier review.
- `basket`: an order's eligible lines and the line rules' matching amounts.
- `kinds`: what each kind of rule awards.
- `evaluation`: the loop over the rules; `caps` and `commands`: what follows it.
- `refunds`: whether an order takes a refund, and the clawbacks of its awards.
- `outcomes`: what an evaluation returns.

The modules are compiled by mypyc (`make native`); docs/rules.md lists what the hot path
avoids.
"""

from rules.engine.basics import EventRefused, command_id, event_time, month_key, period_key
from rules.engine.compiled import CompiledRule, CompiledRuleset
from rules.engine.conditions import INPUT_CHARACTERS, INPUT_ITEMS, Condition
from rules.engine.evaluation import check_referral, evaluate
from rules.engine.outcomes import Evaluation, PlannedEarn, RuleOutcome
from rules.engine.refunds import AwardRecord, PlannedClawback, check_refund, plan_clawbacks, refund_amount
from rules.engine.state import CustomerSnapshot, TierChange, apply_event, apply_refund, review_tier
from rules.engine.views import customer_view, event_view

__all__ = [
    "INPUT_CHARACTERS",
    "INPUT_ITEMS",
    "AwardRecord",
    "CompiledRule",
    "CompiledRuleset",
    "Condition",
    "CustomerSnapshot",
    "Evaluation",
    "EventRefused",
    "PlannedClawback",
    "PlannedEarn",
    "RuleOutcome",
    "TierChange",
    "apply_event",
    "apply_refund",
    "check_referral",
    "check_refund",
    "command_id",
    "customer_view",
    "evaluate",
    "event_time",
    "event_view",
    "month_key",
    "period_key",
    "plan_clawbacks",
    "refund_amount",
    "review_tier",
]
