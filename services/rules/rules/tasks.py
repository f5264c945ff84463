"""Background jobs of the rules service: the outbox sweep, which relays (shared/outbox.py) the rows a crashed
process committed but never published; the consumer publishes its own batches' rows right after the commit."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.ext.asyncio import async_sessionmaker

from rules.config import Settings
from rules.service import RulesOutbox
from shared.db import AsyncSession
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


def start(settings: Settings, runtime: Runtime) -> None:
    """The service's background work, run by the runtime for its life: the outbox sweep."""
    relay = outbox_relay(settings, runtime.sessionmaker, runtime.producer)
    # Registered whether this process sweeps or not: the outbox's age is the database's, whoever relays it.
    runtime.add_check("outbox", relay.readiness(settings.outbox_max_age_seconds))
    if settings.consumers_enabled:
        runtime.spawn("rules:outbox-sweep", relay.run(idle_s=settings.outbox_sweep_seconds))
