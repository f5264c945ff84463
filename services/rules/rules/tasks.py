"""Background jobs of the rules service: the outbox sweep, which relays (shared/outbox.py) the rows a crashed
process committed but never published; the consumer publishes its own batches' rows right after the commit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from rules.config import Settings
from rules.service import RulesOutbox
from shared.kafka import EventProducer
from shared.outbox import OutboxRelay
from shared.runtime import Runtime


def outbox_relay(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession], producer: EventProducer
) -> OutboxRelay:
    source = RulesOutbox(
        namespace=settings.topic_namespace, sweep_after=timedelta(seconds=settings.outbox_sweep_after_seconds)
    )
    return OutboxRelay(
        service=settings.service_name,
        sessionmaker=sessionmaker,
        producer=producer.raw,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        source=source,
        batch_size=settings.outbox_batch_size,
        max_record_bytes=settings.outbox_max_record_bytes,
    )


@asynccontextmanager
async def background(settings: Settings, runtime: Runtime) -> AsyncIterator[list[asyncio.Task[None]]]:
    relay = outbox_relay(settings, runtime.sessionmaker, runtime.producer)
    # Registered whether this process sweeps or not: the outbox's age is the database's, whoever relays it.
    runtime.add_check("outbox", relay.readiness(settings.outbox_max_age_seconds))
    tasks: list[asyncio.Task[None]] = []
    if settings.consumers_enabled:
        sweeping = relay.run(idle_s=settings.outbox_sweep_seconds)
        tasks.append(asyncio.create_task(sweeping, name="rules:outbox-sweep"))
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
