"""The consumer runner against the real broker and database, through the rules service's real path
(purchases counted per customer)."""

from __future__ import annotations

import asyncio
import gc
import json
import uuid
from collections.abc import Sequence
from typing import Any, cast

import httpx
import pytest
from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from rules.app import create_app
from rules.models import CustomerState, Order
from rules.service import rules_service
from shared.consumer import ConsumerRunner, DeadRecord, Inbound, Rejection
from shared.db import create_engine, create_sessionmaker, transaction
from shared.kafka import EventProducer, ensure_topics
from shared.topics import DLQ, PURCHASES, TopicSpec
from tests.conftest import (
    KAFKA,
    create_api_key,
    dead_letters_for,
    eventually,
    running_app,
    service_settings,
    topic,
)
from tests.factories import purchase
from tests.shared.memory_feed import MemoryFeed

pytestmark = [pytest.mark.kafka, pytest.mark.db]


async def purchase_count(client: httpx.AsyncClient, key: str, customer: str) -> int:
    response = await client.get(f"/v1/customers/{customer}/state", headers={"X-API-Key": key})
    return int(response.json()["purchase_count"]) if response.status_code == 200 else 0


class TestConsumeAndDeadLetter:
    async def test_valid_event_has_visible_effect(self, raw_producer: AIOKafkaProducer, tenant: str) -> None:
        key = await create_api_key("rules", tenant, ["points:read"])
        async with running_app(create_app(service_settings("rules", consumer_group_suffix=f"-{tenant}"))) as client:
            for _ in range(3):
                event = purchase(tenant, "c-1")
                await raw_producer.send_and_wait(topic(PURCHASES), event.to_bytes(), key=event.key)
            assert await eventually(lambda: _count_is(client, key, "c-1", 3))

    async def test_bad_input_goes_to_dlq_and_consumer_keeps_going(
        self, raw_producer: AIOKafkaProducer, tenant: str
    ) -> None:
        key = await create_api_key("rules", tenant, ["points:read"])
        marker = uuid.uuid4().hex
        garbage = b"\x00\x01 not json " + marker.encode()
        wrong = json.loads(purchase(tenant, "c-2").to_bytes())
        wrong["data"]["currency"] = 42
        wrong["source"] = f"tests/{marker}"
        oversized = json.loads(purchase(tenant, "c-2").to_bytes())
        oversized["source"] = f"tests/{marker}/" + "x" * 300_000
        async with running_app(create_app(service_settings("rules", consumer_group_suffix=f"-{tenant}"))) as client:
            for value in (garbage, json.dumps(wrong).encode(), json.dumps(oversized).encode()):
                await raw_producer.send_and_wait(
                    topic(PURCHASES), value, key=f"{tenant}:c-2".encode(), headers=[("origin", b"test")]
                )
            after = purchase(tenant, "c-2")
            await raw_producer.send_and_wait(topic(PURCHASES), after.to_bytes(), key=after.key)
            # The valid event behind the three bad ones on the same partition is still consumed.
            assert await eventually(lambda: _count_is(client, key, "c-2", 1))
            # Read while the service runs: the good event's effect commits before the batch's dead
            # letters are sent (they are only guaranteed before its offsets are committed).
            letters = await dead_letters_for(marker.encode(), count=3)

        by_value = {letter.value: letter for letter in letters}
        assert by_value[garbage].reason.startswith("not JSON")
        assert "data.currency" in by_value[json.dumps(wrong).encode()].reason
        assert "exceeds the limit of 262144 bytes" in by_value[json.dumps(oversized).encode()].reason
        for letter in letters:
            assert letter.source_topic == topic(PURCHASES)
            assert letter.source_offset >= 0
            assert letter.headers["origin"] == b"test", "the original headers travel with the dead letter"
            assert letter.key == f"{tenant}:c-2".encode()


async def fresh_topic(name: str) -> str:
    """A topic of its own, so a test's consumer sees only the test's messages."""
    full = topic(f"{name}.v1")
    await ensure_topics(KAFKA, [TopicSpec(full, 3)])
    return full


async def _count_is(client: httpx.AsyncClient, key: str, customer: str, expected: int) -> bool:
    return await purchase_count(client, key, customer) == expected


