"""Ledger benchmark (`make bench-ledger`): prints figures, asserts nothing.

1. Earn commands consumed from Kafka into the ledger: the real consumer (batches of many commands per
   database transaction) with the outbox relay running, in this process.
2. REST redeem latency at a fixed arrival rate, against the service run by uvicorn in a subprocess.
3. Balance reads per second with concurrent keep-alive connections against the same server.
4. Rewards: POST /v1/redemptions latency at a fixed arrival rate, of a reward without a stock and of a
   stocked one (every redemption takes a unit: they queue on its row from that statement to the commit),
   and the catalogue listing for one customer (GET /v1/customers/{id}/rewards, 20 rewards with tiers,
   limits and windows to evaluate) per second.

Runs against the database `LEDGER_DATABASE_URL` names (`make bench-ledger`: `loyalty_ledger_bench`, created
afresh each run; migrated here) and the local broker, on a fresh tenant and a fresh topic namespace, so it
leaves the real topics alone.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import uvloop
from aiokafka import AIOKafkaProducer
from cpumeter import CpuMeter
from sqlalchemy import text

from ledger.config import Settings
from ledger.consumers import commands_consumer
from ledger.models import api_keys
from ledger.repository import LedgerRepository
from ledger.tasks import start as start_background
from shared.auth import generate_key, store_key
from shared.db import create_engine
from shared.events import EarnPoints, make_event
from shared.kafka import delete_topics, ensure_topics
from shared.migrations import upgrade
from shared.runtime import Runtime
from shared.topics import ALL_TOPICS, POINTS_COMMANDS

ROOT = Path(__file__).resolve().parent.parent
EARN_COMMANDS = int(os.environ.get("BENCH_EARN_COMMANDS", "60000"))
CUSTOMERS = 5000
BATCH = int(os.environ.get("BENCH_BATCH", "2000"))
REDEEM_RATES = tuple(int(r) for r in os.environ.get("BENCH_REDEEM_RATES", "300,150").split(",") if r)
REDEEM_SECONDS = 10
WARMUP_SECONDS = 3
READ_SECONDS = 10
READ_CONNECTIONS = 32
PORTS = (8091, 8092)
REDEMPTION_RATE = int(os.environ.get("BENCH_REDEMPTION_RATE", "200"))
CATALOGUE_REWARDS = 20
# Connections per replica: the open loop spreads 64 keep-alive connections over the replicas, and a pool as big
# as its share never opens and closes overflow connections (each one a login and its statements prepared anew).
POOL_SIZE = int(os.environ.get("BENCH_POOL_SIZE", "32"))


class Connection:
    """A minimal keep-alive HTTP/1.1 client: the load generator must cost far less CPU than the server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, bytes]:
        lines = [f"{method} {path} HTTP/1.1", "Host: bench", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def earn_from_kafka(settings: Settings, tenant: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, linger_ms=20, acks="all")
    await producer.start()
    rng = random.Random(7)
    try:
        started = time.perf_counter()
        futures = []
        for i in range(EARN_COMMANDS):
            data = EarnPoints(
                command_id=f"bench-{tenant}-{i}",
                customer_id=f"cust-{i % CUSTOMERS:05d}",  # every customer gets points
                member_id="buyer-1",
                points=rng.randint(50, 500),
                source_event_id=f"evt-{i}",
                ruleset_id="bench",
                ruleset_version=1,
            )
            event = make_event("points.earn", data, tenant_id=tenant, source="bench")
            futures.append(await producer.send(settings.topic(POINTS_COMMANDS), event.to_bytes(), key=event.key))
        await asyncio.gather(*futures)
        print(f"  produced {EARN_COMMANDS} earn commands in {time.perf_counter() - started:.1f} s")
    finally:
        await producer.stop()

    async with Runtime(settings, api_keys=api_keys, consumers=[commands_consumer]) as runtime:
        start_background(settings, runtime)
        runner = runtime.consumers[0]
        cpu = CpuMeter([]).__enter__()  # this process (consumer and relay) and PostgreSQL
        started = time.perf_counter()
        first_at, first_count = 0.0, 0
        while runner.processed < EARN_COMMANDS:
            await asyncio.sleep(0.05)
            if not first_at and runner.processed:
                # The group join takes seconds; the rate is measured from the first applied batch on.
                first_at, first_count = time.perf_counter(), runner.processed
        ended = time.perf_counter()
        # The relay ran alongside; let it finish, so the REST phases do not compete with its backlog.
        await wait_for_empty_outbox(runtime)
        drained = time.perf_counter()
        cpu.__exit__()
    steady = (EARN_COMMANDS - first_count) / (ended - first_at)
    print(f"  consumed all {EARN_COMMANDS} in {ended - started:.1f} s including the consumer group join")
    print(f"  earn commands applied: {steady:,.0f}/s  ->  ledger entries posted: {2 * steady:,.0f}/s")
    print("  (each earn posts 2 entries: customer credit + issuance debit; plus a lot and 2 outbox rows)")
    print(f"  outbox relayed every entry to Kafka {drained - started:.1f} s after the consumer started")
    cpu.report(EARN_COMMANDS, "earn command (consumer and relay run in the bench process)")


async def wait_for_empty_outbox(runtime: Runtime) -> None:
    while True:
        async with runtime.sessionmaker() as session:
            if not await LedgerRepository.from_session(session).outbox_size():
                return
        await asyncio.sleep(0.2)


def start_server(settings: Settings, port: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(
        {
            "LEDGER_DATABASE_URL": settings.database_url,
            "LEDGER_TOPIC_NAMESPACE": settings.topic_namespace,
            "LEDGER_CONSUMERS_ENABLED": "false",
            "LEDGER_TASKS_ENABLED": "false",
            "LEDGER_LOG_LEVEL": "WARNING",
            "LEDGER_DATABASE_POOL_SIZE": str(POOL_SIZE),
        }
    )
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "ledger.app:create_app",
        "--port",
        str(port),
        "--no-access-log",
        # uvloop and httptools (pinned in requirements.lock): a cheaper event loop and HTTP parser.
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--log-level",
        "warning",
    ]
    return subprocess.Popen(command, env=env, cwd=ROOT)


async def wait_ready(port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            conn = await Connection.open(port)
            status, _ = await conn.request("GET", "/readyz", {})
            conn.close()
            if status == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.3)
    raise RuntimeError("the ledger server did not become ready")


async def open_loop(
    rate: int, seconds: int, servers: list[int], send: Callable[[Connection, int], Awaitable[int]]
) -> tuple[list[float], dict[int, int], float, CpuMeter]:
    """Sends `rate` requests a second for `seconds` over 64 keep-alive connections, open loop: they go out
    on schedule whether or not earlier ones have returned. Returns latencies (ms), statuses, the elapsed
    time and the CPU meter."""
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for i in range(64):
        pool.put_nowait(await Connection.open(PORTS[i % len(PORTS)]))
    latencies: list[float] = []
    statuses: dict[int, int] = {}

    async def one(i: int) -> None:
        conn = await pool.get()
        sent = time.perf_counter()
        status = await send(conn, i)
        latencies.append((time.perf_counter() - sent) * 1000)
        statuses[status] = statuses.get(status, 0) + 1
        pool.put_nowait(conn)

    total = rate * seconds
    tasks = []
    with CpuMeter(servers) as cpu:
        start = time.perf_counter()
        for i in range(total):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    while not pool.empty():
        pool.get_nowait().close()
    return latencies, statuses, elapsed, cpu


def print_latencies(latencies: list[float]) -> None:
    print(
        f"  latency p50 {statistics.median(latencies):.1f} ms, p90 {pct(latencies, 0.90):.1f} ms, "
        f"p99 {pct(latencies, 0.99):.1f} ms, max {max(latencies):.1f} ms"
    )


async def redeem_latency(token: str, rate: int, servers: list[int], *, report: bool = True) -> None:
    rng = random.Random(11)

    async def send(conn: Connection, i: int) -> int:
        body = json.dumps({"points": 1, "reference": f"order-{i}"}).encode()
        headers = {
            "X-API-Key": token,
            "Idempotency-Key": f"bench-redeem-{uuid.uuid4()}",
            "Content-Type": "application/json",
        }
        status, _ = await conn.request(
            "POST", f"/v1/accounts/cust-{rng.randrange(CUSTOMERS):05d}/redeem", headers, body
        )
        return status

    seconds = REDEEM_SECONDS if report else WARMUP_SECONDS
    latencies, statuses, elapsed, cpu = await open_loop(rate, seconds, servers, send)
    if not report:
        return
    total = rate * seconds
    print(f"  {total} redeems at {rate} req/s offered ({total / elapsed:.0f} req/s achieved), statuses {statuses}")
    print_latencies(latencies)
    cpu.report(total, "redeem")


async def closed_reads(token: str, servers: list[int], path: Callable[[random.Random], str], what: str) -> None:
    """GETs `path(rng)` over `READ_CONNECTIONS` keep-alive connections for `READ_SECONDS`, closed loop."""
    count = 0
    stop = time.perf_counter() + READ_SECONDS
    errors = 0

    async def worker(seed: int) -> None:
        nonlocal count, errors
        rng = random.Random(seed)
        conn = await Connection.open(PORTS[seed % len(PORTS)])
        try:
            while time.perf_counter() < stop:
                status, _ = await conn.request("GET", path(rng), {"X-API-Key": token})
                count += 1
                errors += status != 200
        finally:
            conn.close()

    with CpuMeter(servers) as cpu:
        started = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(READ_CONNECTIONS)))
        elapsed = time.perf_counter() - started
    print(f"  {count / elapsed:,.0f} {what}s/s with {READ_CONNECTIONS} connections ({errors} errors)")
    cpu.report(count, what)


