"""Test fixtures: the real Kafka broker and PostgreSQL that `make test` starts, isolated per run.

Each test session gets its own topic namespace (fresh topics, deleted at the end) and migrates the
`*_test` databases; tests isolate their data by using a fresh tenant id.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from sqlalchemy.engine import make_url

from shared.auth import generate_key, store_key
from shared.consumer import DeadLetter
from shared.db import create_engine
from shared.kafka import delete_topics, ensure_topics
from shared.migrations import upgrade
from shared.topics import ALL_TOPICS, DLQ

ROOT = Path(__file__).resolve().parent.parent
KAFKA = os.environ.get("LOYALTY_TEST_KAFKA", "127.0.0.1:9092")
PG = os.environ.get("LOYALTY_TEST_PG", "postgresql+asyncpg://loyalty:loyalty@127.0.0.1:5432")
# Migrations run as the owner role (deploy/postgres/db-up.sh creates it); the tests connect as the service role.
PG_OWNER = os.environ.get("LOYALTY_TEST_PG_OWNER", "postgresql+asyncpg://loyalty_owner:loyalty_owner@127.0.0.1:5432")
DB_SUFFIX = os.environ.get("LOYALTY_TEST_DB_SUFFIX", "_test")
NAMESPACE = f"t{uuid.uuid4().hex[:8]}."


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests that stop shared infrastructure run last, so they cannot disturb the others.
    items.sort(key=lambda item: item.get_closest_marker("disruptive") is not None)


def database_url(service: str) -> str:
    return f"{PG}/loyalty_{service}{DB_SUFFIX}"


def owner_url(service: str) -> str:
    return f"{PG_OWNER}/loyalty_{service}{DB_SUFFIX}"


def service_settings(service: str, **overrides: Any) -> Any:
    module = __import__(f"{service}.config", fromlist=["Settings"])
    values: dict[str, Any] = {
        "environment": "test",
        "database_url": database_url(service),
        "kafka_bootstrap_servers": KAFKA,
        "topic_namespace": NAMESPACE,
        "topic_partitions": 3,
        "consumer_batch_timeout_ms": 50,
        "api_key_cache_seconds": 0,
        # The ledger's anchoring signs every chain head of the test database at start-up: only where tested.
        "anchors_enabled": False,
        "log_level": "WARNING",
    }
    if service == "metrics":
        # The KPI gauges' refresh reads up to 50 tenants of the shared test database at every app start: only
        # the tests of the gauges turn it on.
        values["kpi_gauges_enabled"] = False
    values.update(overrides)
    return module.Settings(**values)


def topic(name: str) -> str:
    return f"{NAMESPACE}{name}"


@pytest.fixture(scope="session", autouse=True)
def _migrated() -> None:
    for service in ("ledger", "rules", "metrics"):
        role = make_url(database_url(service)).username
        upgrade(str(ROOT / "services" / service / "alembic.ini"), owner_url(service), service_role=role)


@pytest.fixture(scope="session")
async def kafka_topics() -> AsyncIterator[list[str]]:
    specs = [replace(t, name=topic(t.name)) for t in ALL_TOPICS]
    await ensure_topics(KAFKA, specs, partitions_override=3)
    yield [s.name for s in specs]
    try:
        await delete_topics(KAFKA, [s.name for s in specs])
    except Exception as exc:  # a cleanup failure must not fail the run
        print(f"could not delete test topics: {exc!r}")


@pytest.fixture
def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
async def raw_producer(kafka_topics: list[str]) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(
        bootstrap_servers=KAFKA, enable_idempotence=True, acks="all", max_request_size=4 * 1024 * 1024
    )
    await producer.start()
    yield producer
    await producer.stop()


@asynccontextmanager
async def running_app(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


async def create_api_key(service: str, tenant_id: str, scopes: Sequence[str]) -> str:
    module = __import__(f"{service}.models", fromlist=["api_keys"])
    engine = create_engine(database_url(service), pool_size=1)
    key = generate_key()
    try:
        await store_key(engine, module.api_keys, key, tenant_id=tenant_id, name="test", scopes=list(scopes))
    finally:
        await engine.dispose()
    return key.token


async def eventually(check: Callable[[], Any], *, timeout_s: float = 30.0, interval_s: float = 0.2) -> Any:
    """Polls an async or sync check until it returns a truthy value; fails with the last value."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    last: Any = None
    while asyncio.get_running_loop().time() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s}s; last value: {last!r}")


async def read_topic(
    name: str, *, until: Callable[[list[ConsumerRecord[bytes, bytes]]], bool], timeout_s: float = 30.0
) -> list[ConsumerRecord[bytes, bytes]]:
    """Reads a topic from the beginning until `until(records)` holds."""
    # Without a group id the consumer takes every partition and, with "earliest", starts at the beginning.
    consumer = AIOKafkaConsumer(
        name,
        bootstrap_servers=KAFKA,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        records: list[ConsumerRecord[bytes, bytes]] = []
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not until(records):
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{name}: condition not met within {timeout_s}s; read {len(records)} records")
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
        return records
    finally:
        await consumer.stop()


async def dead_letters_for(marker: bytes, count: int = 1) -> list[DeadLetter]:
    """The DLQ records whose original bytes contain `marker` (a test's unique tag)."""

    def matching(records: list[ConsumerRecord[bytes, bytes]]) -> list[DeadLetter]:
        return [DeadLetter.from_record(r) for r in records if r.value is not None and marker in r.value]

    records = await read_topic(topic(DLQ), until=lambda rs: len(matching(rs)) >= count)
    return matching(records)