class _SimulatedCrash(BaseException):
    """A BaseException, like the process being killed: nothing in the runner may absorb it."""


class CrashBeforeOffsetCommit(ConsumerRunner):
    """Dies after the handler's effect is committed but before the offsets are: the worst moment."""

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        raise _SimulatedCrash


class TestRestart:
    async def test_restart_mid_stream_processes_nothing_twice(
        self, raw_producer: AIOKafkaProducer, kafka_topics: list[str], tenant: str
    ) -> None:
        settings = service_settings("rules")
        engine = create_engine(settings.database_url, pool_size=2)
        sessionmaker = create_sessionmaker(engine)
        producer = EventProducer(KAFKA, client_id="test-restart")
        await producer.start()
        group = f"restart-{tenant}"
        source = await fresh_topic(f"restart-{tenant}")

        async def handler(batch: Sequence[Inbound[Any]]) -> Sequence[Rejection]:
            async with transaction(sessionmaker) as session:
                return await rules_service.handle_batch(session, batch)

        def runner(cls: type[ConsumerRunner]) -> ConsumerRunner:
            return cls(
                service="rules",
                topics=[source],
                group_id=group,
                bootstrap_servers=KAFKA,
                handler=handler,
                dlq_producer=producer,
                dlq_topic=topic(DLQ),
                batch_timeout_ms=50,
                batch_size=10,
            )

        async def total() -> int:
            async with sessionmaker() as session:
                stmt = select(func.coalesce(func.sum(CustomerState.purchase_count), 0)).where(
                    CustomerState.tenant_id == tenant
                )
                return int((await session.execute(stmt)).scalar_one())

        events = [purchase(tenant, f"c-{i % 4}") for i in range(40)]
        try:
            for event in events:
                await raw_producer.send(source, event.to_bytes(), key=event.key)
            await raw_producer.flush()

            crashing = runner(CrashBeforeOffsetCommit)
            await crashing.start()
            await eventually(lambda: not crashing.running)
            await crashing.stop()
            applied_before_crash = await total()
            assert applied_before_crash > 0, "the crash came after the effect was durable"

            healthy = runner(ConsumerRunner)
            await healthy.start()
            try:
                await eventually(lambda: _equals(total(), len(events)))
                await asyncio.sleep(1.0)  # let any redelivery land before the final check
                assert await total() == len(events)
            finally:
                await healthy.stop()
            # Purchases are recorded by their order rows (no tracking row): one per event, none twice.
            async with sessionmaker() as session:
                recorded = (
                    (
                        await session.execute(
                            select(Order.event_id).where(
                                Order.tenant_id == tenant, Order.event_id.in_([e.id for e in events])
                            )
                        )
                    )
                    .scalars()
                    .all()
                )
            assert sorted(recorded) == sorted(e.id for e in events)
        finally:
            await producer.stop()
            await engine.dispose()


async def _equals(value: object, expected: int) -> bool:
    assert asyncio.iscoroutine(value)
    return bool(await value == expected)


class TestPoisonMessage:
    async def test_handler_failing_on_one_message_dead_letters_only_that_one(
        self, raw_producer: AIOKafkaProducer, kafka_topics: list[str], tenant: str
    ) -> None:
        source = await fresh_topic(f"poison-{tenant}")
        producer = EventProducer(KAFKA, client_id="test-poison")
        await producer.start()
        seen: list[str] = []
        poison = purchase(tenant, "c-poison")

        async def handler(batch: Sequence[Inbound[Any]]) -> Sequence[Rejection]:
            if any(m.event.id == poison.id for m in batch):
                raise ValueError("cannot handle this one")
            seen.extend(m.event.id for m in batch)
            return []

        runner = ConsumerRunner(
            service="test",
            topics=[source],
            group_id=f"poison-{tenant}",
            bootstrap_servers=KAFKA,
            handler=handler,
            dlq_producer=producer,
            dlq_topic=topic(DLQ),
            batch_timeout_ms=50,
            retry_backoff_s=0.01,
        )
        good = [purchase(tenant, "c-poison") for _ in range(5)]
        try:
            for event in [*good[:2], poison, *good[2:]]:
                await raw_producer.send(source, event.to_bytes(), key=event.key)
            await raw_producer.flush()
            await runner.start()
            await eventually(lambda: all(e.id in seen for e in good))
            letters = await dead_letters_for(poison.id.encode())
            assert "handler failed 3 times" in letters[0].reason
            assert "cannot handle this one" in letters[0].reason
            assert runner.running
        finally:
            await runner.stop()
            await producer.stop()


