"""Metrics aggregates purchases per day and currency, each event once."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from aiokafka import AIOKafkaProducer

from metrics.app import create_app
from shared.topics import PURCHASES
from tests.conftest import create_api_key, eventually, running_app, service_settings, topic
from tests.factories import purchase

pytestmark = [pytest.mark.kafka, pytest.mark.db]


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

    async def test_reversed_period_is_a_clear_422(self, tenant: str) -> None:
        key = await create_api_key("metrics", tenant, ["metrics:read"])
        async with running_app(create_app(service_settings("metrics", consumers_enabled=False))) as client:
            response = await client.get(
                "/v1/kpis/daily-purchases?from=2026-03-14&to=2026-03-01", headers={"X-API-Key": key}
            )
        assert response.status_code == 422
        assert "after its end" in response.json()["detail"]
