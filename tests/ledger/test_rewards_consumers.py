"""The rewards' Kafka side on the real broker: tiers from `tier.changed` (newest by event time wins, whatever
the delivery order), points of a refunded order's discount given back once from `purchase.refunded` (a
reused refund id is dead-lettered), and every order change published on loyalty.rewards.v1."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from ledger.app import create_app
from shared.events import (
    CloudEvent,
    PurchaseRefunded,
    SegmentChanged,
    TierChanged,
    decode_event,
    make_event,
)
from shared.topics import CUSTOMERS, PURCHASES, REWARDS
from tests.conftest import (
    create_api_key,
    dead_letters_for,
    eventually,
    read_topic,
    running_app,
    service_settings,
    topic,
)

pytestmark = [pytest.mark.kafka, pytest.mark.db]


def app_for(tenant: str) -> Any:
    return create_app(service_settings("ledger", consumer_group_suffix=f"-{tenant}", tasks_enabled=False))


async def send(producer: AIOKafkaProducer, name: str, *events: CloudEvent[Any]) -> None:
    for event in events:
        await producer.send_and_wait(topic(name), event.to_bytes(), key=event.key)


def tier(tenant: str, customer: str, name: str, at: datetime) -> CloudEvent[Any]:
    data = TierChanged(customer_id=customer, tier=name, reason="spend")
    return make_event("tier.changed", data, tenant_id=tenant, source="loyalty/rules", time=at)


async def post(client: httpx.AsyncClient, path: str, key: str, body: Any = None) -> Any:
    response = await client.post(path, json=body, headers={"X-API-Key": key, "Idempotency-Key": str(uuid.uuid4())})
    assert response.status_code in (200, 201), response.text
    return response.json()


class TestTiersConsumer:
    async def test_the_newest_tier_wins_whatever_the_order(self, raw_producer: AIOKafkaProducer, tenant: str) -> None:
        admin = await create_api_key("ledger", tenant, ["admin"])
        now = datetime.now(UTC)
        newest = tier(tenant, "acme", "gold", now)
        older = tier(tenant, "acme", "silver", now - timedelta(minutes=1))
        segment = make_event(
            "segment.changed",
            SegmentChanged(customer_id="acme", segment="loyal_passive", reason="r"),
            tenant_id=tenant,
            source="loyalty/metrics",
        )
        other = tier(tenant, "beta", "platinum", now)
        async with running_app(app_for(tenant)) as client:
            await post(client, "/v1/accounts/acme/earn", admin, {"points": 1})
            await post(client, "/v1/accounts/beta/earn", admin, {"points": 1})
            await send(raw_producer, CUSTOMERS, newest, older, segment, newest, other)

            async def tiers() -> dict[str, str] | None:
                found = {}
                for customer in ("acme", "beta"):
                    r = await client.get(f"/v1/customers/{customer}/rewards", headers={"X-API-Key": admin})
                    found[customer] = r.json()["tier"]
                # Each customer is on its own partition: wait for both.
                return found if None not in found.values() else None

            assert await eventually(tiers) == {"acme": "gold", "beta": "platinum"}


class TestRefundsAndPublishing:
    async def test_refund_gives_points_back_once_and_changes_are_published(
        self, raw_producer: AIOKafkaProducer, tenant: str
    ) -> None:
        admin = await create_api_key("ledger", tenant, ["admin"])
        refund_id = f"R-{uuid.uuid4().hex}"
        async with running_app(app_for(tenant)) as client:
            await client.put(
                "/v1/reward-settings", json={"point_value": "0.02", "currency": "EUR"}, headers={"X-API-Key": admin}
            )
            await post(client, "/v1/rewards", admin, {"reward_id": "d", "name": "D", "kind": "discount", "points": 400})
            await post(client, "/v1/accounts/acme/earn", admin, {"points": 1000})
            body = {"customer_id": "acme", "reward_id": "d", "purchase_order_id": "SO-7", "order_amount": "80.00"}
            order = await post(client, "/v1/redemptions", admin, body)
            assert Decimal(order["value"]) == Decimal("8.00")
            await post(client, f"/v1/redemptions/{order['order_id']}/confirm", admin)
            data = PurchaseRefunded(
                refund_id=refund_id, original_order_id="SO-7", customer_id="acme", currency="EUR", amount=Decimal("20")
            )
            refund = make_event("purchase.refunded", data, tenant_id=tenant, source="webshop")
            reused = make_event("purchase.refunded", data, tenant_id=tenant, source="webshop")  # another event id
            await send(raw_producer, PURCHASES, refund, refund, reused)

            async def available() -> int | None:
                r = await client.get("/v1/accounts/acme", headers={"X-API-Key": admin})
                value: int = r.json()["available"]
                return value if value != 600 else None

            assert await eventually(available) == 700  # a quarter of the order: 100 of the 400 points
            (letter,) = await dead_letters_for(refund_id.encode())
            assert f"refund_id {refund_id!r} was already processed" in letter.reason
            r = await client.get("/v1/accounts/acme", headers={"X-API-Key": admin})
            assert r.json()["available"] == 700

            def changes(records: list[Any]) -> list[str]:
                events = [decode_event(r.value) for r in records]
                return [e.data.change for e in events if e.tenantid == tenant and e.data.order_id == order["order_id"]]

            records = await read_topic(topic(REWARDS), until=lambda rs: len(changes(rs)) >= 3)
            assert changes(records) == ["reserved", "confirmed", "refunded"]