class SlowHandler:
    """Takes `seconds` over each batch; `started` is set as the first one comes in."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = asyncio.Event()
        self.finished: list[str] = []

    async def __call__(self, batch: Sequence[Inbound[Any]]) -> Sequence[Rejection]:
        self.started.set()
        await asyncio.sleep(self.seconds)
        self.finished.extend(m.event.id for m in batch)
        return []


async def _stop_mid_batch(
    raw_producer: AIOKafkaProducer, name: str, handler: SlowHandler, events: int, grace_s: float
) -> tuple[ConsumerRunner, str, list[str], float]:
    """Runs a consumer of a fresh topic holding `events` purchases and stops it while `handler` works on
    the first batch; returns the runner, the topic, the event ids in topic order and how long stop() took."""
    source = await fresh_topic(name)
    producer = EventProducer(KAFKA, client_id=f"test-{name}")
    await producer.start()
    runner = ConsumerRunner(
        service="test",
        topics=[source],
        group_id=name,
        bootstrap_servers=KAFKA,
        handler=handler,
        dlq_producer=producer,
        dlq_topic=topic(DLQ),
        batch_timeout_ms=50,
    )
    sent = [purchase("t-stop", "c-stop") for _ in range(events)]
    try:
        for event in sent:
            await raw_producer.send(source, event.to_bytes(), key=event.key)
        await raw_producer.flush()
        await runner.start()
        await asyncio.wait_for(handler.started.wait(), 30)
        began = asyncio.get_running_loop().time()
        await runner.stop(grace_s=grace_s)
        return runner, source, [e.id for e in sent], asyncio.get_running_loop().time() - began
    finally:
        await producer.stop()


class TestStop:
    async def test_a_batch_in_flight_is_finished_and_committed(
        self, raw_producer: AIOKafkaProducer, kafka_topics: list[str], tenant: str
    ) -> None:
        handler = SlowHandler(0.5)
        _, source, ids, _ = await _stop_mid_batch(raw_producer, f"stop-{tenant}", handler, events=3, grace_s=10)
        assert handler.finished, "the batch in flight ran to its end"
        assert handler.finished == ids[: len(handler.finished)]
        assert await committed_offset(f"stop-{tenant}", source) == len(handler.finished), "and its offsets too"

    async def test_a_handler_that_never_settles_is_cancelled_after_the_grace_period(
        self, raw_producer: AIOKafkaProducer, kafka_topics: list[str], tenant: str
    ) -> None:
        handler = SlowHandler(3600)
        runner, source, _, took = await _stop_mid_batch(raw_producer, f"hang-{tenant}", handler, events=1, grace_s=0.3)
        assert took < 5
        assert not runner.running
        assert handler.finished == []
        assert await committed_offset(f"hang-{tenant}", source) is None, "nothing settled, nothing committed"


async def committed_offset(group: str, name: str) -> int | None:
    """The group's committed offsets on the topic, summed; None when it committed none."""
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    found = [meta.offset for tp, meta in offsets.items() if tp.topic == name and meta.offset >= 0]
    return sum(found) if found else None


