"""The rules pipeline through the real Kafka broker and PostgreSQL: events in, commands out.

Expected points are worked out by hand in each test from the ruleset it installs.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from rules.app import create_app
from shared.events import CloudEvent
from shared.topics import PURCHASES
from tests.conftest import create_api_key, dead_letters_for, eventually, running_app, service_settings, topic
from tests.rules.helpers import clawed, commands, earned, install, send, tier_changes
from tests.rules.samples import BASE, T0, TIERS, custom, doc, line, order, referral, refund, review

pytestmark = [pytest.mark.kafka, pytest.mark.db]

SCOPES = ["rules:admin", "points:read", "events:write"]


@pytest.fixture(scope="module")
async def client(kafka_topics: list[str]) -> AsyncIterator[httpx.AsyncClient]:
    settings = service_settings(
        "rules",
        consumer_group_suffix=f"-pipeline-{uuid.uuid4().hex[:6]}",
        outbox_sweep_seconds=0.3,
        outbox_sweep_after_seconds=0.2,
        # The tier tests date an order 400 days after T0 (2026-03-10), later than today until 2027-04.
        max_future_skew_seconds=2 * 365 * 86400,
    )
    async with running_app(create_app(settings)) as c:
        yield c


@pytest.fixture
async def key(tenant: str) -> str:
    return await create_api_key("rules", tenant, SCOPES)


async def state(client: httpx.AsyncClient, key: str, customer: str) -> dict[str, object] | None:
    response = await client.get(f"/v1/customers/{customer}/state", headers={"X-API-Key": key})
    return response.json() if response.status_code == 200 else None


class TestAward:
    async def test_purchase_award_with_breakdown_and_state(
        self, client: httpx.AsyncClient, key: str, tenant: str, raw_producer: AIOKafkaProducer
    ) -> None:
        document = doc(
            BASE,
            {"id": "first", "kind": "bonus", "points": 50, "when": "customer.purchase_count == 0"},
            {"id": "tools-x2", "kind": "line_multiplier", "categories": ["tools"], "multiplier": "2"},
            tiers=TIERS,
        )
        version = await install(client, key, document)
        event = order(
            tenant,
            "c1",
            [
                line("A", "tools", "2", "10.50"),
                line("B", "paint", "1", "5.25"),
                line("GC", "gift", "1", "20", gift_card=True),
            ],
        )
        await send(raw_producer, event)
        found = await commands(tenant, lambda cs: len(cs) >= 1)
        # base: 21 + 5.25 = 26.25 -> 26 (the gift card is excluded); first purchase 50; tools 21 x (2-1) = 21
        [earn] = earned(found)
        assert earn.points == 97
        assert [(a.rule_id, a.points) for a in earn.breakdown] == [("base", 26), ("first", 50), ("tools-x2", 21)]
        assert (earn.ruleset_id, earn.ruleset_version) == ("main", version)
        assert earn.source_event_id == event.id
        assert earn.member_id == "buyer-1"
        assert earn.command_id == found[0].id
        st = await eventually(lambda: state(client, key, "c1"))
        assert st["purchase_count"] == 1
        assert Decimal(str(st["spend_12m"])) == Decimal("46.25")
        assert st["categories"] == ["gift", "paint", "tools"]
        assert st["tier"] == "Bronze"
        awards = (await client.get("/v1/customers/c1/awards", headers={"X-API-Key": key})).json()
        assert [(a["command_id"], a["points"], a["ruleset_version"]) for a in awards] == [
            (earn.command_id, 97, version)
        ]
        assert (
            awards[0]["breakdown"][0]["explanation"] == "26.25 EUR eligible * 1 pt/EUR * factor 1 = 26.25 → 26 (floor)"
        )
        # The stored award and the published command carry one serialisation of the breakdown.
        assert awards[0]["breakdown"] == [a.model_dump() for a in earn.breakdown]

    async def test_duplicate_events_award_once(
        self, client: httpx.AsyncClient, key: str, tenant: str, raw_producer: AIOKafkaProducer
    ) -> None:
        await install(client, key, doc(BASE))
        event = order(tenant, "c1", [line("A", "x", "1", "42")])
        barrier = order(tenant, "c1", [line("A", "x", "1", "8")])
        await send(raw_producer, event, event, event, barrier)
        found = await commands(tenant, lambda cs: any(c.data.source_event_id == barrier.id for c in cs))
        assert sorted(e.points for e in earned(found)) == [8, 42]
        st = await state(client, key, "c1")
        assert st is not None
        assert st["purchase_count"] == 2

    async def test_engagement_limits_and_referral(
        self, client: httpx.AsyncClient, key: str, tenant: str, raw_producer: AIOKafkaProducer
    ) -> None:
        document = doc(
            {
                "id": "review",
                "kind": "engagement",
                "on": "review.posted",
                "points": 20,
                "limit": {"count": 2, "period": "month"},
            },
            {"id": "ref", "kind": "engagement", "on": "referral.converted", "points": 200, "referred_points": 50},
            {"id": "survey", "kind": "engagement", "on": "survey.answered", "points": 5},
        )
        await install(client, key, document)
        await send(raw_producer, *(review(tenant, "c1") for _ in range(3)), referral(tenant, "c1", "newco"))
        found = await commands(tenant, lambda cs: len(cs) >= 4)
        await send(raw_producer, review(tenant, "c1", at=T0 + timedelta(days=31)))
        found = await commands(tenant, lambda cs: len(cs) >= 5)
        # 2 reviews in March (the 3rd is over the limit), 1 in April; referrer 200, referred 50
        assert sorted(e.points for e in earned(found, "c1")) == [20, 20, 20, 200]
        assert [e.points for e in earned(found, "newco")] == [50]

    async def test_caps_and_campaign_budget_hold_across_batches(
        self, client: httpx.AsyncClient, key: str, tenant: str, raw_producer: AIOKafkaProducer
    ) -> None:
        document = doc(
            BASE,
            {"id": "promo", "kind": "bonus", "points": 40, "campaign": "promo", "priority": 200},
            campaigns={"promo": {"budget": 100}},
            caps={"per_customer": {"points": 150, "period": "month"}},
        )
        await install(client, key, document)
        for customer in ("a", "b", "c"):
            await send(raw_producer, order(tenant, customer, [line("A", "x", "1", "60")]))
            await commands(tenant, _has_command_for(customer))
        await send(raw_producer, order(tenant, "a", [line("A", "x", "1", "60")]))
        found = await commands(tenant, lambda cs: len(cs) >= 4)
        totals = {c: sorted(e.points for e in earned(found, c)) for c in ("a", "b", "c")}
        # promo budget 100: a 40, b 40, c 20 (what is left), a's 2nd order 0; base 60 each.
        # a's month cap 150: first order 100, second 60 -> only 50 left
        assert totals == {"a": [50, 100], "b": [100], "c": [80]}


def _has_command_for(customer: str) -> Callable[[list[CloudEvent[Any]]], bool]:
    return lambda found: any(c.data.customer_id == customer for c in found)


class TestTiers:
    async def test_tier_up_raises_later_awards_and_review_steps_down_one_level(
        self, client: httpx.AsyncClient, key: str, tenant: str, raw_producer: AIOKafkaProducer
    ) -> None:
        document = doc(BASE, {"id": "tier", "kind": "tier_multiplier", "priority": -1}, tiers=TIERS)
        await install(client, key, document)
        big = order(tenant, "c1", [line("A", "x", "1", "6000")])
        after = order(tenant, "c1", [line("A", "x", "1", "100")], at=T0 + timedelta(days=1))
        year_later = order(tenant, "c1", [line("A", "x", "1", "10")], at=T0 + timedelta(days=400))
        await send(raw_producer, big, after, year_later)
        found = await commands(tenant, lambda cs: len(cs) >= 3)
        by_event = {e.source_event_id: e.points for e in earned(found)}
        # 6000 with no tier yet -> 6000; then Gold (x2): 100 + 100 = 200; a year on still Gold at evaluation: 20
        assert by_event == {big.id: 6000, after.id: 200, year_later.id: 20}
        changes = await tier_changes(tenant, 2)
        assert [(c.data.previous_tier, c.data.tier) for c in changes] == [(None, "Gold"), ("Gold", "Silver")]
        tier = await client.get("/v1/customers/c1/tier", headers={"X-API-Key": key})
        assert tier.json()["tier"] == "Silver"

    async def test_scheduled_review_steps_down_customers_without_new_events(
        self, client: httpx.AsyncClient, key: str, tenant: str, raw_producer: AIOKafkaProducer
    ) -> None:
        await install(client, key, doc(BASE, tiers=TIERS))
        await send(raw_producer, order(tenant, "quiet", [line("A", "x", "1", "6000")]))
        assert (await tier_changes(tenant, 1))[0].data.tier == "Gold"
        headers = {"X-API-Key": key}
        early = await client.post("/v1/tiers/review", json={"at": "2026-04-01T00:00:00Z"}, headers=headers)
        assert early.json() == {"reviewed": 1, "changed": 0}, "not due yet, and still qualified"
        year_on = await client.post("/v1/tiers/review", json={"at": "2027-05-01T00:00:00Z"}, headers=headers)
        # nothing in the last 12 months qualifies for Bronze, but one level per review: Gold -> Silver
        assert year_on.json() == {"reviewed": 1, "changed": 1}
        changes = await tier_changes(tenant, 2)
        assert [(c.data.previous_tier, c.data.tier) for c in changes] == [(None, "Gold"), ("Gold", "Silver")]
        assert "downgrade policy one_level" in changes[1].data.reason
        tier = await client.get("/v1/customers/quiet/tier", headers=headers)
        assert tier.json()["tier"] == "Silver"


class TestRefunds:
    async def test_refund_is_clawed_back_under_the_version_that_awarded(
        self, client: httpx.AsyncClient, key: str, tenant: str, raw_producer: AIOKafkaProducer
    ) -> None:
        await install(client, key, doc(BASE))
        purchase = order(tenant, "c1", [line("A", "x", "4", "50")])
        await send(raw_producer, purchase)
        [earn] = earned(await commands(tenant, lambda cs: len(cs) >= 1))
        assert earn.points == 200
        # v2 triples the points from the next day on
        v2 = await install(client, key, doc({**BASE, "factor": "3"}), effective_from="2026-03-11T00:00:00Z")
        later = order(tenant, "c1", [line("A", "x", "1", "10")], at=T0 + timedelta(days=2))
        partial = refund(tenant, "c1", purchase.data.order_id, "50", at=T0 + timedelta(days=2))
        rest = refund(tenant, "c1", purchase.data.order_id, "150", at=T0 + timedelta(days=3))
        await send(raw_producer, later, partial, rest)
        found = await commands(tenant, lambda cs: len(cs) >= 4)
        later_earn = next(e for e in earned(found) if e.source_event_id == later.id)
        assert (later_earn.points, later_earn.ruleset_version) == (30, v2)
        # 50 of 200 EUR returned -> 200 x 1/4 = 50 points of the v1 award (v2 would say 150); the rest 150
        claws = {c.source_event_id: c for c in clawed(found)}
        assert claws[partial.id].points == 50
        assert claws[rest.id].points == 150
        assert {c.original_command_id for c in claws.values()} == {earn.command_id}


class TestDeadLetters:
    async def test_refused_events_go_to_the_dlq_with_the_reason(
        self, client: httpx.AsyncClient, key: str, tenant: str, raw_producer: AIOKafkaProducer
    ) -> None:
        await install(client, key, doc(BASE))
        unseen = refund(tenant, "c1", f"never-{tenant}", "10")
        yen = order(tenant, "c1", [line("A", "x", "1", "10")], currency="JPY")
        podcast = custom(tenant, "c1", "podcast")
        malformed = json.loads(order(tenant, "c1", [line("A", "x", "1", "10")]).to_bytes())
        malformed["data"]["net_amount"] = "lots"
        good = order(tenant, "c1", [line("A", "x", "1", "7")])
        same_order_again = order(tenant, "c1", [line("A", "x", "1", "7")], order_id=good.data.order_id)
        await send(raw_producer, unseen, yen, podcast)
        await raw_producer.send_and_wait(topic(PURCHASES), json.dumps(malformed).encode(), key=b"x")
        await send(raw_producer, good, same_order_again)
        found = await commands(tenant, lambda cs: len(cs) >= 1)
        assert [e.points for e in earned(found)] == [7]
        letters = await dead_letters_for(tenant.encode(), count=5)
        reasons = " | ".join(letter.reason for letter in letters)
        assert f"refund of order 'never-{tenant}', which this service never saw" in reasons
        assert "unknown currency 'JPY'" in reasons
        assert "custom event type 'custom.podcast' is not declared" in reasons
        assert "data.net_amount" in reasons
        assert f"order {good.data.order_id!r} was already processed (event {good.id})" in reasons

    async def test_a_refused_event_replayed_after_the_fix_is_processed(
        self, client: httpx.AsyncClient, key: str, tenant: str, raw_producer: AIOKafkaProducer
    ) -> None:
        await install(client, key, doc(BASE))
        yen = order(tenant, "c1", [line("A", "x", "3", "100")], currency="JPY")
        await send(raw_producer, yen)
        [letter] = await dead_letters_for(yen.id.encode())
        assert "unknown currency 'JPY'" in letter.reason
        # v2 adds JPY at 0.1 point per yen, effective before the order
        jpy = doc(BASE, currencies={"EUR": {"points_per_unit": "1"}, "JPY": {"points_per_unit": "0.1"}})
        await install(client, key, jpy, effective_from="2026-02-01T00:00:00Z")
        assert letter.value is not None
        await raw_producer.send_and_wait(topic(PURCHASES), letter.value, key=letter.key)
        [earn] = earned(await commands(tenant, lambda cs: len(cs) >= 1))
        # 300 JPY x 0.1 = 30
        assert (earn.points, earn.ruleset_version, earn.source_event_id) == (30, 2, yen.id)


class TestSimulate:
    async def test_simulation_equals_the_award_the_pipeline_makes(
        self, client: httpx.AsyncClient, key: str, tenant: str, raw_producer: AIOKafkaProducer
    ) -> None:
        document = doc(
            BASE,
            {"id": "cross", "kind": "bonus", "points": 25, "when": "size(event.new_categories) > 0"},
            {"id": "second", "kind": "bonus", "points": 10, "when": "customer.purchase_count == 1"},
            {"id": "paint-x3", "kind": "line_multiplier", "categories": ["paint"], "multiplier": "3"},
            pending_days=14,
        )
        await install(client, key, document)
        first = order(tenant, "c1", [line("A", "tools", "1", "100")])
        await send(raw_producer, first)
        await commands(tenant, lambda cs: len(cs) >= 1)
        second = order(
            tenant, "c1", [line("A", "tools", "1", "10"), line("P", "paint", "2", "7.5")], at=T0 + timedelta(days=1)
        )
        response = await client.post(
            "/v1/simulate", json={"event": json.loads(second.to_bytes())}, headers={"X-API-Key": key}
        )
        assert response.status_code == 200, response.text
        simulated = response.json()
        # base 10 + 15 = 25; new category paint -> 25; 2nd purchase -> 10; paint 15 x (3 - 1) = 30
        assert simulated["total_points"] == 90
        await send(raw_producer, second)
        found = await commands(tenant, lambda cs: len(cs) >= 2)
        [real] = [e for e in earned(found) if e.source_event_id == second.id]
        [planned] = simulated["commands"]
        assert planned["command_id"] == real.command_id
        assert planned["points"] == real.points == 90
        assert planned["breakdown"] == [a.model_dump() for a in real.breakdown]
        assert planned["matures_at"] is not None
        assert real.matures_at == T0 + timedelta(days=15)


class TestIngest:
    async def test_rest_ingest_reaches_the_pipeline(self, client: httpx.AsyncClient, key: str, tenant: str) -> None:
        await install(client, key, doc(BASE))
        one = json.loads(order(tenant, "c1", [line("A", "x", "1", "11")]).to_bytes())
        del one["tenantid"]  # taken from the API key
        response = await client.post("/v1/events", json=one, headers={"X-API-Key": key})
        assert response.status_code == 202, response.text
        assert response.json()["event_ids"] == [one["id"]]
        batch = [
            json.loads(order(tenant, "c2", [line("A", "x", "1", "12")]).to_bytes()),
            json.loads(review(tenant, "c2").to_bytes()),
        ]
        response = await client.post("/v1/events/batch", json={"events": batch}, headers={"X-API-Key": key})
        assert response.status_code == 202
        found = await commands(tenant, lambda cs: len(cs) >= 2)
        assert sorted(e.points for e in earned(found)) == [11, 12]