async def balance_reads(token: str, servers: list[int]) -> None:
    await closed_reads(token, servers, lambda rng: f"/v1/accounts/cust-{rng.randrange(CUSTOMERS):05d}", "balance read")


async def setup_rewards(admin: str) -> None:
    """A catalogue of `CATALOGUE_REWARDS` rewards with the terms a listing evaluates; "bench-voucher" (1 point,
    no stock) and "bench-gift" (1 point, a stock of a billion) are the ones redeemed."""
    conn = await Connection.open(PORTS[0])
    headers = {"X-API-Key": admin, "Content-Type": "application/json"}
    try:
        body = json.dumps({"tiers": ["silver", "gold", "platinum"], "point_value": "0.01", "currency": "EUR"})
        status, text = await conn.request("PUT", "/v1/reward-settings", headers, body.encode())
        assert status == 200, text
        rewards = [
            {"reward_id": "bench-gift", "name": "Gift", "kind": "gift", "points": 1, "stock": 10**9},
            {"reward_id": "bench-voucher", "name": "Voucher", "kind": "gift", "points": 1},
        ]
        for i in range(CATALOGUE_REWARDS - 2):
            reward: dict[str, object] = {"reward_id": f"r-{i:02d}", "name": f"Reward {i}", "points": 50 + 25 * i}
            reward["kind"] = ("gift", "privilege", "discount", "coupon")[i % 4]
            if reward["kind"] == "privilege":
                reward["duration_days"] = 90
            if i % 3 == 0:
                reward["min_tier"] = "gold"
            if i % 5 == 0:
                reward.update(limit_count=2, limit_period="month")
            if i % 7 == 0:
                reward["stock"] = 100
            rewards.append(reward)
        for reward in rewards:
            status, text = await conn.request("POST", "/v1/rewards", headers, json.dumps(reward).encode())
            assert status == 201, text
    finally:
        conn.close()


