"""Background jobs of the ledger: the outbox relay and the periodic maturing/expiry/hold-release run."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ledger import schemas
from ledger.config import Settings
from ledger.service import ledger_service
from shared.db import transaction
from shared.kafka import EventProducer
from shared.topics import LEDGER_ENTRIES

log = logging.getLogger(__name__)


async def relay_once(
    sessionmaker: async_sessionmaker[AsyncSession], producer: EventProducer, topic: str, limit: int
) -> int:
    # The rows stay locked until the broker acked every event; a crash before the delete commits
    # relays them again, and the duplicates carry the same event id (the entry id).
    async with transaction(sessionmaker) as session:
        events = await ledger_service.outbox_events(session, limit=limit)
        if events:
            await producer.publish_many(topic, [event for _, event in events])
            await ledger_service.relayed(session, [outbox_id for outbox_id, _ in events])
        return len(events)


async def run_tasks(
    sessionmaker: async_sessionmaker[AsyncSession], *, now: datetime | None, limit: int, tenant_id: str | None = None
) -> schemas.TaskRun:
    async with transaction(sessionmaker) as session:
        return await ledger_service.run_tasks(session, now=now, limit=limit, tenant_id=tenant_id)


async def _relay_loop(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession], producer: EventProducer
) -> None:
    topic = settings.topic(LEDGER_ENTRIES)
    while True:
        try:
            relayed = await relay_once(sessionmaker, producer, topic, settings.outbox_batch_size)
        except Exception:  # the relay must outlive a database or broker outage
            log.exception("outbox relay failed; retrying")
            await asyncio.sleep(1.0)
            continue
        if relayed < settings.outbox_batch_size:
            await asyncio.sleep(settings.outbox_poll_interval_s)


async def _tasks_loop(settings: Settings, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
    while True:
        try:
            result = await run_tasks(sessionmaker, now=None, limit=settings.tasks_batch_limit)
            if result.matured or result.expired or result.holds_released:
                log.info("periodic tasks ran", extra=result.model_dump())
        except Exception:
            log.exception("periodic tasks failed; retrying at the next interval")
        await asyncio.sleep(settings.tasks_interval_s)


@asynccontextmanager
async def background(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession], producer: EventProducer
) -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks: list[asyncio.Task[None]] = []
    if settings.outbox_relay_enabled:
        tasks.append(asyncio.create_task(_relay_loop(settings, sessionmaker, producer), name="ledger:outbox-relay"))
    if settings.tasks_enabled:
        tasks.append(asyncio.create_task(_tasks_loop(settings, sessionmaker), name="ledger:tasks"))
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
