"""Metrics aggregates purchases per day and currency, each event once."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from metrics.app import create_app
from shared.events import CloudEvent, make_event
from shared.topics import PURCHASES
from tests.conftest import create_api_key, dead_letters_for, eventually, running_app, service_settings, topic
from tests.factories import purchase

pytestmark = [pytest.mark.kafka, pytest.mark.db]


def with_id(event: CloudEvent[Any], event_id: str) -> CloudEvent[Any]:
    return make_event(event.type, event.data, tenant_id=event.tenantid, source=event.source, event_id=event_id)


class TestDailyPurchases:
    async def test_purchases_are_aggregated_once(self, raw_producer: AIOKafkaProducer, tenant: str) -> None:
        key = await create_api_key("metrics", tenant, ["metrics:read"])
        day = datetime(2026, 3, 14, 10, 0, tzinfo=UTC)
        events = [
            purchase(tenant, "c-1", net="10.10", ordered_at=day),
            purchase(tenant, "c-2", net="5.05", ordered_at=day),
            purchase(tenant, "c-3", net="7.00", currency="USD", ordered_at=day),
        ]
        settings = service_settings("metrics", consumer_group_suffix=f"-{tenant}")
        async with running_app(create_app(settings)) as client:
            for event in [*events, events[0]]:  # the first one redelivered
                await raw_producer.send_and_wait(topic(PURCHASES), event.to_bytes(), key=event.key)

            async def totals() -> dict[str, object] | None:
                response = await client.get(
                    "/v1/kpis/daily-purchases?from=2026-03-14&to=2026-03-14", headers={"X-API-Key": key}
                )
                body = response.json()
                return body if body.get("total_orders") == 3 else None

            body = await eventually(totals)
        eur = next(i for i in body["items"] if i["currency"] == "EUR")
        assert eur["orders"] == 2
        assert Decimal(eur["net_revenue"]) == Decimal("15.15")

    async def test_one_event_id_from_two_tenants_counts_for_both_and_an_order_counts_once(
        self, raw_producer: AIOKafkaProducer, tenant: str
    ) -> None:
        other = f"{tenant}-b"
        keys = {t: await create_api_key("metrics", t, ["metrics:read"]) for t in (tenant, other)}
        day = datetime(2026, 3, 15, 10, 0, tzinfo=UTC)
        shared, later = f"e-{uuid.uuid4().hex[:8]}", f"l-{uuid.uuid4().hex[:8]}"
        first = purchase(tenant, "c-1", net="10.00", ordered_at=day)
        # One event id for both tenants: sent together (one batch, as far as the broker allows) ...
        together = [with_id(first, shared), with_id(purchase(other, "c-1", net="20.00", ordered_at=day), shared)]
        # ... and across batches, the second tenant's after the first's was counted.
        mine_later = with_id(purchase(tenant, "c-2", net="1.00", ordered_at=day), later)
        theirs_later = with_id(purchase(other, "c-2", net="2.00", ordered_at=day), later)
        # The first tenant's order again under a new event id: counted once (dead-lettered with a reason).
        resent = with_id(first, f"r-{uuid.uuid4().hex[:8]}")
        settings = service_settings("metrics", consumer_group_suffix=f"-{tenant}")
        async with running_app(create_app(settings)) as client:

            async def totals(t: str, orders: int) -> dict[str, Any] | None:
                response = await client.get(
                    "/v1/kpis/daily-purchases?from=2026-03-15&to=2026-03-15", headers={"X-API-Key": keys[t]}
                )
                body: dict[str, Any] = response.json()
                return body if body.get("total_orders") == orders else None

            for event in together:
                await raw_producer.send(topic(PURCHASES), event.to_bytes(), key=event.key)
            await raw_producer.flush()
            await eventually(lambda: totals(tenant, 1))
            await eventually(lambda: totals(other, 1))
            for event in (mine_later, resent):
                await raw_producer.send_and_wait(topic(PURCHASES), event.to_bytes(), key=event.key)
            await eventually(lambda: totals(tenant, 2))
            await raw_producer.send_and_wait(topic(PURCHASES), theirs_later.to_bytes(), key=theirs_later.key)
            theirs = await eventually(lambda: totals(other, 2))
            [letter] = await dead_letters_for(resent.id.encode())
            mine = await eventually(lambda: totals(tenant, 2))  # the resent order's batch has committed
        assert letter.reason == f"order_id {first.data.order_id!r} was already processed under another event id"
        assert [Decimal(i["net_revenue"]) for i in mine["items"]] == [Decimal("11.00")]
        assert [Decimal(i["net_revenue"]) for i in theirs["items"]] == [Decimal("22.00")]

    async def test_reversed_period_is_a_clear_422(self, tenant: str) -> None:
        key = await create_api_key("metrics", tenant, ["metrics:read"])
        async with running_app(create_app(service_settings("metrics", consumers_enabled=False))) as client:
            response = await client.get(
                "/v1/kpis/daily-purchases?from=2026-03-14&to=2026-03-01", headers={"X-API-Key": key}
            )
        assert response.status_code == 422
        assert "after its end" in response.json()["detail"]
