"""The ledger consumes points commands from the real Kafka broker: earn and clawback post once, bad
commands are dead-lettered with a reason, and a command whose effect committed before the offset did
is not posted again when it is redelivered."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from sqlalchemy.ext.asyncio import async_sessionmaker

from ledger.app import create_app
from ledger.service import ledger_service
from shared.db import AsyncSession, transaction
from shared.events import ClawbackPoints, CloudEvent, make_event
from shared.topics import POINTS_COMMANDS
from tests.conftest import (
    create_api_key,
    dead_letters_for,
    eventually,
    running_app,
    service_settings,
    topic,
)
from tests.factories import earn
from tests.ledger.conftest import check_books, inbound

pytestmark = [pytest.mark.kafka, pytest.mark.db]


def clawback(tenant: str, original: CloudEvent[Any], points: int, **overrides: Any) -> CloudEvent[Any]:
    fields: dict[str, Any] = {
        "command_id": f"cb-{uuid.uuid4().hex[:12]}",
        "customer_id": original.data.customer_id,
        "original_command_id": original.data.command_id,
        "points": points,
        "source_event_id": f"refund-{uuid.uuid4().hex[:8]}",
    }
    fields.update(overrides)
    return make_event("points.clawback", ClawbackPoints(**fields), tenant_id=tenant, source="tests")


async def send(producer: AIOKafkaProducer, *events: CloudEvent[Any]) -> None:
    for event in events:
        await producer.send_and_wait(topic(POINTS_COMMANDS), event.to_bytes(), key=event.key)


def app_for(tenant: str) -> Any:
    # A consumer group per test, so each test reads the topic from the start without the others' offsets.
    return create_app(service_settings("ledger", consumer_group_suffix=f"-{tenant}", tasks_enabled=False))


async def wait_for_balance(client: httpx.AsyncClient, key: str, account: str, check: Any) -> dict[str, Any]:
    async def current() -> dict[str, Any] | None:
        response = await client.get(f"/v1/accounts/{account}", headers={"X-API-Key": key})
        body: dict[str, Any] | None = response.json() if response.status_code == 200 else None
        return body if body is not None and check(body) else None

    result: dict[str, Any] = await eventually(current)
    return result


class TestCommandsConsumer:
    async def test_earn_then_clawback_each_post_once(self, raw_producer: AIOKafkaProducer, tenant: str) -> None:
        key = await create_api_key("ledger", tenant, ["points:read"])
        command = earn(tenant, "c-1", points=42, member_id="buyer-7", ruleset_id="rs-1", ruleset_version=3)
        # The same command twice, the second time in a new envelope (a producer retry upstream).
        duplicate = command.model_copy(update={"id": str(uuid.uuid4())})
        back = clawback(tenant, command, 12)
        sentinel = earn(tenant, "c-1", points=1)
        async with running_app(app_for(tenant)) as client:
            await send(raw_producer, command, duplicate, back, back, sentinel)
            body = await wait_for_balance(client, key, "c-1", lambda b: b["lifetime_earned"] == 43)
            entries = (await client.get("/v1/accounts/c-1/entries", headers={"X-API-Key": key})).json()["items"]
            applied = await client.get(f"/v1/commands/{command.data.command_id}", headers={"X-API-Key": key})
            unknown = await client.get("/v1/commands/never-sent", headers={"X-API-Key": key})
        assert applied.json()["kind"] == "points.earn"
        assert unknown.status_code == 404
        assert unknown.json()["error"] == "CommandNotFound"
        assert body["available"] == 42 - 12 + 1
        assert [e["kind"] for e in entries] == ["earn", "clawback", "earn"]
        earned = entries[2]
        assert (earned["member_id"], earned["ruleset_id"], earned["ruleset_version"]) == ("buyer-7", "rs-1", 3)
        assert earned["source"] == f"command:{command.data.command_id}"
        assert entries[1]["reference_id"] == command.data.command_id

    async def test_bad_commands_are_dead_lettered_with_a_reason(
        self, raw_producer: AIOKafkaProducer, tenant: str
    ) -> None:
        key = await create_api_key("ledger", tenant, ["points:read"])
        marker = uuid.uuid4().hex
        orphan = clawback(tenant, earn(tenant, "c-2", command_id=f"never-{marker}"), 5, reason=f"orphan {marker}")
        system = earn(tenant, "system:issuance", points=5, reason=f"system {marker}")
        good = earn(tenant, "c-2", points=7)
        # More than the earn gave: refused whole, not clamped (the earn's 7 points stay).
        over = clawback(tenant, good, 8, reason=f"over {marker}")
        async with running_app(app_for(tenant)) as client:
            await send(raw_producer, orphan, system, good, over)
            await wait_for_balance(client, key, "c-2", lambda b: b["available"] == 7)
            letters = await dead_letters_for(marker.encode(), count=3)
        reasons = sorted(letter.reason for letter in letters)
        assert reasons[0] == (
            f"ClawbackExceedsEarn: cannot claw back 8 points of earn {good.data.command_id!r}: it gave 7, "
            "0 were clawed back already, 7 are left"
        )
        assert reasons[1].startswith("OriginalEarnNotFound")
        assert "system account" in reasons[2]
        assert {letter.code for letter in letters} == {"refused"}

    async def test_redelivery_after_commit_before_offset_does_not_post_twice(
        self, raw_producer: AIOKafkaProducer, tenant: str, db: async_sessionmaker[AsyncSession]
    ) -> None:
        key = await create_api_key("ledger", tenant, ["points:read"])
        command = earn(tenant, "c-3", points=100)
        # The effect commits (as if the consumer then crashed before committing its offset) ...
        async with transaction(db) as session:
            assert await ledger_service.handle_commands(session, [inbound(command)]) == []
        # ... and the broker redelivers the command to the restarted service.
        sentinel = earn(tenant, "c-3", points=1)
        async with running_app(app_for(tenant)) as client:
            await send(raw_producer, command, sentinel)
            body = await wait_for_balance(client, key, "c-3", lambda b: b["lifetime_earned"] >= 101)
        assert body["available"] == 101
        await check_books(db, tenant)