async def redemption_latency(
    token: str, rate: int, servers: list[int], *, reward: str = "bench-voucher", report: bool = True
) -> None:
    rng = random.Random(13)

    async def send(conn: Connection, i: int) -> int:
        body = json.dumps({"customer_id": f"cust-{rng.randrange(CUSTOMERS):05d}", "reward_id": reward}).encode()
        headers = {"X-API-Key": token, "Idempotency-Key": f"bench-{uuid.uuid4()}", "Content-Type": "application/json"}
        status, _ = await conn.request("POST", "/v1/redemptions", headers, body)
        return status

    seconds = REDEEM_SECONDS if report else WARMUP_SECONDS
    latencies, statuses, elapsed, cpu = await open_loop(rate, seconds, servers, send)
    if not report:
        return
    total = rate * seconds
    print(f"  {reward}: {total} redemptions at {rate} req/s offered ({total / elapsed:.0f} req/s achieved)")
    print(f"  statuses {statuses}")
    print_latencies(latencies)
    cpu.report(total, "redemption")


async def catalogue_reads(token: str, servers: list[int]) -> None:
    await closed_reads(
        token, servers, lambda rng: f"/v1/customers/cust-{rng.randrange(CUSTOMERS):05d}/rewards", "catalogue listing"
    )


async def settle(settings: Settings) -> None:
    """Vacuums and analyzes what the earlier phases wrote, so the next phase measures the service rather than
    autovacuum catching up with them (its analyze of the entries and commands took a core for ~2 s, on two
    cores). As the tables' owner: the service role may not vacuum them (PostgreSQL skips them with a warning)."""
    tables = "ledger.outbox, ledger.balances, ledger.lots, ledger.entries, ledger.commands, ledger.idempotency_keys"
    owner = create_engine(settings.migration_url, pool_size=1)
    try:
        async with owner.connect() as conn:
            autocommit = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await autocommit.execute(text(f"VACUUM (ANALYZE) {tables}"))
    finally:
        await owner.dispose()


