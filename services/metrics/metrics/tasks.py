"""Background work of the metrics service: the outbox relay (segment.changed to loyalty.customers.v1, through
shared/outbox.py); the pending loop, which classifies again the customers ingested batches marked; the
scheduled classification of every customer (time alone turns customers into leavers), tenant by tenant, a page
of customers per transaction; and the refresh of the headline KPI gauges (metrics/exporter.py). A tenant that
fails is logged and counted (`metrics_segment_run_failures_total`, `loyalty_kpi_refresh_failures_total`) and the
others go on."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime

from prometheus_client import Counter
from sqlalchemy.ext.asyncio import async_sessionmaker

from metrics.config import Settings
from metrics.exporter import FAILURES, Headline, KpiGauges
from metrics.repository import GaugeRepository, OutboxRepository
from metrics.service import metrics_service, segment_service
from shared.db import AsyncReadSession, AsyncSession
from shared.events import utcnow
from shared.faults import is_infrastructure_error
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


@dataclass(frozen=True)
class Refresh:
    exported: list[str]
    failed: list[str]
    dropped: int


async def refresh_kpi_gauges(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession], gauges: KpiGauges, *, today: date | None = None
) -> Refresh:
    """One refresh: at most `kpi_gauges_max_tenants` tenants, each in a read transaction of its own with its
    statements bounded by `kpi_gauges_statement_timeout_ms`; a tenant that fails is logged and counted, the
    others go on."""
    today = today or utcnow().date()
    async with sessionmaker() as session:
        tenants, total = await GaugeRepository.from_session(session).gauge_tenants(
            today=today, pinned=settings.kpi_gauges_tenants, limit=settings.kpi_gauges_max_tenants
        )
    fresh: dict[str, Headline] = {}
    failed: list[str] = []
    for tenant in tenants:
        try:
            async with sessionmaker() as session, session.begin():
                await GaugeRepository.from_session(session).bound(settings.kpi_gauges_statement_timeout_ms)
                fresh[tenant] = await metrics_service.headline(session, tenant, today=today)
        except Exception as exc:
            FAILURES.inc()
            failed.append(tenant)
            outage = is_infrastructure_error(exc)
            log.log(
                logging.WARNING if outage else logging.ERROR,
                "KPI gauges of a tenant not refreshed; the others go on",
                extra={"tenant": tenant, "error": repr(exc)},
                exc_info=None if outage else exc,
            )
    gauges.publish(fresh, kept=failed, dropped=total - len(tenants), now=time.time())
    return Refresh(exported=tenants, failed=failed, dropped=total - len(tenants))


async def _kpi_gauges_loop(settings: Settings, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
    gauges = KpiGauges()
    while True:
        try:
            await refresh_kpi_gauges(settings, sessionmaker, gauges)
        except Exception as exc:
            if is_infrastructure_error(exc):  # an outage: no stack trace every interval while it lasts
                log.warning("KPI gauges not refreshed (outage); retrying later", extra={"error": repr(exc)})
            else:
                log.exception("KPI gauges not refreshed; retrying at the next interval")
        await asyncio.sleep(settings.kpi_gauges_interval_seconds)


def start(settings: Settings, runtime: Runtime) -> None:
    """The service's background work for the runtime's life: the outbox relay, the segment schedule and pending
    loop, and the KPI gauges' refresh."""
    relay = outbox_relay(settings, runtime)
    # Checked whether this process relays or not: the outbox's age is the database's, whoever relays it. A
    # process without consumers relays too: what a stopped process left is not stuck behind an API replica.
    runtime.add_check("outbox", relay.readiness(settings.outbox_max_age_seconds))
    if settings.outbox_relay_enabled:
        runtime.spawn("metrics:outbox", relay.run(idle_s=settings.outbox_poll_seconds))
    if settings.consumers_enabled:
        runtime.spawn("metrics:segments", segment_schedule(settings, runtime.sessionmaker))
        runtime.spawn("metrics:segments-pending", pending_loop(settings, runtime.sessionmaker))
    if settings.kpi_gauges_enabled:
        runtime.spawn("metrics:kpi-gauges", _kpi_gauges_loop(settings, runtime.sessionmaker))
