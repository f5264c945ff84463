"""The input contract at the rules service's two edges: Kafka (the consumer runner dead-letters a message
that breaks it, with the reason, and goes on) and REST ingest (which refuses the same events with 422, or
413 for size, so that 202 means the consumer will take the event)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from rules.app import create_app
from rules.config import Settings
from shared.events import CloudEvent, utcnow
from shared.topics import PURCHASES
from tests.conftest import create_api_key, dead_letters_for, running_app, service_settings, topic
from tests.rules.helpers import commands, earned, install
from tests.rules.samples import BASE, doc, line, order

pytestmark = [pytest.mark.kafka, pytest.mark.db]

SCOPES = ["rules:admin", "points:read", "events:write"]
MAX_EVENT_BYTES = 4000
MAX_REQUEST_BYTES = 64 * 1024


@pytest.fixture(scope="module")
async def client(kafka_topics: list[str]) -> AsyncIterator[httpx.AsyncClient]:
    settings = service_settings(
        "rules",
        consumer_group_suffix=f"-contract-{uuid.uuid4().hex[:6]}",
        max_event_bytes=MAX_EVENT_BYTES,
        max_request_bytes=MAX_REQUEST_BYTES,
    )
    async with running_app(create_app(settings)) as c:
        yield c


@pytest.fixture
async def key(tenant: str) -> str:
    return await create_api_key("rules", tenant, SCOPES)


def recent(tenant: str, customer: str, amount: str, *, at: datetime | None = None) -> CloudEvent[Any]:
    return order(tenant, customer, [line("A", "x", "1", amount)], at=at or utcnow() - timedelta(minutes=1))


def as_json(event: CloudEvent[Any], **data: Any) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(event.to_bytes())
    body["data"].update(data)
    return body


class TestKafka:
    async def test_each_breach_is_dead_lettered_with_its_reason_and_the_event_behind_is_applied(
        self, client: httpx.AsyncClient, key: str, tenant: str, raw_producer: AIOKafkaProducer
    ) -> None:
        await install(client, key, doc(BASE))
        now = utcnow()
        wrong_key = recent(tenant, "c1", "3")
        in_an_hour = recent(tenant, "c1", "4", at=now + timedelta(hours=1))
        dated_2999 = recent(tenant, "c1", "5", at=datetime(2999, 1, 1, tzinfo=UTC))
        ordered_2999 = recent(tenant, "c1", "6")
        ordered_2999 = ordered_2999.model_copy(
            update={"data": ordered_2999.data.model_copy(update={"ordered_at": datetime(2999, 1, 1, tzinfo=UTC)})}
        )
        negative = recent(tenant, "c1", "7")
        huge = recent(tenant, "c1", "8")
        good = recent(tenant, "c1", "9")
        records: list[tuple[CloudEvent[Any], bytes, bytes]] = [
            (wrong_key, wrong_key.to_bytes(), f"{tenant}:someone-else".encode()),
            (in_an_hour, in_an_hour.to_bytes(), in_an_hour.key),
            (dated_2999, dated_2999.to_bytes(), dated_2999.key),
            (ordered_2999, ordered_2999.to_bytes(), ordered_2999.key),
            (negative, json.dumps(as_json(negative, net_amount="-7")).encode(), negative.key),
            # 1e400 as a JSON number, as a hostile producer writes it (json.dumps would write Infinity)
            (huge, huge.to_bytes().replace(b'"net_amount":"8"', b'"net_amount":1e400'), huge.key),
            (good, good.to_bytes(), good.key),
        ]
        assert b"1e400" in records[5][1]
        # One partition: every bad message lies before the good one in the order the consumer reads them.
        for _, value, record_key in records:
            await raw_producer.send(topic(PURCHASES), value, key=record_key, partition=0)
        await raw_producer.flush()

        [earn] = earned(await commands(tenant, lambda cs: len(cs) >= 1))
        assert (earn.source_event_id, earn.points) == (good.id, 9)
        letters = await dead_letters_for(tenant.encode(), count=6)
        reasons = {json.loads(letter.value or b"{}")["id"]: letter.reason for letter in letters}
        assert reasons[wrong_key.id] == "message key does not match the event's tenantid:subject"
        assert "is more than 300s in the future" in reasons[in_an_hour.id]
        assert reasons[dated_2999.id].startswith("event time 2999-01-01T00:00:00+00:00 is more than 300s")
        assert reasons[ordered_2999.id].startswith("data.ordered_at 2999-01-01T00:00:00+00:00 is more than")
        assert "data.net_amount" in reasons[negative.id]
        assert "data.net_amount" in reasons[huge.id]
        assert good.id not in reasons


class TestRestIngest:
    async def test_what_the_consumer_refuses_is_a_422_naming_the_reason(
        self, client: httpx.AsyncClient, key: str, tenant: str
    ) -> None:
        headers = {"X-API-Key": key}
        now = utcnow()
        cases: list[tuple[dict[str, Any], str]] = [
            (json.loads(recent(tenant, "c", "1", at=now + timedelta(hours=1)).to_bytes()), "in the future"),
            (json.loads(recent(tenant, "c", "1", at=datetime(2999, 1, 1, tzinfo=UTC)).to_bytes()), "in the future"),
            (as_json(recent(tenant, "c", "1"), ordered_at="2999-01-01T00:00:00Z"), "data.ordered_at 2999-01-01"),
            (as_json(recent(tenant, "c", "1"), net_amount="-1"), "data.net_amount"),
            (as_json(recent(tenant, "c", "1"), net_amount="1e400"), "data.net_amount"),
            (dict(as_json(recent(tenant, "c", "1")), time="0001-01-01T00:00:00+01:00"), "timestamp must lie from"),
        ]
        for body, reason in cases:
            response = await client.post("/v1/events", json=body, headers=headers)
            assert response.status_code == 422, (reason, response.text)
            assert response.headers["content-type"] == "application/problem+json"
            assert reason in response.json()["detail"], response.text

    async def test_a_number_too_large_for_a_float_is_a_422(
        self, client: httpx.AsyncClient, key: str, tenant: str
    ) -> None:
        raw = recent(tenant, "c", "1").to_bytes().replace(b'"net_amount":"1"', b'"net_amount":1e400')
        headers = {"X-API-Key": key, "content-type": "application/json"}
        response = await client.post("/v1/events", content=raw, headers=headers)
        assert response.status_code == 422, response.text
        assert "data.net_amount" in response.json()["detail"]

    async def test_a_batch_names_the_refused_event(self, client: httpx.AsyncClient, key: str, tenant: str) -> None:
        good = json.loads(recent(tenant, "c", "1").to_bytes())
        future = json.loads(recent(tenant, "c", "1", at=utcnow() + timedelta(days=1)).to_bytes())
        response = await client.post("/v1/events/batch", json={"events": [good, future]}, headers={"X-API-Key": key})
        assert response.status_code == 422
        assert response.json()["detail"].startswith("event [1]: event time ")

    async def test_an_event_the_consumer_would_find_too_large_is_a_413(
        self, client: httpx.AsyncClient, key: str, tenant: str
    ) -> None:
        lines = [line(f"SKU-{i:04}", "tools", "1", "1") for i in range(60)]
        big = order(tenant, "c", lines, at=utcnow() - timedelta(minutes=1))
        assert MAX_EVENT_BYTES < len(big.to_bytes()) < MAX_REQUEST_BYTES
        response = await client.post("/v1/events", json=json.loads(big.to_bytes()), headers={"X-API-Key": key})
        assert response.status_code == 413, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert f"more than the {MAX_EVENT_BYTES} a message may carry" in response.json()["detail"]

    async def test_a_body_over_the_request_limit_is_a_413(
        self, client: httpx.AsyncClient, key: str, tenant: str
    ) -> None:
        one = json.loads(recent(tenant, "c", "1").to_bytes())
        events = [dict(one, id=str(uuid.uuid4())) for _ in range(200)]
        assert len(json.dumps({"events": events})) > MAX_REQUEST_BYTES
        response = await client.post("/v1/events/batch", json={"events": events}, headers={"X-API-Key": key})
        assert response.status_code == 413
        assert response.json()["title"] == "Content Too Large"

    async def test_an_event_meeting_the_contract_is_accepted(
        self, client: httpx.AsyncClient, key: str, tenant: str
    ) -> None:
        within_skew = json.loads(recent(tenant, "c", "1", at=utcnow() + timedelta(minutes=2)).to_bytes())
        years_ago = json.loads(recent(tenant, "c", "1", at=datetime(2011, 5, 1, tzinfo=UTC)).to_bytes())
        response = await client.post(
            "/v1/events/batch", json={"events": [within_skew, years_ago]}, headers={"X-API-Key": key}
        )
        assert response.status_code == 202, response.text


def test_the_default_request_limit_takes_a_full_batch() -> None:
    lines = [line(f"SKU-{i}", "tools", "2", "19.99") for i in range(3)]
    one = order("a-tenant-id", "customer-00001", lines)
    batch = json.dumps({"events": [json.loads(one.to_bytes())] * 1000}).encode()
    assert len(batch) * 2 < Settings().max_request_bytes
