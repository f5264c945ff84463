"""Process once, through the real broker and PostgreSQL (and REST ingest): events are told apart by tenant,
source and id; business ids (refund, review) count once per tenant whatever the event ids; refunds for
another customer than the order's and self-referrals are refused without holding up what follows."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from rules.app import create_app
from rules.service import rules_service
from shared.db import transaction
from shared.events import CloudEvent, make_event
from tests.conftest import create_api_key, dead_letters_for, running_app, service_settings
from tests.rules.helpers import clawed, commands, earned, inbound, install, rules_database, send
from tests.rules.samples import BASE, doc, line, order, referral, refund, review

pytestmark = [pytest.mark.kafka, pytest.mark.db]

SCOPES = ["rules:admin", "points:read", "events:write"]
DOCUMENT = doc(
    BASE,
    {"id": "review", "kind": "engagement", "on": "review.posted", "points": 20},
    {"id": "ref", "kind": "engagement", "on": "referral.converted", "points": 200, "referred_points": 50},
)


@pytest.fixture(scope="module")
async def client(kafka_topics: list[str]) -> AsyncIterator[httpx.AsyncClient]:
    settings = service_settings("rules", consumer_group_suffix=f"-once-{uuid.uuid4().hex[:6]}")
    async with running_app(create_app(settings)) as c:
        yield c


@pytest.fixture
async def key(client: httpx.AsyncClient, tenant: str) -> str:
    api_key = await create_api_key("rules", tenant, SCOPES)
    await install(client, api_key, DOCUMENT)
    return api_key


def again(event: CloudEvent[Any], **changes: Any) -> CloudEvent[Any]:
    """The same payload under a new event id (a producer resending it as a new event)."""
    data = event.data.model_copy(update=changes)
    return make_event(event.type, data, tenant_id=event.tenantid, source=event.source, time=event.time)


def with_id(event: CloudEvent[Any], event_id: str) -> CloudEvent[Any]:
    return make_event(
        event.type, event.data, tenant_id=event.tenantid, source=event.source, time=event.time, event_id=event_id
    )


async def ingest(client: httpx.AsyncClient, key: str, *events: CloudEvent[Any]) -> None:
    body = {"events": [json.loads(e.to_bytes()) for e in events]}
    response = await client.post("/v1/events/batch", json=body, headers={"X-API-Key": key})
    assert response.status_code == 202, response.text


class TestEventKeys:
    async def test_one_event_id_from_two_tenants_is_applied_for_both(
        self, client: httpx.AsyncClient, key: str, tenant: str, raw_producer: AIOKafkaProducer
    ) -> None:
        other = f"{tenant}-b"
        await install(client, await create_api_key("rules", other, SCOPES), DOCUMENT)
        purchase_id, review_id, later_id = (f"{kind}-{uuid.uuid4().hex[:8]}" for kind in ("p", "r", "l"))
        # Sent together (one batch, as far as the broker allows): a purchase and a review per tenant, the
        # tenants' events under the same ids.
        for t, price in ((tenant, "42"), (other, "17")):
            await send(
                raw_producer,
                with_id(order(t, "c1", [line("A", "x", "1", price)]), purchase_id),
                with_id(review(t, "c1"), review_id),
            )
        # Across batches: the first tenant's review is applied before the second's arrives.
        await send(raw_producer, with_id(review(tenant, "c1"), later_id))
        await commands(tenant, lambda cs: any(c.data.source_event_id == later_id for c in cs))
        await send(raw_producer, with_id(review(other, "c1"), later_id))
        for t, points in ((tenant, 42), (other, 17)):
            found = await commands(t, lambda cs: len(cs) >= 3)
            assert sorted(e.points for e in earned(found)) == sorted([points, 20, 20]), t
            assert sorted(e.source_event_id for e in earned(found)) == sorted([purchase_id, review_id, later_id])

    async def test_one_event_id_from_two_tenants_in_one_batch(self, tenant: str) -> None:
        # The consumer's batch, exactly: both tenants' events in one call.
        other = f"{tenant}-b"
        shared = f"e-{uuid.uuid4().hex[:8]}"
        events = [
            with_id(review(tenant, "c1"), shared),
            with_id(review(other, "c1"), shared),
            with_id(order(tenant, "c1", [line("A", "x", "1", "5")]), f"{shared}-p"),
            with_id(order(other, "c1", [line("A", "x", "1", "6")]), f"{shared}-p"),
        ]
        async with rules_database(tenant, DOCUMENT) as maker, rules_database(other, DOCUMENT):
            async with transaction(maker) as session:
                outcome = await rules_service.process_batch(session, [inbound(e) for e in events])
        assert outcome.rejections == []
        assert outcome.awards == 4
        assert sorted(row["key"] for row in outcome.outbox_rows) == sorted(
            [f"{tenant}:c1".encode()] * 2 + [f"{other}:c1".encode()] * 2
        )


class TestBusinessIds:
    async def test_a_refund_sent_twice_with_new_event_ids_claws_back_once(
        self, client: httpx.AsyncClient, key: str, tenant: str, raw_producer: AIOKafkaProducer
    ) -> None:
        purchase = order(tenant, "c1", [line("A", "x", "1", "100")])
        await send(raw_producer, purchase)
        await commands(tenant, lambda cs: len(cs) >= 1)
        first = refund(tenant, "c1", purchase.data.order_id, "40")
        # The same refund again, twice: in the same batch and in a later one (through REST ingest).
        await send(raw_producer, first, again(first))
        await ingest(client, key, again(first))
        barrier = order(tenant, "c1", [line("A", "x", "1", "3")])
        await send(raw_producer, barrier)
        found = await commands(tenant, lambda cs: any(c.data.source_event_id == barrier.id for c in cs))
        assert [(c.source_event_id, c.points) for c in clawed(found)] == [(first.id, 40)]
        letters = await dead_letters_for(first.data.refund_id.encode(), count=2)
        reason = f"refund_id {first.data.refund_id!r} was already processed under another event id"
        assert [letter.reason for letter in letters] == [reason, reason]

    async def test_a_review_sent_three_times_is_paid_once(
        self, client: httpx.AsyncClient, key: str, tenant: str, raw_producer: AIOKafkaProducer
    ) -> None:
        posted = review(tenant, "c1")
        await send(raw_producer, posted)
        await commands(tenant, lambda cs: len(cs) >= 1)
        await send(raw_producer, again(posted))
        await ingest(client, key, again(posted))
        other = review(tenant, "c1")
        await send(raw_producer, other)
        found = await commands(tenant, lambda cs: any(c.data.source_event_id == other.id for c in cs))
        assert sorted(e.source_event_id for e in earned(found)) == sorted([posted.id, other.id])
        letters = await dead_letters_for(posted.data.review_id.encode(), count=2)
        assert {letter.reason for letter in letters} == {
            f"review_id {posted.data.review_id!r} was already processed under another event id"
        }

    async def test_an_order_seen_before_under_a_new_event_id_is_not_awarded_again(
        self, key: str, tenant: str, raw_producer: AIOKafkaProducer
    ) -> None:
        purchase = order(tenant, "c1", [line("A", "x", "1", "30")])
        await send(raw_producer, purchase)
        await commands(tenant, lambda cs: len(cs) >= 1)
        await send(raw_producer, again(purchase))
        barrier = order(tenant, "c1", [line("A", "x", "1", "3")])
        await send(raw_producer, barrier)
        found = await commands(tenant, lambda cs: any(c.data.source_event_id == barrier.id for c in cs))
        assert sorted(e.points for e in earned(found)) == [3, 30]
        [letter] = await dead_letters_for(purchase.data.order_id.encode())
        assert letter.reason == f"order {purchase.data.order_id!r} was already processed (event {purchase.id})"


class TestRefusals:
    async def test_a_refund_naming_another_customer_is_refused_and_what_follows_is_applied(
        self, client: httpx.AsyncClient, key: str, tenant: str, raw_producer: AIOKafkaProducer
    ) -> None:
        purchase = order(tenant, "c1", [line("A", "x", "1", "100")])
        await send(raw_producer, purchase)
        await commands(tenant, lambda cs: len(cs) >= 1)
        # Both keyed `tenant:c2`: one partition, the valid purchase behind the refused refund.
        wrong = refund(tenant, "c2", purchase.data.order_id, "100")
        behind = order(tenant, "c2", [line("A", "x", "1", "9")])
        await ingest(client, key, wrong, behind)
        found = await commands(tenant, lambda cs: any(c.data.source_event_id == behind.id for c in cs))
        assert clawed(found) == []
        assert [e.points for e in earned(found, "c2")] == [9]
        [letter] = await dead_letters_for(wrong.data.refund_id.encode())
        assert "refund customer does not match the order's customer" in letter.reason
        # The right customer's refund of the same order is still taken (the refused one released its ids).
        right = again(wrong, customer_id="c1")
        await send(raw_producer, right)
        found = await commands(tenant, lambda cs: len(clawed(cs)) >= 1)
        assert [(c.customer_id, c.points) for c in clawed(found)] == [("c1", 100)]

    async def test_a_self_referral_is_refused_and_what_follows_is_applied(
        self, client: httpx.AsyncClient, key: str, tenant: str, raw_producer: AIOKafkaProducer
    ) -> None:
        itself = referral(tenant, "c1", "c1")
        behind = referral(tenant, "c1", "newco")
        await send(raw_producer, itself, behind)
        found = await commands(tenant, lambda cs: len(cs) >= 2)
        assert sorted((e.customer_id, e.points, e.source_event_id) for e in earned(found)) == [
            ("c1", 200, behind.id),
            ("newco", 50, behind.id),
        ]
        [letter] = await dead_letters_for(itself.data.referral_id.encode())
        assert "self-referral" in letter.reason
        simulated = await client.post(
            "/v1/simulate", json={"event": json.loads(itself.to_bytes())}, headers={"X-API-Key": key}
        )
        assert simulated.status_code == 422
        assert "self-referral" in simulated.json()["detail"]
