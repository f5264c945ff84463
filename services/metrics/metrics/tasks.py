"""Background jobs of the metrics service: the refresh of the headline KPI gauges (metrics/exporter.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import date

from sqlalchemy.ext.asyncio import async_sessionmaker

from metrics.config import Settings
from metrics.exporter import FAILURES, Headline, KpiGauges, month_start, next_month_start
from metrics.repository import HeadlineRepository
from shared.db import AsyncSession
from shared.events import utcnow
from shared.faults import is_infrastructure_error
from shared.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refresh:
    exported: list[str]
    failed: list[str]
    dropped: int


async def refresh_kpi_gauges(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession], gauges: KpiGauges, *, today: date | None = None
) -> Refresh:
    """One refresh: at most `kpi_gauges_max_tenants` tenants, each in a read transaction of its own with its
    queries bounded by `kpi_gauges_statement_timeout_ms`; a tenant that fails is logged and counted, the
    others go on."""
    today = today or utcnow().date()
    start, end = month_start(today), next_month_start(today)
    async with sessionmaker() as session:
        tenants, total = await HeadlineRepository.from_session(session).gauge_tenants(
            today=today, pinned=settings.kpi_gauges_tenants, limit=settings.kpi_gauges_max_tenants
        )
    fresh: dict[str, Headline] = {}
    failed: list[str] = []
    for tenant in tenants:
        try:
            async with sessionmaker() as session, session.begin():
                fresh[tenant] = await HeadlineRepository.from_session(session).headline(
                    tenant, start=start, end=end, today=today, timeout_ms=settings.kpi_gauges_statement_timeout_ms
                )
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
    """The service's background work, run by the runtime for its life: the KPI gauges' refresh."""
    if settings.kpi_gauges_enabled:
        runtime.spawn("metrics:kpi-gauges", _kpi_gauges_loop(settings, runtime.sessionmaker))
