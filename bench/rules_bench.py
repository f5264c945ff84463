"""Rules benchmark (`make bench-rules`): prints figures, asserts nothing.

1. In process: a 25-rule ruleset evaluated on one core (single-threaded Python), events/s per core
   from the process's CPU time (time.process_time), with and without folding each award into the
   customer state as the pipeline does.
2. Through Kafka: purchase events pre-loaded into a fresh, namespaced purchases topic, then the real
   consumer (decode, evaluate, one DB transaction per batch, outbox, produce) runs until every command
   is on the points-commands topic; events/s in the steady state (from 10 % to 90 % of the commands
   read), from the first command to the last, and from the start; CPU per event of each part.

Options via the environment: BENCH_EVENTS (in process, default 40000), BENCH_KAFKA_EVENTS (default
150000: enough batches for a steady-state window), BENCH_BATCH (consumer batch size, default 5000),
BENCH_WORKERS (consumer processes in one group, as replicas would run, default 2), BENCH_PARTITIONS
(of the bench topics, default 6), BENCH_SKIP_KAFKA=1 (the in-process part only).
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import random
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import uvloop
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from cpumeter import CpuMeter

from rules import ruleset as rs
from rules.config import Settings
from rules.consumers import purchases_consumer
from rules.engine import CompiledRuleset, CustomerSnapshot, apply_event, evaluate
from rules.models import api_keys
from rules.service import rules_service
from shared.db import transaction
from shared.events import CloudEvent, PurchaseCompleted, PurchaseLine, make_event
from shared.kafka import delete_topics, ensure_topics
from shared.runtime import Runtime
from shared.topics import ALL_TOPICS, POINTS_COMMANDS, PURCHASES

CATEGORIES = ["fasteners", "tools", "safety", "packaging", "paint", "cleaning", "electrical", "plumbing"]
SKUS = [(f"SKU-{i:04d}", CATEGORIES[i % len(CATEGORIES)]) for i in range(400)]
START = datetime(2026, 1, 5, tzinfo=UTC)
# Partitions of the bench topics: a multiple of the consumer processes, so each gets an equal share (with 3
# partitions and 2 processes, one process would carry two thirds of the stream and finish alone).
PARTITIONS = int(os.environ.get("BENCH_PARTITIONS", "6"))


def ruleset_25() -> dict[str, Any]:
    """25 rules of every kind, the size of a real programme."""
    rules: list[dict[str, Any]] = [
        {"id": "base", "kind": "points_per_unit", "priority": 100},
        {"id": "first-purchase", "kind": "bonus", "points": 100, "when": "customer.purchase_count == 0"},
        {"id": "second-purchase", "kind": "bonus", "points": 50, "when": "customer.purchase_count == 1"},
        {"id": "fifth-purchase", "kind": "bonus", "points": 75, "when": "customer.purchase_count == 4"},
        {"id": "tenth-purchase", "kind": "bonus", "points": 150, "when": "customer.purchase_count == 9"},
        {
            "id": "cross-sell",
            "kind": "bonus",
            "points": 40,
            "when": "customer.purchase_count > 0 && size(event.new_categories) > 0",
        },
        {"id": "up-sell-500", "kind": "bonus", "points": 50, "when": "event.net_amount >= 500.0"},
        {"id": "up-sell-2000", "kind": "bonus", "points": 250, "when": "event.net_amount >= 2000.0"},
        {"id": "webshop", "kind": "bonus", "points": 5, "when": "event.channel == 'webshop'"},
        {
            "id": "winback",
            "kind": "bonus",
            "points": 80,
            "when": "customer.purchase_count > 0 && customer.days_since_last_purchase > 90",
        },
        {"id": "big-basket", "kind": "bonus", "points": 20, "when": "event.line_count >= 4"},
        {"id": "tier", "kind": "tier_multiplier", "priority": -10},
        {"id": "spring", "kind": "bonus", "points": 30, "campaign": "spring"},
        {"id": "summer-x2", "kind": "points_per_unit", "campaign": "summer", "priority": 90},
    ]
    for i, category in enumerate(CATEGORIES[:6]):
        rules.append(
            {"id": f"cat-{category}", "kind": "line_multiplier", "categories": [category], "multiplier": f"1.{i + 1}"}
        )
    for i in range(4):
        rules.append(
            {
                "id": f"hero-{i}",
                "kind": "line_multiplier",
                "skus": [SKUS[i * 7][0], SKUS[i * 7 + 1][0]],
                "multiplier": "3",
            }
        )
    rules.append(
        {"id": "bulk-lines", "kind": "line_multiplier", "line_when": "line.quantity >= 20.0", "multiplier": "1.2"}
    )
    assert len(rules) == 25
    return {
        "currencies": {"EUR": {"points_per_unit": "1"}, "USD": {"points_per_unit": "1", "spend_factor": "0.92"}},
        "rounding": "floor",
        "pending_days": 14,
        "exclusions": {"gift_cards": True, "shipping": True},
        "caps": {"per_order": 5000, "per_customer": {"points": 50000, "period": "month"}},
        "campaigns": {
            "spring": {"starts_at": "2026-03-01T00:00:00Z", "ends_at": "2026-05-01T00:00:00Z", "budget": 10_000_000},
            "summer": {"starts_at": "2026-06-01T00:00:00Z", "ends_at": "2026-09-01T00:00:00Z"},
        },
        "tiers": {
            "basis": "spend_12m",
            "review_every_days": 90,
            "levels": [
                {"name": "Bronze", "threshold": "0"},
                {"name": "Silver", "threshold": "2000", "multiplier": "1.25"},
                {"name": "Gold", "threshold": "10000", "multiplier": "1.5"},
                {"name": "Platinum", "threshold": "50000", "multiplier": "2"},
            ],
        },
        "rules": rules,
    }


def events(tenant: str, count: int, customers: int, seed: int = 7) -> list[CloudEvent[Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        lines = []
        for _ in range(rng.randint(1, 5)):
            sku, category = rng.choice(SKUS)
            lines.append(
                PurchaseLine(
                    sku=sku,
                    category=category,
                    quantity=Decimal(rng.choice([1, 1, 2, 5, 10, 25])),
                    unit_price=Decimal(rng.randint(100, 30000)) / 100,
                )
            )
        net = sum((ln.quantity * ln.unit_price for ln in lines), Decimal(0))
        at = START + timedelta(minutes=i * 7)
        data = PurchaseCompleted(
            order_id=f"SO-{seed}-{i}",
            customer_id=f"cust-{rng.randrange(customers):05d}",
            member_id="buyer",
            channel=rng.choice(["webshop", "erp", "sales_rep"]),
            currency="EUR",
            net_amount=net,
            gross_amount=net * Decimal("1.21"),
            lines=lines,
            ordered_at=at,
        )
        out.append(make_event("purchase.completed", data, tenant_id=tenant, source="bench", time=at))
    return out


def bench_in_process(count: int) -> None:
    compiled = CompiledRuleset.compile("bench", 1, rs.parse(ruleset_25()))
    stream = events("bench", count, customers=2000)
    states: dict[str, CustomerSnapshot] = {}
    tiers = compiled.document.tiers
    assert tiers is not None
    from rules.engine import review_tier

    # Warm-up (first compilation of memo entries is part of a real run too, but not of steady state).
    for event in stream[:2000]:
        evaluate(compiled, event, CustomerSnapshot(event.data.customer_id))
    # The pre-built input (tens of thousands of events) is not what a consumer holds (one batch): keep
    # the garbage collector from scanning it over and over, which would be a cost of the benchmark only.
    gc.freeze()

    # CPU time of this process (time.process_time), not wall clock: a per-core figure that other work
    # on the machine (Kafka, PostgreSQL, other benchmarks) does not inflate.
    started = time.process_time()
    points = 0
    for event in stream:
        ev = evaluate(compiled, event, CustomerSnapshot(event.data.customer_id, purchase_count=3, tier="Silver"))
        points += ev.total_points
    only = time.process_time() - started

    started = time.process_time()
    for event in stream:
        cid = event.data.customer_id
        state = states.get(cid) or states.setdefault(cid, CustomerSnapshot(cid))
        ev = evaluate(compiled, event, state)
        apply_event(
            state,
            event,
            spend_factor=Decimal(1),
            points=ev.points_by_customer.get(cid, 0),
            counters=ev.counters.get(cid, {}),
        )
        review_tier(state, tiers, event.time)
    full = time.process_time() - started
    gc.unfreeze()
    print(f"in process, 25 rules, {count} events, 1 core, CPU time per event (time.process_time):")
    print(f"  evaluate only:               {count / only:10,.0f} events/s ({only / count * 1e6:.1f} µs/event)")
    print(f"  evaluate + state + tiers:    {count / full:10,.0f} events/s ({full / count * 1e6:.1f} µs/event)")


def _worker(settings: Settings, stop: Any) -> None:
    """One consumer process of the rules service (what a replica runs), until the parent says stop."""

    async def run() -> None:
        async with Runtime(settings, api_keys=api_keys, consumers=[purchases_consumer]):
            await asyncio.to_thread(stop.wait)

    # The loop the service gets from uvicorn (`--loop auto` picks uvloop, pinned in requirements.lock).
    uvloop.run(run())


async def bench_kafka(count: int, batch: int, workers: int) -> None:
    namespace = f"bench{uuid.uuid4().hex[:6]}."
    tenant = f"bench-{uuid.uuid4().hex[:6]}"
    base = Settings()
    # No TLS on the loopback connection to PostgreSQL: asyncpg would otherwise negotiate it (`prefer`).
    dsn = base.database_url if "?" in base.database_url else f"{base.database_url}?ssl=disable"
    settings = Settings(
        database_url=dsn,
        topic_namespace=namespace,
        consumer_group_suffix=f"-{namespace}",
        consumer_batch_size=batch,
        consumer_batch_timeout_ms=100,
        log_level="WARNING",
        topic_partitions=PARTITIONS,
        # The events are 7 minutes apart from START: 150,000 of them reach two years ahead, past today.
        max_future_skew_seconds=5 * 365 * 86400,
    )
    bootstrap = settings.kafka_bootstrap_servers
    specs = [replace(t, name=settings.topic(t.name)) for t in ALL_TOPICS]
    await ensure_topics(bootstrap, specs, partitions_override=PARTITIONS)
    try:
        # The ruleset, through the service (validation, versioning, activation).
        async with Runtime(replace_consumers(settings), api_keys=api_keys) as runtime:
            async with transaction(runtime.sessionmaker) as session:
                await rules_service.create_version(
                    session, tenant_id=tenant, ruleset_id="bench", source=ruleset_25(), key_id="bench"
                )
                await rules_service.activate(
                    session,
                    tenant_id=tenant,
                    ruleset_id="bench",
                    version=1,
                    effective_from=START - timedelta(days=1),
                    key_id="bench",
                )
        stream = events(tenant, count, customers=5000, seed=11)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=512 * 1024)
        await producer.start()
        try:
            futures = [await producer.send(settings.topic(PURCHASES), e.to_bytes(), key=e.key) for e in stream]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

        reader = AIOKafkaConsumer(
            settings.topic(POINTS_COMMANDS),
            bootstrap_servers=bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        await reader.start()
        context = multiprocessing.get_context("spawn")
        stop = context.Event()
        procs = [context.Process(target=_worker, args=(settings, stop)) for _ in range(workers)]
        try:
            started = time.perf_counter()
            for proc in procs:
                proc.start()
            seen, first, last, first_seen = 0, 0.0, 0.0, 0
            # The steady state: from the moment 10 % of the commands were read to the moment 90 % were, so
            # neither the start (one consumer may run alone until the other has joined) nor the tail (one
            # may finish its partitions first) is in it. CPU is measured over the same window.
            low, high = count // 10, count - count // 10
            window: dict[str, tuple[float, int]] = {}
            cpu = CpuMeter([p.pid for p in procs if p.pid is not None])
            # Every event of this ruleset earns points under one pending period: one command per event.
            while seen < count:
                got = sum(len(r) for r in (await reader.getmany(timeout_ms=200, max_records=1000)).values())
                if got:
                    last = time.perf_counter()
                    if not first:
                        first, first_seen = last, got
                    seen += got
                    if seen >= low and "low" not in window:
                        window["low"] = (last, seen)
                        cpu.__enter__()
                    if seen >= high and "high" not in window:
                        window["high"] = (last, seen)
                        cpu.__exit__()
                if time.perf_counter() - started > 600:
                    raise TimeoutError(f"only {seen} of {count} commands")
        finally:
            stop.set()
            for proc in procs:
                proc.join(30)
            await reader.stop()
        (t_low, n_low), (t_high, n_high) = window["low"], window["high"]
        total = last - started
        print(f"through Kafka and PostgreSQL, 25 rules, {count} events, batch {batch}, {workers} consumer process(es):")
        print(f"  consume -> evaluate -> commit -> produce, {seen} commands read back read_committed:")
        print(f"  steady state (10 % to 90 % of the commands): {(n_high - n_low) / (t_high - t_low):10,.0f} events/s")
        print(f"  from the first command to the last:          {(seen - first_seen) / (last - first):10,.0f} events/s")
        print(f"  wall clock incl. process start and group join: {count / total:8,.0f} events/s ({total:.1f} s)")
        cpu.report(n_high - n_low, "event", servers="consumer processes")
    finally:
        try:
            await delete_topics(bootstrap, [s.name for s in specs])
        except Exception as exc:
            print(f"could not delete bench topics: {exc!r}")


def replace_consumers(settings: Settings) -> Settings:
    return settings.model_copy(update={"consumers_enabled": False})


def main() -> None:
    bench_in_process(int(os.environ.get("BENCH_EVENTS", "40000")))
    if os.environ.get("BENCH_SKIP_KAFKA") == "1":
        return
    asyncio.run(
        bench_kafka(
            int(os.environ.get("BENCH_KAFKA_EVENTS", "150000")),
            int(os.environ.get("BENCH_BATCH", "5000")),
            int(os.environ.get("BENCH_WORKERS", "2")),
        )
    )


if __name__ == "__main__":
    main()
