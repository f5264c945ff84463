"""Background work of the metrics service: the outbox relay (segment.changed to loyalty.customers.v1, through
shared/outbox.py); the pending loop, which classifies again the customers ingested batches marked; and the
scheduled classification of every customer (time alone turns customers into leavers), tenant by tenant, a page
of customers per transaction. A tenant that fails is logged and counted (`metrics_segment_run_failures_total`)
and the others go on."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import datetime

from prometheus_client import Counter
from sqlalchemy.ext.asyncio import async_sessionmaker

from metrics.config import Settings
from metrics.repository import OutboxRepository
from metrics.service import segment_service
from shared.db import AsyncReadSession, AsyncSession
from shared.outbox import Claimed, OutboxRelay, Unpublishable, describe_error
from shared.runtime import Runtime

log = logging.getLogger(__name__)

SEGMENT_RUN_FAILURES = Counter(
    "metrics_segment_run_failures_total", "Tenants whose segment classification failed (a scheduled or pending round)"
)


class MetricsOutbox:
    """The metrics outbox as the shared relay reads it: rows hold their records' bytes; a relay takes only its
    deployment's topics (the namespace prefix). A crash between the send and the delete sends a row twice
    with the same event id, which the rules service records once."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace

    async def claim(self, session: AsyncSession, limit: int) -> Claimed:
        rows = await OutboxRepository.from_session(session).claim(limit, self.namespace)
        return Claimed(ids=[r.id for r in rows], messages=[(r.topic, r.key, r.value) for r in rows])

    async def delete(self, session: AsyncSession, ids: Sequence[int]) -> None:
        await OutboxRepository.from_session(session).delete(ids)

    async def quarantine(self, session: AsyncSession, rows: Sequence[Unpublishable]) -> None:
        await OutboxRepository.from_session(session).quarantine(rows)

    async def oldest(self, session: AsyncReadSession) -> datetime | None:
        return await OutboxRepository.from_session(session).oldest(self.namespace)


async def classify_all(
    sessionmaker: async_sessionmaker[AsyncSession],
    *,
    namespace: str,
    page: int,
    tenants: Sequence[str] | None = None,
    now: datetime | None = None,
) -> dict[str, tuple[int, int] | None]:
    """One scheduled run: every tenant's customers (or these tenants'), each page as of the time it is
    classified (or `now`). Returns per tenant (classified, changed), or None for a tenant whose run failed
    (the others still ran)."""
    if tenants is None:
        async with sessionmaker() as session:
            tenants = await segment_service.tenants(session)
    outcome: dict[str, tuple[int, int] | None] = {}
    for tenant_id in tenants:
        try:
            outcome[tenant_id] = await segment_service.reclassify_tenant(
                sessionmaker, tenant_id, now=now, namespace=namespace, page=page
            )
        except Exception as exc:
            SEGMENT_RUN_FAILURES.inc()
            log.error("segment run failed", extra={"tenant_id": tenant_id, "error": describe_error(exc)})
            outcome[tenant_id] = None
    return outcome


async def segment_schedule(settings: Settings, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
    await asyncio.sleep(settings.segments_first_run_seconds)
    while True:
        try:
            await classify_all(sessionmaker, namespace=settings.topic_namespace, page=settings.segments_page_size)
        except Exception as exc:  # the tenant list itself could not be read (an outage): the next round
            log.warning("segment run failed", extra={"error": describe_error(exc)})
        await asyncio.sleep(settings.segments_interval_seconds)


async def pending_loop(settings: Settings, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
    """Classifies the customers ingested batches marked, a round at a time; an outage backs off."""
    backoff = 0.0
    while True:
        try:
            taken, failed = await segment_service.reclassify_pending(
                sessionmaker, namespace=settings.topic_namespace, limit=settings.segments_pending_batch
            )
        except Exception as exc:
            backoff = min(30.0, backoff * 2 or 0.5)
            log.warning("segment pending round failed", extra={"error": describe_error(exc), "retry_in_s": backoff})
            await asyncio.sleep(backoff)
            continue
        backoff = 0.0
        SEGMENT_RUN_FAILURES.inc(len(failed))
        if taken < settings.segments_pending_batch:
            await asyncio.sleep(settings.segments_pending_seconds)


def outbox_relay(settings: Settings, runtime: Runtime) -> OutboxRelay:
    return OutboxRelay(
        service=settings.service_name,
        sessionmaker=runtime.sessionmaker,
        producer=runtime.producer.raw,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        source=MetricsOutbox(settings.topic_namespace),
        batch_size=settings.outbox_batch_size,
        max_record_bytes=settings.outbox_max_record_bytes,
    )


def start(settings: Settings, runtime: Runtime) -> None:
    """The service's background work for the runtime's life: the outbox relay and the segment schedule."""
    relay = outbox_relay(settings, runtime)
    runtime.add_check("outbox", relay.readiness(settings.outbox_max_age_seconds))
    if settings.consumers_enabled:
        runtime.spawn("metrics:outbox", relay.run(idle_s=settings.outbox_poll_seconds))
        runtime.spawn("metrics:segments", segment_schedule(settings, runtime.sessionmaker))
        runtime.spawn("metrics:segments-pending", pending_loop(settings, runtime.sessionmaker))