async def main() -> None:
    namespace = f"bench{uuid.uuid4().hex[:6]}."
    tenant = f"bench-{uuid.uuid4().hex[:8]}"
    base = Settings()
    # No TLS on the loopback connection to PostgreSQL: asyncpg would otherwise negotiate it (`prefer`).
    dsn = base.database_url if "?" in base.database_url else f"{base.database_url}?ssl=disable"
    settings = Settings(
        database_url=dsn,
        topic_namespace=namespace,
        consumer_group_suffix=f"-{namespace}",
        consumer_batch_size=BATCH,
        consumer_batch_timeout_ms=100,
        tasks_enabled=False,
        log_level="WARNING",
    )
    specs = [replace(t, name=settings.topic(t.name)) for t in ALL_TOPICS]
    await ensure_topics(settings.kafka_bootstrap_servers, specs, partitions_override=6)
    print(f"ledger benchmark: tenant {tenant}, topics {namespace}*, {os.cpu_count()} cores")
    servers: list[subprocess.Popen[bytes]] = []
    try:
        print(f"[1] earn commands from Kafka (batches of up to {BATCH} commands per DB transaction)")
        await earn_from_kafka(settings, tenant)

        await settle(settings)
        engine = create_engine(settings.database_url, pool_size=1)
        key = generate_key()
        await store_key(engine, api_keys, key, tenant_id=tenant, name="bench", scopes=["points:read", "points:write"])
        admin = generate_key()
        await store_key(engine, api_keys, admin, tenant_id=tenant, name="bench-admin", scopes=["admin"])
        await engine.dispose()
        # The load generator's own collector pauses would show as the servers' latency: what setup built is
        # moved out of its generations (as the services do at start-up, shared/runtime.py).
        gc.collect()
        gc.freeze()

        # Two single-worker replicas (what a load balancer would spread over), one per core; the client
        # spreads its keep-alive connections over both.
        print(f"[2] REST redeem, {len(PORTS)} uvicorn replicas in subprocesses, {REDEEM_SECONDS} s open loop")
        servers = [start_server(settings, port) for port in PORTS]
        for port in PORTS:
            await wait_ready(port)
        pids = [server.pid for server in servers]
        # Warm-up at the highest rate measured: every pooled connection prepares its statements (asyncpg
        # caches them per connection) and PostgreSQL settles after the bulk load, so the figures are the
        # steady state rather than the first seconds after a start.
        if REDEEM_RATES:
            await redeem_latency(key.token, max(REDEEM_RATES), pids, report=False)
        for rate in REDEEM_RATES:
            await redeem_latency(key.token, rate, pids)

        print(f"[3] balance reads, {READ_SECONDS} s closed loop")
        await balance_reads(key.token, pids)

        print(f"[4] rewards: POST redemption at {REDEMPTION_RATE} req/s, then the catalogue for one customer")
        await settle(settings)
        await setup_rewards(admin.token)
        await redemption_latency(key.token, REDEMPTION_RATE, pids, report=False)
        await redemption_latency(key.token, REDEMPTION_RATE, pids)
        await redemption_latency(key.token, REDEMPTION_RATE, pids, reward="bench-gift")
        await catalogue_reads(key.token, pids)
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(timeout=30)
        await delete_topics(settings.kafka_bootstrap_servers, [s.name for s in specs])


if __name__ == "__main__":
    # Migrations run as the owner role; the service role gets its rows (as `loyalty migrate` does).
    owner = Settings()
    upgrade(str(ROOT / "services" / "ledger" / "alembic.ini"), owner.migration_url, service_role=owner.service_role)
    # The same event loop as the service gets from uvicorn (`--loop auto` picks uvloop when installed):
    # the Kafka phase runs the real consumer and relay in this process, and the load generator gets cheaper.
    uvloop.run(main())
