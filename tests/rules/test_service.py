from datetime import timedelta, timezone
from typing import Any

import pytest

from rules import ruleset as rs
from rules.batch import BatchWork, Schedule, breakdown_json, earn_command, tier_changed
from rules.engine import CompiledRuleset, CustomerSnapshot, TierChange, evaluate
from shared.events import ClawbackPoints, CloudEvent, EarnPoints, Payload, TierChanged, decode_event
from tests.rules.samples import BASE, T0, TIERS, doc, line, order, referral, refund, review

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
            row = earn_command("points", TENANT, event, evaluation, plan, breakdown_json(plan))
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


def _assert_is_the_validated_event(row: dict[str, Any], model: type[Payload]) -> CloudEvent[Any]:
    event = decode_event(row["value"])
    assert isinstance(event.data, model)
    assert event.to_bytes() == row["value"], "byte for byte what the validated event serialises to"
    assert row["key"] == event.key
    return event


class TestOtherOutputRows:
    def test_tier_changed_first_tier_and_upgrade(self) -> None:
        compiled = CompiledRuleset.compile("main", 2, rs.parse(DOCUMENT))
        for previous in (None, "Bronze"):
            change = TierChange(previous=previous, tier="Silver", reason="spend_12m 1200 >= 1000")
            # A review time given with an offset is written in UTC, as the envelope's validator would.
            at = T0.astimezone(timezone(timedelta(hours=2)))
            row = tier_changed("customers", TENANT, "c-9", change, compiled, "evt-1", at)
            event = _assert_is_the_validated_event(row, TierChanged)
            assert (event.data.previous_tier, event.data.tier, event.data.ruleset_version) == (previous, "Silver", 2)
            assert event.time == T0
            assert b'"time":"2026-03-10T12:00:00Z"' in row["value"]

    def test_clawback_of_a_refund(self) -> None:
        compiled = CompiledRuleset.compile("main", 1, rs.parse(DOCUMENT))
        work = BatchWork("")
        work.schedules = {TENANT: Schedule([T0 - timedelta(days=1)], [("main", 1)])}
        work.compiled = {(TENANT, "main", 1): compiled}
        purchase = order(TENANT, "c-5", [line("S-1", "tools", "10", "10")], order_id="SO-5")
        work.apply(purchase)
        work.apply(refund(TENANT, "c-5", "SO-5", "50"))
        clawbacks = [r for r in work.outbox if b'"points.clawback"' in r["value"]]
        assert len(clawbacks) == 1
        event = _assert_is_the_validated_event(clawbacks[0], ClawbackPoints)
        (earned,) = [decode_event(r["value"]) for r in work.outbox if b'"points.earn"' in r["value"]]
        assert isinstance(earned.data, EarnPoints)
        assert event.data.original_command_id == earned.data.command_id
        assert event.data.points * 2 == earned.data.points, "half the order refunded: half its points back"
