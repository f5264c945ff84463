"""The rules engine and the batch code run compiled by mypyc (`make native`, part of `make setup`). These
tests check that the extensions Python imports are built from the current sources, and that the compiled
engine computes exactly what the interpreted source computes, on a stream of events that exercises every
rule kind. (The compiled batch code is what every pipeline test runs.)"""

from __future__ import annotations

import hashlib
import random
import sys
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import rules.batch
import rules.engine
import rules.rows
from rules import ruleset as rs
from shared.events import CloudEvent
from tests.rules.helpers import interpreted_engine
from tests.rules.samples import T0, TIERS, doc, line, order, review

SOURCE = Path(rules.engine.__file__ or "").with_name("engine.py")
ROOT = Path(__file__).resolve().parents[2]


class TestBuild:
    @pytest.mark.parametrize("module", [rules.engine, rules.batch, rules.rows], ids=lambda m: m.__name__)
    def test_the_imported_module_is_compiled_from_this_source(self, module: ModuleType) -> None:
        compiled = Path(module.__file__ or "")
        assert compiled.suffix == ".so", f"{module.__name__} runs interpreted: run `make native`"
        stamp = compiled.with_name(compiled.name.split(".")[0] + ".build")
        # One `sha256sum` line per input: the module's source first, then the project modules it imports.
        inputs = [line.split(maxsplit=1) for line in stamp.read_text().splitlines()]
        assert inputs[0][1] == str(compiled.with_name(compiled.name.split(".")[0] + ".py").relative_to(ROOT))
        assert len(inputs) > 1, "the imports are part of the stamp"
        for digest, path in inputs:
            assert digest == hashlib.sha256((ROOT / path).read_bytes()).hexdigest(), (
                f"{path} changed since {module.__name__} was compiled: run `make native`"
            )


DOCUMENT = doc(
    {"id": "base", "kind": "points_per_unit", "priority": 100},
    {"id": "first", "kind": "bonus", "points": 100, "when": "customer.purchase_count == 0"},
    {"id": "third", "kind": "bonus", "points": 30, "when": "customer.purchase_count == 2"},
    {
        "id": "cross",
        "kind": "bonus",
        "points": 40,
        "when": "customer.purchase_count > 0 && size(event.new_categories) > 0",
    },
    {"id": "up", "kind": "bonus", "points": 50, "when": "event.net_amount >= 500.0"},
    {"id": "winback", "kind": "bonus", "points": 80, "when": "customer.days_since_last_purchase > 30"},
    {"id": "cat", "kind": "line_multiplier", "categories": ["paint"], "multiplier": "1.5"},
    {"id": "hero", "kind": "line_multiplier", "skus": ["S-1"], "multiplier": "3", "max_points": 400},
    {"id": "bulk", "kind": "line_multiplier", "line_when": "line.quantity >= 10.0", "multiplier": "1.2"},
    {"id": "promo", "kind": "bonus", "points": 25, "campaign": "spring", "stop": True, "priority": -50},
    {"id": "tier", "kind": "tier_multiplier", "priority": -10},
    {
        "id": "review",
        "kind": "engagement",
        "on": "review.posted",
        "points": 15,
        "limit": {"count": 2, "period": "month"},
    },
    currencies={"EUR": {"points_per_unit": "1"}, "USD": {"points_per_unit": "2", "spend_factor": "0.9"}},
    rounding="half_up",
    pending_days=7,
    exclusions={"gift_cards": True, "shipping": True},
    caps={"per_order": 3000, "per_customer": {"points": 5000, "period": "month"}},
    campaigns={"spring": {"starts_at": "2026-03-20T00:00:00Z", "ends_at": "2026-05-01T00:00:00Z", "budget": 2000}},
    tiers=TIERS,
)


