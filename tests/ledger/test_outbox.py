"""The ledger's outbox through the shared relay, on the real broker and PostgreSQL: a row whose event cannot
be built is quarantined and never holds back the entries of other tenants behind it; /readyz fails while the
oldest row waits longer than the threshold; the longest Idempotency-Key and command id the ledger accepts
end up in entries that are published, one character more is refused."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any, cast

import httpx
import pytest
from aiokafka import AIOKafkaProducer, ConsumerRecord
from prometheus_client import REGISTRY
from sqlalchemy import CursorResult, insert, select, text, update
from sqlalchemy.ext.asyncio import async_sessionmaker

from ledger.app import create_app
from ledger.models import Entry, Outbox, outbox_quarantine
from ledger.tasks import outbox_relay
from shared.db import AsyncSession, create_engine, create_sessionmaker, transaction
from shared.events import utcnow
from shared.kafka import EventProducer
from shared.topics import LEDGER_ENTRIES, POINTS_COMMANDS
from tests.conftest import (
    KAFKA,
    create_api_key,
    dead_letters_for,
    eventually,
    read_topic,
    running_app,
    service_settings,
    topic,
)
from tests.factories import earn

pytestmark = [pytest.mark.kafka, pytest.mark.db]


def settings(**overrides: Any) -> Any:
    values: dict[str, Any] = {"consumers_enabled": False, "tasks_enabled": False, **overrides}
    return service_settings("ledger", **values)


async def published(tenant: str, count: int) -> list[dict[str, Any]]:
    def mine(records: list[ConsumerRecord[bytes, bytes]]) -> list[dict[str, Any]]:
        events = [json.loads(r.value or b"{}") for r in records]
        return [e for e in events if e.get("tenantid") == tenant]

    return mine(await read_topic(topic(LEDGER_ENTRIES), until=lambda rs: len(mine(rs)) >= count))


async def earn_over_rest(client: httpx.AsyncClient, key: str, idempotency_key: str) -> httpx.Response:
    return await client.post(
        "/v1/accounts/acme/earn",
        json={"points": 5},
        headers={"X-API-Key": key, "Idempotency-Key": idempotency_key},
    )


async def quarantined(db: async_sessionmaker[AsyncSession], ids: list[int]) -> dict[int, Any]:
    async with db() as session:
        rows = (await session.execute(select(outbox_quarantine).where(outbox_quarantine.c.id.in_(ids)))).all()
    return {row.id: row for row in rows}


async def relay_everything(app_settings: Any) -> None:
    producer = EventProducer(KAFKA, client_id="outbox-test")
    await producer.start()
    engine = create_engine(app_settings.database_url, pool_size=2)
    try:
        relay = outbox_relay(app_settings, create_sessionmaker(engine), producer)
        while await relay.relay_once():
            pass
    finally:
        await engine.dispose()
        await producer.stop()


def _quarantined_count(reason: str) -> float:
    return REGISTRY.get_sample_value("outbox_quarantined_total", {"service": "ledger", "reason": reason}) or 0.0


class TestQuarantine:
    async def test_rows_that_cannot_be_published_are_moved_aside_and_the_others_relayed(
        self, tenant: str, db: async_sessionmaker[AsyncSession]
    ) -> None:
        # Ahead of the tenant's entries: a row naming no entry, and a row whose entry cannot become an event
        # (a tenant id the envelope refuses), written straight into the tables as a bug or an old version might.
        broken_tenant = f"Not A Tenant {uuid.uuid4().hex[:6]}"
        invalid_entry = uuid.uuid4()
        async with transaction(db) as session:
            await session.execute(
                text(
                    """insert into ledger.entries (entry_id, transaction_id, tenant_id, account_id, seq, bucket, kind,
                       points, balance_after, source, created_at, prev_hash, hash)
                       values (:id, :txn, :tenant, 'acme', 1, 'available', 'earn', 1, 1, 'test', now(), :h, :h)"""
                ),
                {"id": invalid_entry, "txn": uuid.uuid4(), "tenant": broken_tenant, "h": "0" * 64},
            )
            missing = (
                await session.execute(insert(Outbox).values(entry_id=uuid.uuid4()).returning(Outbox.id))
            ).scalar_one()
            invalid = (
                await session.execute(insert(Outbox).values(entry_id=invalid_entry).returning(Outbox.id))
            ).scalar_one()
        before = _quarantined_count("invalid")
        admin = await create_api_key("ledger", tenant, ["admin"])
        async with running_app(create_app(settings())) as client:
            assert (await earn_over_rest(client, admin, str(uuid.uuid4()))).status_code == 201
            events = await published(tenant, 2)

            async def moved() -> dict[int, Any]:
                found = await quarantined(db, [missing, invalid])
                return found if len(found) == 2 else {}

            found = await eventually(moved, timeout_s=10)
        assert {e["data"]["kind"] for e in events} == {"earn"}
        assert found[missing].reason == found[invalid].reason == "invalid"
        assert "does not exist" in found[missing].detail
        assert "tenantid" in found[invalid].detail
        assert found[invalid].reference == str(invalid_entry)
        assert found[invalid].topic == topic(LEDGER_ENTRIES)
        assert _quarantined_count("invalid") - before == 2
        async with db() as session:
            left = (await session.execute(select(Outbox.id).where(Outbox.id.in_([missing, invalid])))).all()
        assert left == [], "quarantined rows leave the outbox"


class TestReadiness:
    async def test_readyz_fails_while_the_oldest_row_is_older_than_the_threshold(
        self, tenant: str, db: async_sessionmaker[AsyncSession]
    ) -> None:
        admin = await create_api_key("ledger", tenant, ["admin"])
        app_settings = settings(outbox_relay_enabled=False, outbox_max_age_seconds=30)
        await relay_everything(app_settings)  # the oldest row (by id) will be this test's
        async with running_app(create_app(app_settings)) as client:
            assert (await earn_over_rest(client, admin, str(uuid.uuid4()))).status_code == 201
            async with transaction(db) as session:
                entry_ids = select(Entry.entry_id).where(Entry.tenant_id == tenant).scalar_subquery()
                aged = await session.execute(
                    update(Outbox)
                    .where(Outbox.entry_id.in_(entry_ids))
                    .values(created_at=utcnow() - timedelta(hours=1))
                )
            assert cast(CursorResult[Any], aged).rowcount == 2
            stalled = await client.get("/readyz")
            assert stalled.status_code == 503
            assert stalled.headers["content-type"] == "application/problem+json"
            assert "oldest unpublished row is" in stalled.json()["checks"]["outbox"]
            age = REGISTRY.get_sample_value("outbox_oldest_age_seconds", {"service": "ledger"})
            assert (age or 0) >= 3600
            await relay_everything(app_settings)
            ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["outbox"] == "ok"
        assert len(await published(tenant, 2)) >= 2


class TestLengthLimits:
    async def test_the_longest_idempotency_key_is_accepted_and_its_entries_published(self, tenant: str) -> None:
        admin = await create_api_key("ledger", tenant, ["admin"])
        longest = f"k{uuid.uuid4().hex}".ljust(200, "x")
        async with running_app(create_app(settings())) as client:
            accepted = await earn_over_rest(client, admin, longest)
            refused = await earn_over_rest(client, admin, longest + "x")
            events = await published(tenant, 2)
        assert accepted.status_code == 201, accepted.text
        assert refused.status_code == 422
        assert refused.headers["content-type"] == "application/problem+json"
        assert {e["data"]["source"] for e in events} == {f"request:{longest}"}

    async def test_an_account_id_longer_than_an_identifier_is_refused(self, tenant: str) -> None:
        admin = await create_api_key("ledger", tenant, ["admin"])
        async with running_app(create_app(settings())) as client:
            refused = await client.post(
                f"/v1/accounts/{'a' * 201}/earn",
                json={"points": 5},
                headers={"X-API-Key": admin, "Idempotency-Key": str(uuid.uuid4())},
            )
            accepted = await client.post(
                f"/v1/accounts/{'a' * 200}/earn",
                json={"points": 5},
                headers={"X-API-Key": admin, "Idempotency-Key": str(uuid.uuid4())},
            )
            events = await published(tenant, 2)
        assert refused.status_code == 422
        assert refused.headers["content-type"] == "application/problem+json"
        assert accepted.status_code == 201, accepted.text
        assert "a" * 200 in {e["data"]["account_id"] for e in events}

    async def test_the_longest_command_id_is_applied_and_published_and_a_longer_one_dead_lettered(
        self, tenant: str, raw_producer: AIOKafkaProducer
    ) -> None:
        marker = uuid.uuid4().hex
        longest = f"cmd-{marker}".ljust(200, "x")
        command = earn(tenant, "c-1", points=7, command_id=longest)
        too_long = command.to_bytes().replace(longest.encode(), (longest + "x").encode())
        app_settings = settings(consumers_enabled=True, consumer_group_suffix=f"-{tenant}")
        async with running_app(create_app(app_settings)):
            await raw_producer.send_and_wait(topic(POINTS_COMMANDS), too_long, key=command.key)
            await raw_producer.send_and_wait(topic(POINTS_COMMANDS), command.to_bytes(), key=command.key)
            events = await published(tenant, 2)
            (letter,) = await dead_letters_for(marker.encode())
        assert {e["data"]["source"] for e in events} == {f"command:{longest}"}
        assert "command_id" in letter.reason
