"""Metrics benchmark (`make bench-metrics`): prints figures, asserts nothing.

1. Ingestion: purchases and their ledger entries (two per purchase: the customer's earn and the issuance
   posting) and survey answers over the last 90 days (BENCH_INGEST_DAYS), produced to fresh topics first,
   then consumed by the metrics service (uvicorn in a subprocess, its four consumers) into the aggregates;
   events/s from the first to the last event processed, and the service's peak RSS.
2. Queries on a generated tenant of 1,000,000 purchases of 50,000 customers over three years, written
   straight into the tables with COPY (aggregates computed by the service's own pure functions):
   GET /v1/kpis (8 quarters, 24 months), /v1/kpis/lifetime (now and as of a past day), /v1/kpis/cohorts,
   sequentially over keep-alive HTTP; p50 and p95, and the service's RSS.

The database is `METRICS_DATABASE_URL` (`make bench-metrics`: `loyalty_metrics_bench`, created afresh each
run), migrated to head first; topics get a fresh namespace, deleted at the end. Sizes: BENCH_PURCHASES
(ingestion, 50,000), BENCH_QUERY_PURCHASES (1,000,000), BENCH_QUERY_CUSTOMERS (50,000), BENCH_REQUESTS (100
per query).
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import uvloop
from aiokafka import AIOKafkaProducer
from cpumeter import CpuMeter

from metrics import domain
from metrics.config import Settings
from metrics.models import api_keys
from metrics.repository import DAILY_COLUMNS
from shared.auth import generate_key, store_key
from shared.db import create_engine
from shared.events import LedgerEntryPosted, PurchaseCompleted, PurchaseLine, SurveyAnswered, make_event
from shared.kafka import delete_topics, ensure_topics
from shared.migrations import upgrade
from shared.topics import ALL_TOPICS, ENGAGEMENT, LEDGER_ENTRIES, PURCHASES

ROOT = Path(__file__).resolve().parent.parent
PURCHASE_EVENTS = int(os.environ.get("BENCH_PURCHASES", "50000"))
INGEST_CUSTOMERS = 5000
# The ingested purchases' days: the last INGEST_DAYS days (a live stream; 1095 for a three-year history import).
INGEST_DAYS = int(os.environ.get("BENCH_INGEST_DAYS", "90"))
TODAY = datetime.now(UTC).date() - timedelta(days=1)
QUERY_PURCHASES = int(os.environ.get("BENCH_QUERY_PURCHASES", "1000000"))
QUERY_CUSTOMERS = int(os.environ.get("BENCH_QUERY_CUSTOMERS", "50000"))
REQUESTS = int(os.environ.get("BENCH_REQUESTS", "100"))
PORT = 8093
FIRST_DAY = date(2023, 1, 1)
DAYS = 3 * 365
WINDOW = 365


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_server(settings: Settings, *, consumers: bool) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(
        {
            "METRICS_DATABASE_URL": settings.database_url,
            "METRICS_TOPIC_NAMESPACE": settings.topic_namespace,
            "METRICS_CONSUMER_GROUP_SUFFIX": settings.consumer_group_suffix,
            "METRICS_CONSUMERS_ENABLED": "true" if consumers else "false",
            "METRICS_CONSUMER_BATCH_SIZE": str(settings.consumer_batch_size),
            "METRICS_LOG_LEVEL": "WARNING",
        }
    )
    command = [sys.executable, "-m", "uvicorn", "--factory", "metrics.app:create_app", "--port", str(PORT)]
    command += ["--no-access-log", "--loop", "uvloop", "--http", "httptools", "--log-level", "warning"]
    return subprocess.Popen(command, env=env, cwd=ROOT)


class Connection:
    """A minimal keep-alive HTTP/1.1 client: the load generator must cost far less CPU than the server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def get(self, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        lines = [f"GET {path} HTTP/1.1", "Host: bench"] + [f"{k}: {v}" for k, v in headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = next(int(x.split(b":", 1)[1]) for x in head.split(b"\r\n") if x.lower().startswith(b"content-length:"))
        return int(head[9:12]), await self.reader.readexactly(length)


async def wait_ready(timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", PORT)
            status, _ = await Connection(reader, writer).get("/readyz", {})
            writer.close()
            if status == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.3)
    raise RuntimeError("the metrics server did not become ready")


# --- 1. ingestion ------------------------------------------------------------------------------------


def ingestion_events(tenant: str) -> list[tuple[str, Any]]:
    rng = random.Random(7)
    out: list[tuple[str, Any]] = []
    for i in range(PURCHASE_EVENTS):
        customer = f"c-{rng.randrange(INGEST_CUSTOMERS)}"
        day = TODAY - timedelta(days=rng.randrange(INGEST_DAYS))
        at = datetime(day.year, day.month, day.day, 10, tzinfo=UTC)
        net = Decimal(rng.randrange(1000, 100000)) / 100
        line = PurchaseLine(sku="SKU-1", category="tools", quantity=Decimal(1), unit_price=net)
        data = PurchaseCompleted(
            order_id=f"SO-{i}",
            customer_id=customer,
            channel="erp",
            currency="EUR",
            net_amount=net,
            gross_amount=net,
            lines=[line],
            ordered_at=at,
        )
        out.append((PURCHASES, make_event("purchase.completed", data, tenant_id=tenant, source="bench")))
        for account, points in ((customer, int(net)), (f"system:issuance/{i % 16:02d}", -int(net))):
            entry = LedgerEntryPosted(
                entry_id=str(uuid.uuid4()),
                transaction_id=f"tx-{i}",
                account_id=account,
                customer_id=None if account.startswith("system:") else customer,
                kind="earn",
                points=points,
                balance_after=0,
                created_at=at,
                bucket="available",
            )
            event = make_event("ledger.entry.posted", entry, tenant_id=tenant, source="bench", subject=account, time=at)
            out.append((LEDGER_ENTRIES, event))
        if i % 20 == 0:
            answer = SurveyAnswered(survey_id=f"S-{i}", customer_id=customer, nps=rng.randrange(11), effort_score=3)
            out.append((ENGAGEMENT, make_event("survey.answered", answer, tenant_id=tenant, source="bench", time=at)))
    return out


async def ingestion(settings: Settings, tenant: str) -> None:
    events = ingestion_events(tenant)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers, acks="all", linger_ms=20, max_batch_size=512 * 1024
    )
    await producer.start()
    try:
        pending = [producer.send(settings.topic(t), e.to_bytes(), key=e.key) for t, e in events]
        await asyncio.gather(*[await p for p in pending])
    finally:
        await producer.stop()
    engine = create_engine(settings.database_url, pool_size=1)
    server = start_server(settings, consumers=True)
    peak = 0.0
    cpu = CpuMeter([server.pid]).__enter__()
    try:
        first: float | None = None
        async with engine.connect() as conn:
            while True:
                done = (
                    await conn.exec_driver_sql(
                        "select count(*) from metrics.processed_events where consumer_group = 'metrics' "
                        f"and tenant_id = '{tenant}'"
                    )
                ).scalar_one()
                await conn.commit()
                now = time.monotonic()
                peak = max(peak, rss_mb(server.pid))
                if done and first is None:
                    first = now
                if done >= len(events):
                    break
                if server.poll() is not None:
                    raise RuntimeError("the metrics server died")
                await asyncio.sleep(0.2)
        cpu.__exit__()
        elapsed = now - (first or now)
        rate = len(events) / elapsed if elapsed else float("inf")
        print(
            f"    {len(events):,} events ({PURCHASE_EVENTS:,} purchases, {2 * PURCHASE_EVENTS:,} ledger entries, "
            f"{len(events) - 3 * PURCHASE_EVENTS:,} survey answers; {INGEST_CUSTOMERS:,} customers, "
            f"{INGEST_DAYS} days) in {elapsed:.1f} s: {rate:,.0f} events/s; "
            f"service peak RSS {peak:.0f} MB"
        )
        # Start-up included; PostgreSQL counts every backend, other load on the machine too.
        cpu.report(len(events), "event", servers="service")
    finally:
        server.terminate()
        server.wait(timeout=30)
        await engine.dispose()


# --- 2. queries on a large tenant ----------------------------------------------------------------------


def generate(tenant: str) -> dict[str, list[tuple[Any, ...]]]:
    """Orders of QUERY_CUSTOMERS customers (skewed: a few buy often) and every aggregate of them."""
    rng = random.Random(11)
    weights = [rng.lognormvariate(0, 1.2) for _ in range(QUERY_CUSTOMERS)]
    scale = (QUERY_PURCHASES - QUERY_CUSTOMERS) / sum(weights)
    counts = [1 + int(w * scale) for w in weights]
    counts[0] += QUERY_PURCHASES - sum(counts)
    orders: list[tuple[Any, ...]] = []
    customers: list[tuple[Any, ...]] = []
    customer_days: list[tuple[Any, ...]] = []
    member_days: list[tuple[Any, ...]] = []
    daily: dict[date, list[Any]] = defaultdict(lambda: [0] * len(DAILY_COLUMNS))
    col = {c: i for i, c in enumerate(DAILY_COLUMNS)}
    cells: dict[tuple[str, date, date], int] = defaultdict(int)
    active: dict[tuple[str, date], int] = defaultdict(int)
    members: dict[tuple[str, date], int] = defaultdict(int)
    n = 0
    for c, count in enumerate(counts):
        customer = f"c-{c}"
        start = rng.randrange(DAYS)
        days_of: dict[date, list[Any]] = {}
        for _ in range(count):
            day = FIRST_DAY + timedelta(days=min(DAYS - 1, start + int(rng.expovariate(1 / 120)) % (DAYS - start)))
            amount = Decimal(rng.randrange(1000, 200000)) / 100
            at = datetime(day.year, day.month, day.day, 10, tzinfo=UTC)
            orders.append((tenant, f"SO-{n}", customer, at, day, "EUR", amount, amount, Decimal(0), None, "erp"))
            n += 1
            cell = days_of.setdefault(day, [0, Decimal(0)])
            cell[0] += 1
            cell[1] += amount
            row = daily[day]
            row[col["orders"]] += 1
            row[col["amount"]] += amount
            row[col["points_issued"]] += int(amount)
            row[col["available_delta"]] += int(amount)
        days = sorted(days_of)
        for key, value in domain.footprint(days, WINDOW).items():
            if key[0] == "cell":
                cells[(key[1], key[2], key[3])] += value
            elif key[0] == "period":
                active[(key[1], key[2])] += value
            else:
                daily[key[1]][col[{"active": "active_delta", "new": "new_customers", "buyers": "buyers"}[key[0]]]] += (
                    value
                )
        for (kind, start_day), value in domain.periods_of(days).items():
            members[(kind, start_day)] += value
        total = sum((v[1] for v in days_of.values()), Decimal(0))
        first, last = days[0], days[-1]
        customers.append(
            (tenant, customer, datetime(first.year, first.month, first.day, 10, tzinfo=UTC),
             datetime(last.year, last.month, last.day, 10, tzinfo=UTC), count, total, int(total), 0)
        )  # fmt: skip
        customer_days += [(tenant, customer, d, v[0], v[1]) for d, v in days_of.items()]
        member_days += [(tenant, d, customer) for d in days]
    surveys = []
    answers: list[tuple[tuple[str, str, date, str], domain.Answer]] = []
    survey_counts: dict[tuple[str, str, date], list[int]] = defaultdict(lambda: [0] * domain.SURVEY_COUNTS)
    for i in range(QUERY_CUSTOMERS):
        day = FIRST_DAY + timedelta(days=rng.randrange(DAYS))
        at = datetime(day.year, day.month, day.day, 12, tzinfo=UTC)
        customer, nps, effort = f"c-{rng.randrange(QUERY_CUSTOMERS)}", rng.randrange(11), rng.randrange(1, 8)
        surveys.append((tenant, "survey", f"S-{i}", customer, at, "survey.answered", f"e-{i}", nps, effort))
        for kind in domain.PERIODS:
            start_day = domain.period_start(kind, day)
            answers.append(((tenant, kind, start_day, customer), (at, f"e-{i}", nps)))
            survey_counts[(tenant, kind, start_day)][3] += effort
            survey_counts[(tenant, kind, start_day)][4] += 1
    latest, changes = domain.latest_answers({}, answers)
    for (t, kind, start_day, _), delta in changes.items():
        row = survey_counts[(t, kind, start_day)]
        for i, value in enumerate(delta):
            row[i] += value
    return {
        "orders": orders,
        "customers": customers,
        "customer_days": customer_days,
        "member_days": member_days,
        "daily": [(tenant, d, *v) for d, v in daily.items()],
        "period_cells": [(tenant, k[0], k[1], k[2], v) for k, v in cells.items() if v],
        "period_active": [(tenant, k[0], k[1], v) for k, v in active.items() if v],
        "period_members": [(tenant, k[0], k[1], v) for k, v in members.items() if v],
        "engagements": surveys,
        "survey_periods": [(*k, *v) for k, v in latest.items()],
        "period_surveys": [(*k, *v) for k, v in survey_counts.items()],
    }


COLUMNS = {
    "orders": ["tenant_id", "order_id", "customer_id", "ordered_at", "day", "currency", "original_amount", "amount",
               "refunded", "discount_share", "channel"],
    "customers": ["tenant_id", "customer_id", "first_purchase_at", "last_purchase_at", "orders", "net_revenue",
                  "points_available", "points_pending"],
    "customer_days": ["tenant_id", "customer_id", "day", "orders", "net_revenue"],
    "member_days": ["tenant_id", "day", "customer_id"],
    "daily": ["tenant_id", "day", *DAILY_COLUMNS],
    "period_cells": ["tenant_id", "period", "cohort", "start", "customers"],
    "period_active": ["tenant_id", "period", "start", "customers"],
    "period_members": ["tenant_id", "period", "start", "members"],
    "engagements": ["tenant_id", "kind", "business_id", "customer_id", "occurred_at", "event_type", "event_id", "nps",
                    "effort_score"],
    "survey_periods": ["tenant_id", "period", "start", "customer_id", "occurred_at", "event_id", "nps"],
    "period_surveys": ["tenant_id", "period", "start", "responses", "promoters", "detractors", "effort_sum",
                       "efforts"],
}  # fmt: skip


async def load(settings: Settings, tenant: str) -> None:
    started = time.monotonic()
    tables = generate(tenant)
    generated = time.monotonic()
    engine = create_engine(settings.database_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            for table, rows in tables.items():
                await driver.copy_records_to_table(table, schema_name="metrics", columns=COLUMNS[table], records=rows)
            await conn.commit()
            autocommit = await conn.execution_options(isolation_level="AUTOCOMMIT")
            for table in tables:
                await autocommit.exec_driver_sql(f"vacuum analyze metrics.{table}")
    finally:
        await engine.dispose()
    print(
        f"    generated {len(tables['orders']):,} orders of {len(tables['customers']):,} customers "
        f"({len(tables['customer_days']):,} customer-days) in {generated - started:.0f} s, "
        f"loaded with COPY in {time.monotonic() - generated:.0f} s"
    )


async def queries(settings: Settings, tenant: str) -> None:
    engine = create_engine(settings.database_url, pool_size=1)
    key = generate_key()
    await store_key(engine, api_keys, key, tenant_id=tenant, name="bench", scopes=["metrics:read"])
    await engine.dispose()
    server = start_server(settings, consumers=False)
    try:
        await wait_ready()
        reader, writer = await asyncio.open_connection("127.0.0.1", PORT)
        conn = Connection(reader, writer)
        headers = {"X-API-Key": key.token}
        paths = {
            "GET /v1/kpis, 8 quarters": "/v1/kpis?from=2024-01-01&to=2026-01-01&period=quarter",
            "GET /v1/kpis, 24 months": "/v1/kpis?from=2024-01-01&to=2026-01-01&period=month",
            "GET /v1/kpis, 365 days": "/v1/kpis?from=2025-01-01&to=2026-01-01&period=day",
            "GET /v1/kpis/lifetime (now)": "/v1/kpis/lifetime",
            "GET /v1/kpis/lifetime?as_of=2024-12-31": "/v1/kpis/lifetime?as_of=2024-12-31",
            "GET /v1/kpis/cohorts?period=month": "/v1/kpis/cohorts?period=month",
        }
        for name, path in paths.items():
            for _ in range(5):  # warm-up: prepared statements, caches
                status, body = await conn.get(path, headers)
                assert status == 200, body[:500]
            latencies = []
            with CpuMeter([server.pid]) as cpu:
                for _ in range(REQUESTS):
                    t0 = time.perf_counter()
                    await conn.get(path, headers)
                    latencies.append((time.perf_counter() - t0) * 1000)
            print(f"    {name:42s} p50 {pct(latencies, 0.5):6.1f} ms   p95 {pct(latencies, 0.95):6.1f} ms")
            cpu.report(REQUESTS, "request", servers="service")
        writer.close()
        print(f"    service RSS {rss_mb(server.pid):.0f} MB (peak {rss_mb(server.pid, 'VmHWM'):.0f} MB)")
    finally:
        server.terminate()
        server.wait(timeout=30)


async def main(dsn: str) -> None:
    namespace = f"bench{uuid.uuid4().hex[:6]}."
    settings = Settings(
        database_url=dsn,
        topic_namespace=namespace,
        consumer_group_suffix=f"-{namespace}",
        consumer_batch_size=int(os.environ.get("BENCH_BATCH", "1000")),
        log_level="WARNING",
    )
    specs = [replace(t, name=settings.topic(t.name)) for t in ALL_TOPICS]
    await ensure_topics(settings.kafka_bootstrap_servers, specs)
    print(f"metrics benchmark: topics {namespace}*, {os.cpu_count()} cores")
    try:
        print("[1] ingestion through Kafka into the aggregates (the service's four consumers)")
        await ingestion(settings, f"bench-{uuid.uuid4().hex[:8]}")
        tenant = f"bench-{uuid.uuid4().hex[:8]}"
        print(
            f"[2] queries on {QUERY_PURCHASES:,} purchases of {QUERY_CUSTOMERS:,} customers, {REQUESTS} requests each"
        )
        await load(settings, tenant)
        await queries(settings, tenant)
    finally:
        await delete_topics(settings.kafka_bootstrap_servers, [s.name for s in specs])


if __name__ == "__main__":
    base = Settings()
    # No TLS on the loopback connection to PostgreSQL: asyncpg would otherwise negotiate it (`prefer`).
    url = base.database_url if "?" in base.database_url else f"{base.database_url}?ssl=disable"
    # Migrations run as the owner role; the service role gets its rows (as `loyalty migrate` does).
    upgrade(str(ROOT / "services" / "metrics" / "alembic.ini"), base.migration_url, service_role=base.service_role)
    uvloop.run(main(url))
