"""Background work of the metrics service: the outbox relay (segment.changed to loyalty.customers.v1, through
shared/outbox.py); the pending loop, which classifies again the customers ingested batches marked; the
scheduled classification of every customer (time alone turns customers into leavers), tenant by tenant, a page
of customers per transaction; and the refresh of the headline KPI gauges (metrics/exporter.py). A tenant that
fails is logged and counted (`metrics_segment_run_failures_total`, `loyalty_kpi_refresh_failures_total`) and the
others go on. Also the periodic predictive CLV fit:
each tenant due for a fit (orders, and no fit for `clv_fit_interval_s`) is fitted by a process of its own,
`python -m metrics.cli fit-clv --tenant T` (what `loyalty metrics fit-clv` runs), one at a time: the models'
libraries and the fit's memory never live in the service's process, and no request waits for a fit. A fit
that fails or runs past `clv_fit_timeout_s` is logged and tried again after the interval; the tenant keeps its
previous predictions."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from prometheus_client import Counter
from sqlalchemy.ext.asyncio import async_sessionmaker

from metrics import schemas
from metrics.clv import monthly_rate
from metrics.config import Settings
from metrics.exporter import FAILURES, Headline, KpiGauges
from metrics.repository import GaugeRepository, OutboxRepository
from metrics.service import clv_service, metrics_service, segment_service
from shared.db import AsyncReadSession, AsyncSession, transaction
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


CLV_FITS = Counter("metrics_clv_fits_total", "CLV fit processes the service ran, by outcome", ["outcome"])


async def fit_clv(
    sessionmaker: async_sessionmaker[AsyncSession], tenant_id: str, *, as_of: date | None = None
) -> schemas.ClvFit:
    """Fits the tenant's CLV models on its orders up to `as_of` (default: today, UTC) and replaces its
    predictions, in the calling process: the fit job's, never the service's."""
    from metrics import clv_model  # the models' libraries load in the fit job's process only

    started = time.perf_counter()
    day = as_of or utcnow().date()
    async with sessionmaker() as session:
        inputs = await clv_service.inputs(session, tenant_id, as_of=day)
    result = clv_model.fit(
        inputs.summary,
        monthly_discount_rate=monthly_rate(inputs.discount_rate),
        horizon_months=inputs.horizon_months,
    )
    async with transaction(sessionmaker) as session:
        return await clv_service.save(
            session,
            tenant_id,
            as_of=day,
            inputs=inputs,
            parameters=result.parameters,
            predictions=result.predictions,
            started=started,
        )


async def fit_in_subprocess(settings: Settings, tenant_id: str) -> bool:
    """Runs `python -m metrics.cli fit-clv --tenant T` against this service's database; True when it fitted."""
    env = {**os.environ, "METRICS_DATABASE_URL": settings.database_url}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "metrics.cli",
        "fit-clv",
        "--tenant",
        tenant_id,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), settings.clv_fit_timeout_s)
    except TimeoutError:
        log.error("CLV fit timed out; killed", extra={"tenant": tenant_id, "timeout_s": settings.clv_fit_timeout_s})
        CLV_FITS.labels("timeout").inc()
        return False
    finally:
        if process.returncode is None:  # timed out or cancelled (the service stops): the child goes too
            process.kill()
            await process.wait()
    if process.returncode != 0:
        detail = stderr.decode(errors="replace").strip()[-1000:]
        log.warning("CLV fit failed", extra={"tenant": tenant_id, "exit": process.returncode, "detail": detail})
        CLV_FITS.labels("failed").inc()
        return False
    CLV_FITS.labels("fitted").inc()
    return True


async def _clv_loop(settings: Settings, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
    # When each tenant was last tried: a tenant whose fit fails (too few repeat customers) waits an interval too.
    tried: dict[str, float] = {}
    while True:
        # The first look comes after one check interval: a restarting service does not fit at once.
        await asyncio.sleep(settings.clv_fit_check_s)
        try:
            async with sessionmaker() as session:
                due = await clv_service.tenants_due(
                    session, fitted_before=utcnow() - timedelta(seconds=settings.clv_fit_interval_s)
                )
            for tenant in due:
                if time.monotonic() - tried.get(tenant, -settings.clv_fit_interval_s) < settings.clv_fit_interval_s:
                    continue
                tried[tenant] = time.monotonic()
                await fit_in_subprocess(settings, tenant)
        except Exception as exc:
            if is_infrastructure_error(exc):
                log.warning("CLV schedule failed (outage); retrying at the next check", extra={"error": repr(exc)})
            else:
                log.exception("CLV schedule failed; retrying at the next check")


def start(settings: Settings, runtime: Runtime) -> None:
    """The service's background work for the runtime's life: the outbox relay, the segment schedule and pending
    loop, the KPI gauges' refresh and the CLV fit schedule."""
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
    if settings.clv_fit_enabled:
        runtime.spawn("metrics:clv-fit", _clv_loop(settings, runtime.sessionmaker))
