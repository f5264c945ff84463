"""Background work of the metrics service: the periodic predictive CLV fit.

Each tenant due for a fit (orders, and no fit for `clv_fit_interval_s`) is fitted by a process of its own,
`python -m metrics.cli fit-clv --tenant T` (what `loyalty metrics fit-clv` runs), one at a time: the models'
libraries and the fit's memory (a few hundred MB for 50,000 customers) never live in the service's process,
and no request waits for a fit. A fit that fails or runs past `clv_fit_timeout_s` is logged and tried again
after the interval; the tenant keeps its previous predictions."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from datetime import date, timedelta

from prometheus_client import Counter
from sqlalchemy.ext.asyncio import async_sessionmaker

from metrics import schemas
from metrics.clv import monthly_rate
from metrics.config import Settings
from metrics.service import clv_service
from shared.db import AsyncSession, transaction
from shared.events import utcnow
from shared.faults import is_infrastructure_error
from shared.runtime import Runtime

log = logging.getLogger(__name__)

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
    """The service's background work, run by the runtime for its life: the periodic CLV fit."""
    if settings.clv_fit_enabled:
        runtime.spawn("metrics:clv-fit", _clv_loop(settings, runtime.sessionmaker))
