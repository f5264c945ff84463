"""Input offsets and output commands are effectively atomic: a crash at the worst moments neither loses
a command nor awards twice. The rules service uses DB-side idempotency (tracking rows, state and an
outbox of commands in one transaction) with deterministic command ids; these tests crash it."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker

from rules.app import create_app
from rules.consumers import batch_handler
from rules.models import OutboxMessage
from rules.service import RulesOutbox
from shared.consumer import ConsumerRunner
from shared.db import AsyncSession, create_engine, create_sessionmaker
from shared.kafka import EventProducer, ensure_topics
from shared.outbox import Message, OutboxRelay
from shared.topics import DLQ, TopicSpec
from tests.conftest import KAFKA, NAMESPACE, create_api_key, eventually, running_app, service_settings, topic
from tests.rules.helpers import commands, commands_now, earned, install
from tests.rules.samples import BASE, doc, line, order

pytestmark = [pytest.mark.kafka, pytest.mark.db]


class _SimulatedCrash(BaseException):
    """A BaseException, like the process being killed: nothing in the runner may absorb it."""


class CrashBeforeOffsetCommit(ConsumerRunner):
    """Dies after the commands were produced but before the input offsets were committed."""

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        raise _SimulatedCrash


class CrashBeforePublish(OutboxRelay):
    """Dies after the database commit but before any command reached Kafka."""

    async def publish(self, ids: Sequence[int], messages: Sequence[Message]) -> None:
        raise _SimulatedCrash


def relay(
    cls: type[OutboxRelay], sessionmaker: async_sessionmaker[AsyncSession], producer: EventProducer
) -> OutboxRelay:
    # A sweep of everything (no waiting for rows to age), as a restarted service's sweep would find it.
    source = RulesOutbox(namespace=NAMESPACE, sweep_after=timedelta(0))
    return cls(
        service="rules", sessionmaker=sessionmaker, producer=producer.raw, source=source, bootstrap_servers=KAFKA
    )


async def _run_crash(
    runner_cls: type[ConsumerRunner], relay_cls: type[OutboxRelay], tenant: str, raw_producer: AIOKafkaProducer
) -> tuple[tuple[int, int], list[Any]]:
    settings = service_settings("rules")
    engine = create_engine(settings.database_url, pool_size=4)
    sessionmaker = create_sessionmaker(engine)
    producer = EventProducer(KAFKA, client_id=f"crash-{tenant}")
    await producer.start()
    source = topic(f"crash-{tenant}.v1")
    await ensure_topics(KAFKA, [TopicSpec(source, 3)])
    group = f"crash-{tenant}"

    def runner(cls: type[ConsumerRunner], outbox: OutboxRelay) -> ConsumerRunner:
        return cls(
            service="rules",
            topics=[source],
            group_id=group,
            bootstrap_servers=KAFKA,
            handler=batch_handler(sessionmaker, outbox, namespace=NAMESPACE),
            dlq_producer=producer,
            dlq_topic=topic(DLQ),
            batch_timeout_ms=50,
            batch_size=10,
            topic_event_types={source: frozenset({"purchase.completed", "purchase.refunded"})},
        )

    # 1 + 2 + ... + 30 points, one order each, over 5 customers
    events = [order(tenant, f"c-{i % 5}", [line("A", "x", "1", str(i))]) for i in range(1, 31)]
    try:
        for event in events:
            await raw_producer.send(source, event.to_bytes(), key=event.key)
        await raw_producer.flush()
        crashing = runner(runner_cls, relay(relay_cls, sessionmaker, producer))
        await crashing.start()
        await eventually(lambda: not crashing.running)
        await crashing.stop()
        after_crash = (len(await commands_now(tenant)), await _outbox_rows(sessionmaker, tenant))

        healthy_relay = relay(OutboxRelay, sessionmaker, producer)
        healthy = runner(ConsumerRunner, healthy_relay)
        await healthy.start()
        try:
            # What a restarted service's sweep does: relay what the crash left in the outbox.
            await healthy_relay.relay_once()
            found = await commands(tenant, lambda cs: len({c.id for c in cs}) >= len(events))
            await asyncio.sleep(1.0)  # let any redelivery land before the final check
            await healthy_relay.relay_once()
            found = await commands(tenant, lambda cs: len({c.id for c in cs}) >= len(events))
        finally:
            await healthy.stop()
        assert await _outbox_rows(sessionmaker, tenant) == 0, "the outbox was drained"
        assert sorted(e.points for e in earned(found)) == list(range(1, 31))
        assert {e.source_event_id for e in earned(found)} == {e.id for e in events}
        return after_crash, found
    finally:
        await producer.stop()
        await engine.dispose()


class TestCrash:
    async def test_crash_between_produce_and_offset_commit(
        self, raw_producer: AIOKafkaProducer, kafka_topics: list[str], tenant: str
    ) -> None:
        await _install(tenant)
        (produced, pending), found = await _run_crash(CrashBeforeOffsetCommit, OutboxRelay, tenant, raw_producer)
        assert produced > 0, "the crash came after commands were produced"
        assert pending == 0
        # The redelivered batch was recognised: no command was produced a second time.
        copies = Counter(e.id for e in found)
        assert max(copies.values()) == 1, copies.most_common(3)

    async def test_crash_between_db_commit_and_produce(
        self, raw_producer: AIOKafkaProducer, kafka_topics: list[str], tenant: str
    ) -> None:
        await _install(tenant)
        (produced, pending), found = await _run_crash(ConsumerRunner, CrashBeforePublish, tenant, raw_producer)
        assert produced == 0, "the crash came before anything was produced"
        assert pending > 0, "the commands were durable in the outbox"
        copies = Counter(e.id for e in found)
        assert max(copies.values()) == 1, copies.most_common(3)


async def _outbox_rows(sessionmaker: async_sessionmaker[AsyncSession], tenant: str) -> int:
    async with sessionmaker() as session:
        values = (await session.execute(select(OutboxMessage.value))).scalars().all()
    return sum(1 for v in values if f'"tenantid":"{tenant}"'.encode() in v)


async def _install(tenant: str) -> None:
    key = await create_api_key("rules", tenant, ["rules:admin"])
    async with running_app(create_app(service_settings("rules", consumers_enabled=False))) as client:
        await install(client, key, doc(BASE))