def _events(tenant: str, count: int) -> list[CloudEvent[Any]]:
    rng = random.Random(20261204)
    out: list[CloudEvent[Any]] = []
    for i in range(count):
        customer = f"c-{rng.randrange(12)}"
        at = T0 + timedelta(hours=7 * i)
        if rng.random() < 0.15:
            out.append(review(tenant, customer, at=at))
            continue
        lines = [
            line(
                rng.choice(["S-1", "S-2", "S-3", "GC-1"]),
                rng.choice(["paint", "tools", "safety", "gift_card", "shipping"]),
                str(rng.choice([1, 2, 10, 25])),
                f"{rng.randint(100, 90000) / 100:.2f}",
            )
            for _ in range(rng.randint(1, 4))
        ]
        out.append(order(tenant, customer, lines, at=at, currency=rng.choice(["EUR", "EUR", "USD"])))
    return out


def _replay(engine: ModuleType, events: list[CloudEvent[Any]]) -> list[tuple[Any, ...]]:
    """Evaluates the stream with state, campaign spend and tier reviews carried along; returns every
    visible result: commands (ids, points, breakdowns), the whole trace and the state after each event."""
    compiled = engine.CompiledRuleset.compile("main", 1, rs.parse(DOCUMENT))
    tiers = compiled.document.tiers
    states: dict[str, Any] = {}
    spent: dict[str, int] = {}
    out: list[tuple[Any, ...]] = []
    for event in events:
        cid = event.data.customer_id
        state = states.setdefault(cid, engine.CustomerSnapshot(cid))
        ev = engine.evaluate(compiled, event, state, campaign_spent=spent)
        for campaign, points in ev.campaign_points.items():
            spent[campaign] = spent.get(campaign, 0) + points
        engine.apply_event(
            state,
            event,
            spend_factor=compiled.spend_factor(getattr(event.data, "currency", "EUR")),
            points=ev.points_by_customer.get(cid, 0),
            counters=ev.counters.get(cid, {}),
        )
        change = engine.review_tier(state, tiers, event.time)
        out.append(
            (
                ev.total_points,
                [(c.command_id, c.customer_id, c.points, c.matures_at, c.breakdown) for c in ev.commands],
                [(o.rule_id, o.fired, o.points, o.explanation, o.customer_id) for o in ev.trace],
                (state.purchase_count, state.spend_12m(event.time), sorted(state.categories), state.tier),
                (change.previous, change.tier, change.reason) if change else None,
            )
        )
    return out


class TestSameResults:
    def test_compiled_and_interpreted_engines_agree_on_every_result(self) -> None:
        events = _events("t-native", 600)
        compiled_results = _replay(rules.engine, events)
        interpreted = interpreted_engine()
        assert interpreted.__file__ == str(SOURCE)
        assert compiled_results == _replay(interpreted, events)
        # The stream reaches every kind of outcome, so the comparison covers them.
        explanations = " ".join(o[3] for r in compiled_results for o in r[2])
        for fragment in ("per-order cap", "per-customer cap", "tier Silver", "tier Gold", "limit", "condition not met"):
            assert fragment in explanations, fragment
        assert any(r[4] for r in compiled_results), "tier changes happened"

    def test_clawback_plans_agree(self) -> None:
        interpreted = interpreted_engine()
        awards = [("earn-a", "c-1", 120, 0), ("earn-b", "c-2", 33, 10)]
        plans = []
        for engine in (rules.engine, interpreted):
            records = [engine.AwardRecord(*a) for a in awards]
            plan = engine.plan_clawbacks(
                "t", "refund-1", records, order_net=Decimal(300), refunded_before=Decimal(50), refunded_now=Decimal(70)
            )
            plans.append([(p.command_id, p.customer_id, p.original_command_id, p.points) for p in plan])
        assert plans[0] == plans[1]
        assert plans[0], "the refund claws something back"


@pytest.fixture(autouse=True)
def _cleanup() -> Any:
    yield
    sys.modules.pop("rules_engine_interpreted", None)
