"""Segments benchmark (`make bench-segments`): prints figures, asserts nothing.

A fresh tenant with 50,000 customers and 1,000,000 orders (`BENCH_SEGMENT_CUSTOMERS`, `BENCH_SEGMENT_ORDERS`)
written straight into the metrics tables the ingestion fills, CLV predictions for 70 % of them; then:

1. The scheduled classification of the whole tenant (`classify_all`, a page of 1,000 customers per
   transaction): customers per second.
2. `GET /v1/customers` latency (p50/p95/p99 of sequential requests) for each sort, with and without a segment
   filter, walking the pages by cursor, against the service run by uvicorn in a subprocess.
3. `GET /v1/segments` latency, and the whole list as CSV (`GET /v1/customers.csv`).

Runs against `BENCH_METRICS_DATABASE_URL` (default: the dev database `loyalty_metrics`, migrated by `make
db-migrate`); the tenant's rows are deleted at the end.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from metrics.models import api_keys
from metrics.tasks import classify_all
from shared.auth import generate_key, store_key
from shared.db import create_engine, create_sessionmaker

ROOT = Path(__file__).resolve().parent.parent
URL = os.environ.get(
    "BENCH_METRICS_DATABASE_URL", "postgresql+asyncpg://loyalty:loyalty@127.0.0.1:5432/loyalty_metrics"
)
CUSTOMERS = int(os.environ.get("BENCH_SEGMENT_CUSTOMERS", "50000"))
ORDERS = int(os.environ.get("BENCH_SEGMENT_ORDERS", "1000000"))
REQUESTS = int(os.environ.get("BENCH_SEGMENT_REQUESTS", "200"))
PORT = 8093
NOW = datetime.now(UTC)
PREDICTION_COLUMNS = ("tenant_id customer_id fitted_at frequency recency t currency monetary_value expected_spend "
                      "p_alive purchases_90d purchases_365d clv").split()  # fmt: skip


async def seed(conn: asyncpg.Connection, tenant: str) -> None:
    rng = random.Random(7)
    per_customer = ORDERS / CUSTOMERS
    orders: list[tuple[Any, ...]] = []
    customers: list[tuple[Any, ...]] = []
    predictions: list[tuple[Any, ...]] = []
    for n in range(CUSTOMERS):
        customer = f"c-{n:07d}"
        count = max(1, round(rng.expovariate(1 / per_customer)))
        start = rng.uniform(30, 900)
        gap = rng.uniform(5, 90)
        times = [NOW - timedelta(days=max(0.0, start - i * gap * rng.uniform(0.5, 1.5))) for i in range(count)]
        discounted = rng.random() < 0.2
        revenue = Decimal(0)
        for i, at in enumerate(times):
            amount = Decimal(rng.randint(20, 5000))
            revenue += amount
            share = Decimal("0.15") if discounted and rng.random() < 0.8 else Decimal(0)
            orders.append((tenant, f"{customer}-{i}", customer, at, at.date(), "EUR", amount, amount, share, "erp"))
        nps = rng.choice([None, None, 3, 8, 9, 10])
        customers.append(
            (
                tenant,
                customer,
                min(times),
                max(times),
                count,
                revenue,
                nps,
                None if nps is None else NOW - timedelta(days=rng.uniform(0, 400)),
            )
        )
        if rng.random() < 0.7:
            p_alive, clv = Decimal(f"{rng.random():.6f}"), Decimal(rng.randint(0, 50000))
            predictions.append((tenant, customer, NOW, count - 1, 100, 200, "EUR", clv, clv, p_alive, 1, 3, clv))
    await conn.copy_records_to_table(
        "orders",
        schema_name="metrics",
        columns=[
            "tenant_id",
            "order_id",
            "customer_id",
            "ordered_at",
            "day",
            "currency",
            "original_amount",
            "amount",
            "discount_share",
            "channel",
        ],
        records=orders,
    )
    await conn.copy_records_to_table(
        "customers",
        schema_name="metrics",
        columns=[
            "tenant_id",
            "customer_id",
            "first_purchase_at",
            "last_purchase_at",
            "orders",
            "net_revenue",
            "last_nps",
            "last_nps_at",
        ],
        records=customers,
    )
    await conn.copy_records_to_table(
        "clv_predictions",
        schema_name="metrics",
        columns=PREDICTION_COLUMNS,
        records=predictions,
    )
    await conn.execute("analyze metrics.customer_segments")
    print(f"seeded {len(customers):,} customers, {len(orders):,} orders, {len(predictions):,} predictions")


def percentiles(samples: list[float]) -> str:
    q = statistics.quantiles(samples, n=100)
    return f"p50 {q[49]:6.1f} ms  p95 {q[94]:6.1f} ms  p99 {q[98]:6.1f} ms  (n={len(samples)})"


async def walk(client: httpx.AsyncClient, key: str, query: str) -> list[float]:
    """REQUESTS sequential requests following the cursor (back to the first page at the end)."""
    samples: list[float] = []
    cursor = None
    for _ in range(REQUESTS):
        url = f"/v1/customers?{query}&limit=50" + (f"&cursor={cursor}" if cursor else "")
        started = time.perf_counter()
        response = await client.get(url, headers={"X-API-Key": key})
        samples.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
        cursor = response.json()["next_cursor"]
    return samples


def start_server(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "metrics"], env=env, cwd=ROOT)


async def main() -> None:
    tenant = f"bench-seg-{uuid.uuid4().hex[:8]}"
    dsn = URL.replace("+asyncpg", "")
    conn = await asyncpg.connect(dsn)
    engine = create_engine(URL, pool_size=4)
    server = None
    try:
        started = time.perf_counter()
        await seed(conn, tenant)
        print(f"seed: {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        outcome = await classify_all(
            create_sessionmaker(engine), now=NOW, namespace="bench-seg.", page=1000, tenants=[tenant]
        )
        elapsed = time.perf_counter() - started
        classified = outcome[tenant]
        assert classified is not None
        rate = classified[0] / elapsed
        print(f"scheduled classification: {classified[0]:,} customers in {elapsed:.1f} s = {rate:,.0f}/s")
        await conn.execute("delete from metrics.outbox where topic like 'bench-seg.%'")
        await conn.execute("analyze metrics.customer_segments")
        key = generate_key()
        await store_key(engine, api_keys, key, tenant_id=tenant, name="bench", scopes=["metrics:read"])
        env = {
            **os.environ,
            "METRICS_DATABASE_URL": URL,
            "METRICS_HTTP_PORT": str(PORT),
            "METRICS_CONSUMERS_ENABLED": "false",
            "METRICS_CREATE_TOPICS": "false",
            "METRICS_LOG_LEVEL": "WARNING",
        }
        server = start_server(env)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{PORT}", timeout=60) as client:
            for _ in range(100):
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.2)
            overview = await client.get("/v1/segments", headers={"X-API-Key": key.token})
            overview.raise_for_status()
            counts = overview.json()["counts"]
            print("segments:", ", ".join(f"{s} {n:,}" for s, n in counts.items()))
            await walk(client, key.token, "sort=clv")  # warm-up
            print(f"GET /v1/customers on {CUSTOMERS:,} customers, 50 per page, walking the cursor:")
            rare = min(counts, key=lambda s: counts[s] or CUSTOMERS)
            for query in (
                "sort=clv",
                "sort=revenue",
                "sort=p_alive",
                "sort=last_purchase",
                f"sort=clv&segment={rare}",
                "sort=revenue&segment=loyal_passive",
            ):
                print(f"  {query:38} {percentiles(await walk(client, key.token, query))}")
            samples = []
            for _ in range(REQUESTS):
                started = time.perf_counter()
                (await client.get("/v1/segments", headers={"X-API-Key": key.token})).raise_for_status()
                samples.append((time.perf_counter() - started) * 1000)
            print(f"GET /v1/segments {percentiles(samples)}")
            started = time.perf_counter()
            size = 0
            async with client.stream("GET", "/v1/customers.csv", headers={"X-API-Key": key.token}) as response:
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
            print(f"GET /v1/customers.csv: {size / 1e6:.1f} MB in {time.perf_counter() - started:.1f} s")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        for table in ("orders", "customers", "clv_predictions", "customer_segments", "api_keys"):
            await conn.execute(f"delete from metrics.{table} where tenant_id = $1", tenant)
        await conn.close()
        await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
