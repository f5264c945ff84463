"""Issue 10, findings 6 and 7, through the real broker and REST: a condition that fails at run time is
not met (the purchase still earns its base points, nothing is dead-lettered, simulate answers 200 with
the reason), and ruleset documents or conditions over the limits are refused with a problem (422)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from rules.app import create_app
from shared.topics import DLQ
from tests.conftest import create_api_key, read_topic, running_app, service_settings, topic
from tests.rules.helpers import commands, earned, install, send
from tests.rules.samples import ALIAS_BOMB, BASE, NESTED_COMPREHENSIONS, doc, line, order

pytestmark = [pytest.mark.kafka, pytest.mark.db]

# Division by zero on a first purchase, and a line condition that overflows on line B.
RISKY = doc(
    BASE,
    {"id": "risky", "kind": "bonus", "points": 40, "when": "event.line_count / customer.purchase_count > 0"},
    {
        "id": "bulk",
        "kind": "line_multiplier",
        "multiplier": "2",
        "line_when": "line.sku == 'A' || int(line.quantity) + 9223372036854775807 > 0",
    },
)


@pytest.fixture(scope="module")
async def client(kafka_topics: list[str]) -> AsyncIterator[httpx.AsyncClient]:
    settings = service_settings(
        "rules",
        consumer_group_suffix=f"-conditions-{uuid.uuid4().hex[:6]}",
        outbox_sweep_seconds=0.3,
        outbox_sweep_after_seconds=0.2,
    )
    async with running_app(create_app(settings)) as c:
        yield c


@pytest.fixture
async def admin(tenant: str) -> dict[str, str]:
    return {"X-API-Key": await create_api_key("rules", tenant, ["rules:admin", "events:write", "points:read"])}


async def dead_letters_now(marker: bytes, *, read_for_s: float = 2.0) -> list[Any]:
    """The DLQ records holding `marker` that a reader finds within `read_for_s` seconds (to show absence)."""
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + read_for_s
    records = await read_topic(topic(DLQ), until=lambda rs: loop.time() > stop_at)
    return [r for r in records if r.value is not None and marker in r.value]


class TestRuntimeErrors:
    async def test_a_failing_condition_still_earns_the_base_points(
        self, client: httpx.AsyncClient, admin: dict[str, str], tenant: str, raw_producer: AIOKafkaProducer
    ) -> None:
        await install(client, admin["X-API-Key"], RISKY)
        event = order(tenant, "c1", [line("A", "x", "2", "10"), line("B", "y", "1", "5")])
        await send(raw_producer, event)
        [earn] = earned(await commands(tenant, lambda cs: len(earned(cs)) >= 1))
        # base 25; risky: 1 / 0, not met; bulk: line A only (B overflows), 20 * (2 - 1)
        assert earn.points == 45
        assert [(a.rule_id, a.points) for a in earn.breakdown] == [("base", 25), ("bulk", 20)]
        bulk = earn.breakdown[1].explanation
        assert "line 'B' not matched" in bulk
        assert "OverflowError" in bulk
        assert earn.source_event_id == event.id
        assert await dead_letters_now(event.data.order_id.encode()) == []

    async def test_simulate_answers_with_the_reason(
        self, client: httpx.AsyncClient, admin: dict[str, str], tenant: str
    ) -> None:
        await install(client, admin["X-API-Key"], RISKY)
        event = json.loads(order(tenant, "nobody", [line("A", "x", "2", "10"), line("B", "y", "1", "5")]).to_bytes())
        response = await client.post("/v1/simulate", json={"event": event}, headers=admin)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["total_points"] == 45
        rules = {r["rule_id"]: r for r in body["rules"]}
        assert (rules["risky"]["fired"], rules["risky"]["points"]) == (False, 0)
        assert "ZeroDivisionError" in rules["risky"]["explanation"]
        assert "counts as not met" in rules["risky"]["explanation"]
        assert "OverflowError" in rules["bulk"]["explanation"]


class TestRefusedDocuments:
    @pytest.mark.parametrize(
        ("body", "message"),
        [
            ({"yaml": ALIAS_BOMB}, "anchors and aliases"),
            ({"yaml": "description: " + "[" * 50 + "]" * 50 + "\n"}, "nested deeper than"),
            ({"document": doc(BASE, description=[[[[[[[[[[[[[[[[[["x"]]]]]]]]]]]]]]]]]])}, "nested deeper than"),
            (
                {"document": doc(BASE, {"id": "n", "kind": "bonus", "points": 1, "when": NESTED_COMPREHENSIONS})},
                "nested comprehensions",
            ),
        ],
    )
    async def test_create_answers_422_with_the_problem(
        self, client: httpx.AsyncClient, admin: dict[str, str], body: dict[str, Any], message: str
    ) -> None:
        response = await client.post("/v1/rulesets/main/versions", json=body, headers=admin)
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["error"] == "RulesetValidationFailed"
        assert message in problem["errors"][0]["message"]
        checked = await client.post("/v1/rulesets/validate", json=body, headers=admin)
        assert checked.status_code == 200
        assert checked.json()["valid"] is False
        assert message in checked.json()["errors"][0]["message"]
        listing = await client.get("/v1/rulesets", headers=admin)
        assert listing.json()["versions"] == [], "nothing is stored"
