from datetime import timedelta
from typing import Any

import pytest

from rules import ruleset as rs
from rules.engine import CompiledRuleset, CustomerSnapshot, evaluate
from rules.service import earn_command
from shared.events import EarnPoints, decode_event
from tests.rules.samples import BASE, T0, TIERS, doc, line, order, referral, review

TENANT = "t-service"

DOCUMENT = doc(
    BASE,
    {"id": "first", "kind": "bonus", "points": 100, "when": "customer.purchase_count == 0"},
    {"id": "tier", "kind": "tier_multiplier", "priority": -10},
    {"id": "review", "kind": "engagement", "on": "review.posted", "points": 25},
    {"id": "referral", "kind": "engagement", "on": "referral.converted", "points": 200, "referred_points": 50},
    pending_days=14,
    tiers=TIERS,
)


class TestEarnCommand:
    """The outbox row is written without building the models: its bytes must be exactly what the
    validated CloudEvent[EarnPoints] serialises to."""

    @pytest.mark.parametrize(
        "event",
        [
            pytest.param(order(TENANT, "c-1", [line("S-1", "tools", "3", "19.99")]), id="purchase-pending"),
            pytest.param(
                order(TENANT, "c-ü", [line("S-2", "paint", "1", "2500")], at=T0 + timedelta(days=3)),
                id="purchase-non-ascii-customer",
            ),
            pytest.param(review(TENANT, "c-2"), id="review-no-member"),
            pytest.param(referral(TENANT, "c-3", "c-4"), id="referral-two-commands"),
        ],
    )
    def test_bytes_are_the_validated_events(self, event: Any) -> None:
        compiled = CompiledRuleset.compile("main", 3, rs.parse(DOCUMENT))
        referred = getattr(event.data, "referred_customer_id", None)
        evaluation = evaluate(
            compiled,
            event,
            CustomerSnapshot(event.data.customer_id, tier="Silver"),
            referred=CustomerSnapshot(referred) if referred else None,
        )
        assert evaluation.commands, "the document awards every sample"
        for plan in evaluation.commands:
            row = earn_command("points", TENANT, event, evaluation, plan)
            command = decode_event(row["value"])
            assert isinstance(command.data, EarnPoints)
            assert command.to_bytes() == row["value"]
            assert row["key"] == command.key == f"{TENANT}:{plan.customer_id}".encode()
            assert (command.id, command.data.command_id, command.data.points) == (
                plan.command_id,
                plan.command_id,
                plan.points,
            )
            assert command.data.breakdown == plan.breakdown
            assert command.data.matures_at == plan.matures_at
            assert command.data.source_event_id == event.id
            assert (command.data.ruleset_id, command.data.ruleset_version) == ("main", 3)
