"""A consumer stalled by a real infrastructure fault shows on `/readyz` (503 naming it) and in its
metrics, retries without dead-lettering or skipping anything, and is ready again once the fault clears.

The fault: the handler's database connections go through a TCP proxy to the real PostgreSQL, which the
test breaks (open connections dropped, new ones hung up on) and mends. PostgreSQL itself keeps running.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from fastapi import FastAPI
from prometheus_client import REGISTRY
from sqlalchemy import text

from rules.models import api_keys
from shared.consumer import ConsumerRunner, Inbound, Rejection
from shared.db import create_engine
from shared.kafka import EventProducer, ensure_topics
from shared.runtime import Runtime, State, base_app
from shared.topics import DLQ, TopicSpec
from tests.conftest import KAFKA, database_url, eventually, running_app, service_settings, topic
from tests.factories import purchase
from tests.shared.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.kafka, pytest.mark.db]


class TestOutage:
    async def test_readyz_is_503_while_a_consumer_is_stalled_by_a_database_outage_and_200_after(
        self, raw_producer: AIOKafkaProducer, kafka_topics: list[str], tenant: str
    ) -> None:
        proxy = TcpProxy("127.0.0.1", 5432)
        await proxy.start()
        engine = create_engine(database_url("rules").replace(":5432/", f":{proxy.port}/"), pool_size=1)
        name = f"outage-{tenant}.v1"
        await ensure_topics(KAFKA, [TopicSpec(topic(name), 1)])
        applied: list[str] = []

        async def handler(batch: Sequence[Inbound[Any]]) -> Sequence[Rejection]:
            async with engine.begin() as conn:
                await conn.execute(text("select 1"))
            applied.extend(m.event.id for m in batch)
            return []

        settings = service_settings(
            "rules",
            service_name=f"outage-{tenant}",
            consumer_batch_size=2,  # batches behind the failing one are fetched ahead: the rewind drops them
            consumer_unready_after_failures=2,
            consumer_retry_backoff_seconds=0.05,
            consumer_retry_backoff_max_seconds=0.5,
        )

        def consumer(runtime: Runtime) -> ConsumerRunner:
            return runtime.make_consumer(group=f"outage-{tenant}", topics=[name], handler=handler)

        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[State]:
            async with Runtime(settings, api_keys=api_keys, consumers=[consumer]) as runtime:
                yield runtime.state()

        app = base_app(title="outage", description="", version="0", settings=settings, lifespan=lifespan)
        events = [purchase(tenant, "c-1") for _ in range(5)]
        check = f"consumer:outage-{tenant}"
        labels = {"service": f"outage-{tenant}", "group": f"outage-{tenant}"}
        try:
            # Broken from the start: the first batch of a partition without a committed offset fails.
            proxy.break_()
            for event in events:
                await raw_producer.send_and_wait(topic(name), event.to_bytes(), key=event.key)
            async with running_app(app) as client:
                stalled = await eventually(lambda: _readyz(client, 503))
                assert stalled["checks"][check].startswith("stalled: ")
                assert stalled["checks"]["database"] == "ok", "the service's own database is fine"
                assert check in stalled["detail"]
                assert (REGISTRY.get_sample_value("consumer_consecutive_failures", labels) or 0) >= 2
                assert applied == [], "nothing applied during the outage"

                proxy.mend()
                ready = await eventually(lambda: _readyz(client, 200))
                assert ready["checks"][check] == "ok"
                # The batch was read again from its first offset, not skipped, and nothing was dead-lettered.
                await eventually(lambda: applied == [e.id for e in events])
                assert REGISTRY.get_sample_value("consumer_consecutive_failures", labels) == 0
        finally:
            await proxy.stop()
            await engine.dispose()


async def _readyz(client: Any, status: int) -> dict[str, Any] | None:
    response = await client.get("/readyz")
    return dict(response.json()) if response.status_code == status else None


class HangingHandler:
    """Hangs on each batch until released, like a database that stopped answering."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.applied: list[str] = []

    async def __call__(self, batch: Sequence[Inbound[Any]]) -> Sequence[Rejection]:
        await self.release.wait()
        self.applied.extend(m.event.id for m in batch)
        return []


class TestHang:
    async def test_a_batch_without_progress_for_the_threshold_makes_the_consumer_unhealthy(
        self, raw_producer: AIOKafkaProducer, kafka_topics: list[str], tenant: str
    ) -> None:
        name = topic(f"hang-{tenant}.v1")
        await ensure_topics(KAFKA, [TopicSpec(name, 1)])
        producer = EventProducer(KAFKA, client_id="test-hang")
        await producer.start()
        handler = HangingHandler()
        runner = ConsumerRunner(
            service="test-hang",
            topics=[name],
            group_id=f"hang-{tenant}",
            bootstrap_servers=KAFKA,
            handler=handler,
            dlq_producer=producer,
            dlq_topic=topic(DLQ),
            batch_timeout_ms=50,
            stall_after_s=0.5,
        )
        event = purchase(tenant, "c-1")
        try:
            await runner.start()
            await eventually(lambda: runner.health() is None)
            await raw_producer.send_and_wait(name, event.to_bytes(), key=event.key)
            problem = await eventually(runner.health)
            assert problem.startswith("stalled: no progress for")
            handler.release.set()
            await eventually(lambda: handler.applied == [event.id])
            await eventually(lambda: runner.health() is None)
        finally:
            await runner.stop()
            await producer.stop()
        assert runner.health() == "stopped"
