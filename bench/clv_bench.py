"""Predictive CLV benchmark (`make bench-clv`): prints figures, asserts nothing.

A fresh tenant gets ~1,000,000 synthetic orders of 50,000 customers (BG/NBD purchases and Gamma-Gamma spend
from known parameters, tests/metrics/clv_synthetic.py), written with COPY; then the fit runs as the
service's schedule runs it, `python -m metrics.cli fit-clv --tenant T` in a process of its own: its wall time
and peak RSS. Then the same job's stages in this process (read and summarise, fit and predict, store) to
show where the time goes. The tenant's rows are deleted at the end.

Runs against the metrics database of the environment (METRICS_DATABASE_URL, default the dev database
`loyalty_metrics`, migrated by `make db-migrate`). BENCH_CLV_CUSTOMERS overrides the 50,000.
"""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from datetime import time as clock

from sqlalchemy import delete

from metrics import clv_model
from metrics.clv import monthly_rate
from metrics.config import settings
from metrics.models import ClvFit, ClvPrediction, Order, TenantConfig
from metrics.repository import ClvRepository
from metrics.service import clv_service
from shared.db import create_engine, create_sessionmaker, transaction
from tests.metrics.clv_synthetic import AS_OF, synthetic_orders

CUSTOMERS = int(os.environ.get("BENCH_CLV_CUSTOMERS", "50000"))
# About 20 purchases per customer (low dropout, a purchase every ~3 weeks): 1,000,000 orders for 50,000.
BENCH_BG = {"r": 0.9, "alpha": 12.0, "a": 0.3, "b": 7.0}


async def load(tenant: str) -> int:
    rows = synthetic_orders(CUSTOMERS, seed=11, bg=BENCH_BG)
    records = [
        (tenant, f"o{i}", c, datetime.combine(day, clock(12), tzinfo=UTC), day, "EUR", net, net, 0, "webshop")
        for i, (c, day, net) in enumerate(rows)
    ]
    engine = create_engine(settings.database_url, pool_size=1)
    try:
        async with transaction(create_sessionmaker(engine)) as session:
            session.add(TenantConfig(tenant_id=tenant, reporting_currency="EUR"))
            await session.flush()
            columns = ["tenant_id", "order_id", "customer_id", "ordered_at", "day", "currency"]
            columns += ["original_amount", "amount", "refunded", "channel"]
            await ClvRepository.from_session(session).copy(Order.__tablename__, columns, records, schema="metrics")
    finally:
        await engine.dispose()
    return len(records)


async def stages(tenant: str) -> dict[str, float]:
    engine = create_engine(settings.database_url, pool_size=1)
    sessionmaker = create_sessionmaker(engine)
    times: dict[str, float] = {}
    try:
        started = time.perf_counter()
        async with sessionmaker() as session:
            inputs = await clv_service.inputs(session, tenant, as_of=AS_OF)
        times["read orders and summarise"] = time.perf_counter() - started
        t = time.perf_counter()
        result = clv_model.fit(
            inputs.summary, monthly_discount_rate=monthly_rate(inputs.discount_rate), horizon_months=12
        )
        times["fit and predict (pymc-marketing, MAP)"] = time.perf_counter() - t
        t = time.perf_counter()
        async with transaction(sessionmaker) as session:
            await clv_service.save(
                session,
                tenant,
                as_of=AS_OF,
                inputs=inputs,
                parameters=result.parameters,
                predictions=result.predictions,
                started=started,
            )
        times["store predictions and fit"] = time.perf_counter() - t
    finally:
        await engine.dispose()
    return times


async def cleanup(tenant: str) -> None:
    engine = create_engine(settings.database_url, pool_size=1)
    try:
        async with transaction(create_sessionmaker(engine)) as session:
            for model in (Order, ClvPrediction, ClvFit, TenantConfig):
                await session.execute(delete(model).where(model.tenant_id == tenant))
    finally:
        await engine.dispose()


def main() -> None:
    tenant = f"bench-{uuid.uuid4().hex[:8]}"
    print(f"CLV benchmark: tenant {tenant}, {CUSTOMERS} customers, {os.cpu_count()} cores")
    started = time.perf_counter()
    orders = asyncio.run(load(tenant))
    print(f"  loaded {orders} orders in {time.perf_counter() - started:.1f} s")
    try:
        command = [sys.executable, "-m", "metrics.cli", "fit-clv", "--tenant", tenant, "--as-of", AS_OF.isoformat()]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            print(done.stderr)
            raise SystemExit(1)
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"  fit job (its own process, as scheduled): {wall:.1f} s wall, peak RSS {peak_mb:.0f} MB")
        print("  the job's stages, run again in this process:")
        for stage, seconds in asyncio.run(stages(tenant)).items():
            print(f"    {stage:40s} {seconds:6.1f} s")
    finally:
        asyncio.run(cleanup(tenant))


if __name__ == "__main__":
    main()