class _GcProbe(ConsumerRunner):
    """Records whether the cyclic collector runs while a batch is processed; optionally fails."""

    def __init__(self, fail: bool) -> None:
        super().__init__(
            service="test",
            topics=["unused"],
            group_id="gc-probe",
            bootstrap_servers=KAFKA,
            handler=_no_rejections,
            dlq_producer=cast(Any, None),
            feed=MemoryFeed("unused"),  # never started: no client to leave open
        )
        self.fail = fail
        self.enabled_during: list[bool] = []

    async def _process(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
        self.enabled_during.append(gc.isenabled())
        if self.fail:
            raise RuntimeError("the batch failed")


async def _no_rejections(batch: Sequence[Inbound[Any]]) -> Sequence[Rejection]:
    return []


class TestCollectorPause:
    @pytest.mark.parametrize("fail", [False, True], ids=["batch-done", "batch-failed"])
    async def test_the_collector_pauses_for_a_batch_and_resumes_after_it(self, fail: bool) -> None:
        probe = _GcProbe(fail)
        assert gc.isenabled()
        if fail:
            with pytest.raises(RuntimeError):
                await probe.process([])
        else:
            await probe.process([])
        assert probe.enabled_during == [False]
        assert gc.isenabled()


class _Settled(ConsumerRunner):
    """A runner whose dead letters and offset commits are recorded instead of sent (no broker needed)."""

    def __init__(self, service: str, handler: Any) -> None:
        super().__init__(
            service=service,
            topics=["unused"],
            group_id="settled",
            bootstrap_servers=KAFKA,
            handler=handler,
            dlq_producer=cast(Any, None),
            feed=MemoryFeed("unused"),
        )
        self.dead: list[DeadRecord] = []
        self.committed: list[dict[TopicPartition, int]] = []

    async def _dead_letter(self, dead: Sequence[DeadRecord]) -> None:
        self.dead.extend(dead)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.committed.append(offsets)


def _record(topic_name: str, partition: int, offset: int, value: bytes) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(topic_name, partition, offset, 0, 0, None, value, None, 0, len(value), ())


class TestBatchSettlement:
    async def test_offsets_per_partition_and_outcomes_per_topic(self) -> None:
        service = f"settle-{uuid.uuid4().hex[:8]}"  # metric labels of this test alone
        refused = purchase("t1", "c-refused")

        async def handler(batch: Sequence[Inbound[Any]]) -> Sequence[Rejection]:
            return [Rejection(m, "refused") for m in batch if m.event.id == refused.id]

        runner = _Settled(service, handler)
        good = [purchase("t1", f"c-{i}").to_bytes() for i in range(4)]
        # Two topics, partitions interleaved and out of offset order, as records of several fetches may come.
        records = [
            _record("a", 1, 7, good[0]),
            _record("a", 0, 12, good[1]),
            _record("a", 1, 5, b"not json"),
            _record("b", 0, 3, refused.to_bytes()),
            _record("a", 0, 10, good[2]),
            _record("b", 0, 2, good[3]),
        ]
        await runner._process(records)
        assert runner.committed == [{TopicPartition("a", 0): 13, TopicPartition("a", 1): 8, TopicPartition("b", 0): 4}]
        assert sorted((r.topic, r.offset, code, reason.split(":")[0]) for r, code, reason in runner.dead) == [
            ("a", 5, "not_json", "not JSON"),
            ("b", 3, "refused", "refused"),
        ]
        counts = {
            (t, outcome): REGISTRY.get_sample_value(
                "consumer_messages_total", {"service": service, "topic": t, "outcome": outcome}
            )
            for t in "ab"
            for outcome in ("processed", "dead_lettered")
        }
        assert counts == {
            ("a", "processed"): 3,
            ("a", "dead_lettered"): 1,
            ("b", "processed"): 1,
            ("b", "dead_lettered"): 1,
        }
        assert (runner.processed, runner.dead_lettered) == (4, 2)

    async def test_a_fault_of_the_runner_on_one_record_sets_that_record_aside_alone(self) -> None:
        # A handler bug that shows on one event only (it returns None instead of its rejections): the
        # batch is settled record by record, and only that record goes to the DLQ.
        odd = purchase("t1", "c-odd")

        async def handler(batch: Sequence[Inbound[Any]]) -> Sequence[Rejection]:
            return cast(Any, None) if any(m.event.id == odd.id for m in batch) else []

        runner = _Settled(f"settle-{uuid.uuid4().hex[:8]}", handler)
        good = [purchase("t1", f"c-{i}").to_bytes() for i in range(3)]
        records = [_record("a", 0, 0, good[0]), _record("a", 0, 1, odd.to_bytes()), _record("a", 0, 2, good[1])]
        await runner._settle(records)
        assert [(r.offset, code) for r, code, _ in runner.dead] == [(1, "internal")]
        assert "TypeError" in runner.dead[0].reason
        assert runner.committed[-1] == {TopicPartition("a", 0): 3}
