"""The ledger consumes points commands from Kafka; a redelivered command is recorded once."""

from __future__ import annotations

import pytest
from aiokafka import AIOKafkaProducer

from ledger.app import create_app
from shared.topics import POINTS_COMMANDS
from tests.conftest import create_api_key, eventually, running_app, service_settings, topic
from tests.factories import earn

pytestmark = [pytest.mark.kafka, pytest.mark.db]


class TestCommandsConsumer:
    async def test_earn_command_is_received_once(self, raw_producer: AIOKafkaProducer, tenant: str) -> None:
        key = await create_api_key("ledger", tenant, ["points:read"])
        command = earn(tenant, "c-1", points=42)
        async with running_app(create_app(service_settings("ledger", consumer_group_suffix=f"-{tenant}"))) as client:
            for _ in range(2):  # the same event delivered twice
                await raw_producer.send_and_wait(topic(POINTS_COMMANDS), command.to_bytes(), key=command.key)
            path = f"/v1/commands/{command.data.command_id}"

            async def received() -> dict[str, object] | None:
                response = await client.get(path, headers={"X-API-Key": key})
                return response.json() if response.status_code == 200 else None

            body = await eventually(received)
        assert body["points"] == 42
        assert body["kind"] == "points.earn"
        assert body["event_id"] == command.id

    async def test_unknown_command_is_404_problem(self, tenant: str) -> None:
        key = await create_api_key("ledger", tenant, ["points:read"])
        async with running_app(create_app(service_settings("ledger", consumers_enabled=False))) as client:
            response = await client.get("/v1/commands/nope", headers={"X-API-Key": key})
        assert response.status_code == 404
        assert response.json()["error"] == "CommandNotFound"
