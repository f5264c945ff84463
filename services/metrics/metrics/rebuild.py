"""Rebuilding a tenant's aggregates from the topics (`loyalty metrics rebuild --tenant T`).

The tenant's rows go (aggregates, facts and tracking rows, not its configuration), then the input topics
(every consumer's, `GROUPS`: purchases, engagement, ledger entries, customers, rewards) are read from their
beginning up to the end they had when the rebuild started, each by a consumer runner of its own under a
throwaway group id, and the tenant's events are folded in by the same handlers as the service's consumers
(other tenants' events are read and skipped). Amounts are converted with the
tenant's factors as they are now. Events the first pass dead-lettered are refused again and dropped (the
DLQ already holds them). The service may keep running: an event both see counts once (tracking rows), and
its KPIs for the tenant are partial until the rebuild ends."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy.ext.asyncio import async_sessionmaker

from metrics.config import Settings
from metrics.consumers import GROUPS, Handle
from metrics.repository import AggregatesRepository
from shared.consumer import BatchHandler, ConsumerRunner, Inbound, Rejection
from shared.db import AsyncSession, create_engine, create_sessionmaker, transaction
from shared.events import TOPIC_EVENT_TYPES


@dataclass
class Replayed:
    events: dict[str, int] = field(default_factory=dict)  # by topic: the tenant's events handled
    refused: int = 0


class _Discard:
    """The rebuild's dead letters: counted, never sent (the first pass sent them)."""

    def __init__(self, replayed: Replayed) -> None:
        self.replayed = replayed

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> Awaitable[Any]:
        self.replayed.refused += 1
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def _only(
    tenant: str, topic: str, handle: Handle, sessions: async_sessionmaker[AsyncSession], replayed: Replayed
) -> BatchHandler[Any]:
    async def on_batch(batch: Sequence[Inbound[Any]]) -> Sequence[Rejection]:
        mine = [m for m in batch if m.event.tenantid == tenant]
        if not mine:
            return []
        async with transaction(sessions) as session:
            rejections = await handle(session, mine)
        replayed.events[topic] = replayed.events.get(topic, 0) + len(mine) - len(rejections)
        return rejections

    return on_batch


async def _ends(feed: AIOKafkaConsumer, topic: str) -> dict[TopicPartition, int]:
    partitions = feed.partitions_for_topic(topic)
    for _ in range(100):
        if partitions:
            break
        # No metadata yet (a consumer just started): no partitions would read as "caught up" at once.
        await feed.topics()
        partitions = feed.partitions_for_topic(topic)
        await asyncio.sleep(0.1)
    if not partitions:
        raise RuntimeError(f"topic {topic} has no partitions to replay")
    ends: dict[TopicPartition, int] = await feed.end_offsets([TopicPartition(topic, p) for p in partitions])
    return ends


async def _caught_up(feed: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
    for tp, end in ends.items():
        if end and (await feed.committed(tp) or 0) < end:
            return False
    return True


async def rebuild(settings: Settings, tenant: str, *, poll_s: float = 0.5) -> Replayed:
    engine = create_engine(settings.database_url, pool_size=4)
    sessions = create_sessionmaker(engine)
    replayed = Replayed()
    runners: list[tuple[ConsumerRunner, AIOKafkaConsumer, str]] = []
    try:
        async with transaction(sessions) as session:
            await AggregatesRepository.from_session(session).forget(tenant)
        run = uuid.uuid4().hex[:8]
        for source, (group, handle) in GROUPS.items():
            topic = settings.topic(source)
            group_id = f"{group}-rebuild-{tenant}-{run}"
            feed = AIOKafkaConsumer(
                topic,
                bootstrap_servers=settings.kafka_bootstrap_servers,
                group_id=group_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                isolation_level="read_committed",
            )
            runner = ConsumerRunner(
                service=settings.service_name,
                topics=[topic],
                group_id=group_id,
                bootstrap_servers=settings.kafka_bootstrap_servers,
                handler=_only(tenant, source, handle, sessions, replayed),
                dlq_producer=cast("Any", None),  # the discarding sink stands in for it
                batch_size=settings.consumer_batch_size,
                batch_timeout_ms=settings.consumer_batch_timeout_ms,
                topic_event_types={topic: TOPIC_EVENT_TYPES[source]},
                limits=settings.input_limits,
                feed=feed,
                dlq_sink=_Discard(replayed),
            )
            await runner.start()
            runners.append((runner, feed, topic))
        ends = [await _ends(feed, topic) for _, feed, topic in runners]
        while not all([await _caught_up(feed, end) for (_, feed, _), end in zip(runners, ends, strict=True)]):
            if any(not runner.running for runner, _, _ in runners):
                raise RuntimeError("a replay consumer stopped before the end of its topic")
            await asyncio.sleep(poll_s)
        return replayed
    finally:
        for runner, _, _ in runners:
            await runner.stop()
        await engine.dispose()
