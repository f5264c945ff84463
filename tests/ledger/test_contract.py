"""The ledger's input contract: every malformed parameter is a 422 problem (never a 500), request bodies
are bounded (413), and Kafka points commands are bounded like the REST writes (the DLQ takes the rest)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from ledger.app import create_app
from shared.events import MAX_POINTS
from shared.topics import POINTS_COMMANDS
from tests.conftest import create_api_key, dead_letters_for, eventually, running_app, service_settings, topic
from tests.factories import earn

pytestmark = [pytest.mark.db, pytest.mark.kafka]

MAX_REQUEST_BYTES = 16 * 1024


@pytest.fixture(scope="module")
async def client() -> AsyncIterator[httpx.AsyncClient]:
    settings = service_settings(
        "ledger", consumers_enabled=False, tasks_enabled=False, max_request_bytes=MAX_REQUEST_BYTES
    )
    async with running_app(create_app(settings)) as c:
        yield c


@pytest.fixture
async def admin(tenant: str, client: httpx.AsyncClient) -> dict[str, str]:
    key = await create_api_key("ledger", tenant, ["admin", "points:read", "points:write"])
    headers = {"X-API-Key": key}
    created = await client.post(
        "/v1/accounts/acme/earn", json={"points": 50}, headers={**headers, "Idempotency-Key": str(uuid.uuid4())}
    )
    assert created.status_code == 201, created.text
    return headers


MALFORMED_READS = [
    "/v1/accounts/acme/expiring?within=3000000d",
    "/v1/accounts/acme/expiring?within=99999999999999999999d",
    "/v1/accounts/acme/expiring?within=" + "9" * 5000 + "d",
    "/v1/accounts/acme/entries?cursor=99999999999999999999999",
    "/v1/accounts/acme/entries?cursor=" + "9" * 5000,
    "/v1/accounts/acme/entries?cursor=2147483648",
    "/v1/accounts/acme?as_of=0001-01-01T00:00:00%2B01:00",
    "/v1/accounts/acme?as_of=9999-12-31T23:59:59-01:00",
    "/v1/accounts/acme?as_of=0001-01-01T00:00:00Z",
    "/v1/accounts/acme/entries?since=0001-01-01T00:00:00%2B01:00",
    "/v1/accounts/acme/entries?until=9999-12-31T23:59:59.999999Z",
    "/v1/accounts/acme/entries?kind=a%00b",
    "/v1/adjustments?cursor=9999-12-31T23:59:59-01:00",
    "/v1/adjustments?account_id=a%00",
    "/v1/accounts?cursor=a%00b",
    "/v1/accounts?cursor=" + "x" * 5000,
    "/v1/accounts/acme%00x",
    "/v1/accounts/" + "x" * 201,
    "/v1/commands/a%00",
]


class TestParameters:
    @pytest.mark.parametrize("path", MALFORMED_READS, ids=lambda p: p[:60])
    async def test_a_malformed_read_parameter_is_a_422_problem(
        self, client: httpx.AsyncClient, admin: dict[str, str], path: str
    ) -> None:
        response = await client.get(path, headers=admin)
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == "application/problem+json"

    @pytest.mark.parametrize(
        ("path", "body"),
        [
            ("/v1/accounts/acme/earn", {"points": MAX_POINTS + 1}),
            ("/v1/accounts/acme/earn", {"points": 5, "matures_at": "9999-12-31T23:59:59-01:00"}),
            ("/v1/accounts/acme/earn", {"points": 5, "reason": "a\u0000b"}),
            ("/v1/accounts/acme/earn", {"points": 5, "member_id": "m\u0000"}),
            ("/v1/accounts/acme%00/earn", {"points": 5}),
            ("/v1/accounts/acme/holds", {"points": 1, "reference": "r\u0000"}),
            ("/v1/accounts/acme/adjustments", {"points": 5, "reason": "why\u0000"}),
            ("/v1/accounts/acme/transfers", {"to_account_id": "b\u0000", "points": 1}),
        ],
    )
    async def test_a_malformed_write_is_a_422_problem(
        self, client: httpx.AsyncClient, admin: dict[str, str], path: str, body: dict[str, Any]
    ) -> None:
        response = await client.post(path, json=body, headers={**admin, "Idempotency-Key": str(uuid.uuid4())})
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == "application/problem+json"

    async def test_the_edges_of_the_accepted_ranges_are_answered(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        for path in (
            "/v1/accounts/acme/expiring?within=999999d",
            "/v1/accounts/acme/entries?cursor=2147483647",
            "/v1/accounts/acme?as_of=1900-01-01T00:00:00Z",
            "/v1/accounts/acme?as_of=8999-12-31T23:59:59Z",
        ):
            response = await client.get(path, headers=admin)
            assert response.status_code == 200, (path, response.text)
        expiring = await client.get("/v1/accounts/acme/expiring?within=999999d", headers=admin)
        assert expiring.json()["points"] == 50

    async def test_a_body_over_the_limit_is_a_413_problem(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        body = {"points": 5, "reason": "x" * MAX_REQUEST_BYTES}
        response = await client.post(
            "/v1/accounts/acme/earn", json=body, headers={**admin, "Idempotency-Key": str(uuid.uuid4())}
        )
        assert response.status_code == 413
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["title"] == "Content Too Large"


class TestKafkaPoints:
    async def test_points_beyond_the_rest_bound_are_dead_lettered_and_the_next_command_applies(
        self, raw_producer: AIOKafkaProducer, tenant: str
    ) -> None:
        key = await create_api_key("ledger", tenant, ["points:read"])
        huge = earn(tenant, "c-1")
        raw = json.loads(huge.to_bytes())
        raw["data"]["points"] = MAX_POINTS + 1
        good = earn(tenant, "c-1", points=MAX_POINTS)
        settings = service_settings("ledger", consumer_group_suffix=f"-{tenant}", tasks_enabled=False)
        async with running_app(create_app(settings)) as client:
            for value, record_key in ((json.dumps(raw).encode(), huge.key), (good.to_bytes(), good.key)):
                await raw_producer.send(topic(POINTS_COMMANDS), value, key=record_key, partition=0)
            await raw_producer.flush()

            async def balance() -> dict[str, Any] | None:
                response = await client.get("/v1/accounts/c-1", headers={"X-API-Key": key})
                return response.json() if response.status_code == 200 else None

            body = await eventually(balance)
        [letter] = await dead_letters_for(huge.data.command_id.encode())
        assert "data.points" in letter.reason
        assert body["available"] == MAX_POINTS
