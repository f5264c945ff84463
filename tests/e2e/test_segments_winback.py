"""Through Kafka: the metrics service classifies a customer as at risk and publishes segment.changed from its
outbox; the rules service stores the segment; that customer's next purchase earns the win-back bonus that a
ruleset gives `customer.segment == 'at_risk'`, and a loyal customer's purchase does not."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from metrics.app import create_app as metrics_app
from metrics.service import segment_service
from rules.app import create_app as rules_app
from shared.db import create_sessionmaker, transaction
from shared.events import utcnow
from tests.conftest import NAMESPACE, create_api_key, eventually, running_app, service_settings
from tests.metrics.helpers import add_customer, metrics_engine
from tests.rules.helpers import commands, earned, install, send
from tests.rules.samples import BASE, doc, line, order

pytestmark = [pytest.mark.kafka, pytest.mark.db]

WIN_BACK = 500


async def segment_in_rules(client: httpx.AsyncClient, key: str, customer: str) -> str | None:
    response = await client.get(f"/v1/customers/{customer}/state", headers={"X-API-Key": key})
    segment: str | None = response.json().get("segment") if response.status_code == 200 else None
    return segment


async def test_an_at_risk_customer_earns_the_win_back_bonus(
    kafka_topics: list[str], raw_producer: AIOKafkaProducer, tenant: str
) -> None:
    suffix = f"-winback-{uuid.uuid4().hex[:6]}"
    now = utcnow()
    rules_settings = service_settings("rules", consumer_group_suffix=suffix, outbox_sweep_seconds=0.3)
    metrics_settings = service_settings(
        "metrics", consumer_group_suffix=suffix, outbox_poll_seconds=0.2, segments_first_run_seconds=3600
    )
    rules_key = await create_api_key("rules", tenant, ["rules:admin", "points:read"])
    async with (
        metrics_engine() as engine,
        running_app(metrics_app(metrics_settings)),
        running_app(rules_app(rules_settings)) as rules,
    ):
        await install(
            rules,
            rules_key,
            doc(BASE, {"id": "win-back", "kind": "bonus", "points": WIN_BACK, "when": "customer.segment == 'at_risk'"}),
        )
        # Gaps of 100, 10 and 10 days (median 10): 180 days since the last purchase is far below the rhythm.
        await add_customer(engine, tenant, "fading", [300, 200, 190, 180], now=now)
        await add_customer(engine, tenant, "steady", [95, 65, 35, 5], now=now)  # every 30 days, 5 days ago
        async with transaction(create_sessionmaker(engine)) as session:
            changed = await segment_service.reclassify(
                session, tenant, ["fading", "steady"], now=now, namespace=NAMESPACE
            )
        assert changed == 2
        # The metrics relay publishes both; the rules' consumer keeps them.
        assert await eventually(lambda: segment_in_rules(rules, rules_key, "fading")) == "at_risk"
        assert await eventually(lambda: segment_in_rules(rules, rules_key, "steady")) == "loyal_passive"
        purchases = [order(tenant, c, [line("A", "tools", "1", "20")], at=now) for c in ("fading", "steady")]
        await send(raw_producer, *purchases)
        found = await commands(tenant, lambda cs: len(earned(cs)) >= 2)

    def breakdown(customer: str) -> list[tuple[str, int]]:
        [earn] = earned(found, customer)
        rules_fired: list[Any] = earn.breakdown
        return [(a.rule_id, a.points) for a in rules_fired]

    assert breakdown("fading") == [("base", 20), ("win-back", WIN_BACK)]
    assert breakdown("steady") == [("base", 20)]
