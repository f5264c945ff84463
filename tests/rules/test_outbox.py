"""The rules' outbox through the shared relay, on the real broker and PostgreSQL: a row that cannot be
published (larger than the relay sends, or refused by the broker) is quarantined with its reason while the
rows of other tenants behind it are published; /readyz fails while the oldest row is older than the
threshold and recovers once it is relayed."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, ConsumerRecord
from prometheus_client import REGISTRY
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import async_sessionmaker

from rules.app import create_app
from rules.models import OutboxMessage, outbox_quarantine
from rules.repository import OutboxRepository
from rules.service import RulesOutbox
from shared.db import AsyncSession, create_engine, create_sessionmaker, transaction
from shared.events import utcnow
from shared.kafka import EventProducer, delete_topics, ensure_topics
from shared.outbox import OutboxRelay
from shared.topics import POINTS_COMMANDS, TopicSpec
from tests.conftest import KAFKA, NAMESPACE, read_topic, running_app, service_settings, topic
from tests.factories import earn
from tests.rules.helpers import commands

pytestmark = [pytest.mark.kafka, pytest.mark.db]


@pytest.fixture
async def sessionmaker() -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(service_settings("rules").database_url, pool_size=3)
    yield create_sessionmaker(engine)
    await engine.dispose()


def relay(
    sessionmaker: async_sessionmaker[AsyncSession], producer: AIOKafkaProducer, *, max_record_bytes: int = 1_000_000
) -> OutboxRelay:
    # A sweep that does not wait for rows to age, over this test session's topics only.
    return OutboxRelay(
        service="rules",
        sessionmaker=sessionmaker,
        producer=producer,
        source=RulesOutbox(namespace=NAMESPACE, sweep_after=timedelta(0)),
        bootstrap_servers=KAFKA,
        max_record_bytes=max_record_bytes,
    )


async def drain(outbox: OutboxRelay) -> None:
    while await outbox.relay_once():
        pass


def command_row(name: str, tenant: str) -> dict[str, Any]:
    event = earn(tenant, "c-1", points=3)
    return {"topic": name, "key": event.key, "value": event.to_bytes()}


async def add_rows(sessionmaker: async_sessionmaker[AsyncSession], rows: list[dict[str, Any]]) -> list[int]:
    async with transaction(sessionmaker) as session:
        return await OutboxRepository.from_session(session).add(rows)


async def quarantined(sessionmaker: async_sessionmaker[AsyncSession], ids: list[int]) -> dict[int, Any]:
    async with sessionmaker() as session:
        rows = (await session.execute(select(outbox_quarantine).where(outbox_quarantine.c.id.in_(ids)))).all()
    return {row.id: row for row in rows}


async def still_in_outbox(sessionmaker: async_sessionmaker[AsyncSession], ids: list[int]) -> list[int]:
    async with sessionmaker() as session:
        return list((await session.execute(select(OutboxMessage.id).where(OutboxMessage.id.in_(ids)))).scalars())


def tenants() -> tuple[str, str, str]:
    return tuple(f"t-{uuid.uuid4().hex[:12]}" for _ in range(3))  # type: ignore[return-value]


def _quarantined_count(reason: str) -> float:
    return REGISTRY.get_sample_value("outbox_quarantined_total", {"service": "rules", "reason": reason}) or 0.0


class TestQuarantine:
    async def test_a_row_larger_than_the_relay_sends_is_quarantined_and_the_rows_behind_it_published(
        self, sessionmaker: async_sessionmaker[AsyncSession], raw_producer: AIOKafkaProducer
    ) -> None:
        poisoned, second, third = tenants()
        name = topic(POINTS_COMMANDS)
        oversized = {"topic": name, "key": f"{poisoned}:c-1".encode(), "value": b"x" * 5000}
        ids = await add_rows(sessionmaker, [oversized, command_row(name, second), command_row(name, third)])
        before = _quarantined_count("too_large")
        await drain(relay(sessionmaker, raw_producer, max_record_bytes=2048))
        assert len(await commands(second, lambda cs: len(cs) >= 1)) == 1
        assert len(await commands(third, lambda cs: len(cs) >= 1)) == 1
        found = await quarantined(sessionmaker, ids)
        assert list(found) == [ids[0]]
        assert (found[ids[0]].reason, found[ids[0]].value, found[ids[0]].topic) == ("too_large", b"x" * 5000, name)
        assert "more than 2048" in found[ids[0]].detail
        assert _quarantined_count("too_large") - before == 1
        assert await still_in_outbox(sessionmaker, ids) == []

    async def test_a_record_the_broker_refuses_is_quarantined_and_the_others_in_its_batch_published(
        self, sessionmaker: async_sessionmaker[AsyncSession]
    ) -> None:
        poisoned, second, third = tenants()
        # One partition with a small limit: the three rows travel in one batch, which the broker refuses whole.
        name = topic(f"outbox-refusal-{uuid.uuid4().hex[:8]}.v1")
        await ensure_topics(KAFKA, [TopicSpec(name, 1, {"max.message.bytes": "20000"})])
        too_big = {"topic": name, "key": f"{poisoned}:c-1".encode(), "value": b"y" * 50_000}
        ids = await add_rows(sessionmaker, [command_row(name, second), too_big, command_row(name, third)])
        # A producer of its own: after a refused batch, an idempotent producer cannot send to that partition again.
        producer = EventProducer(KAFKA, client_id=f"refusal-{uuid.uuid4().hex[:6]}")
        await producer.start()
        try:
            await drain(relay(sessionmaker, producer.raw))
            records = await read_topic(name, until=lambda rs: len(rs) >= 2)
        finally:
            await producer.stop()
            await delete_topics(KAFKA, [name])
        assert sorted(_tenant_of(r) for r in records) == sorted([second, third])
        found = await quarantined(sessionmaker, ids)
        assert list(found) == [ids[1]]
        assert found[ids[1]].reason == "too_large"
        assert "MessageSizeTooLarge" in found[ids[1]].detail
        assert await still_in_outbox(sessionmaker, ids) == []


def _tenant_of(record: ConsumerRecord[bytes, bytes]) -> str:
    return (record.key or b"").decode().split(":", 1)[0]


class TestReadiness:
    async def test_readyz_fails_while_the_oldest_row_is_older_than_the_threshold(
        self, sessionmaker: async_sessionmaker[AsyncSession], raw_producer: AIOKafkaProducer, tenant: str
    ) -> None:
        outbox = relay(sessionmaker, raw_producer)
        await drain(outbox)  # the oldest row of this session's topics will be this test's
        (row_id,) = await add_rows(sessionmaker, [command_row(topic(POINTS_COMMANDS), tenant)])
        async with transaction(sessionmaker) as session:
            await session.execute(
                update(OutboxMessage).where(OutboxMessage.id == row_id).values(created_at=utcnow() - timedelta(hours=1))
            )
        settings = service_settings("rules", consumers_enabled=False, outbox_max_age_seconds=30)
        async with running_app(create_app(settings)) as client:
            stalled = await client.get("/readyz")
            age = REGISTRY.get_sample_value("outbox_oldest_age_seconds", {"service": "rules"})
            await drain(outbox)
            ready = await client.get("/readyz")
        assert stalled.status_code == 503
        assert stalled.headers["content-type"] == "application/problem+json"
        assert "oldest unpublished row is" in stalled.json()["checks"]["outbox"]
        assert (age or 0) >= 3600
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["outbox"] == "ok"
        assert len(await commands(tenant, lambda cs: len(cs) >= 1)) == 1
