"""The consumer runner's decode, dead-letter and commit logic over an in-memory feed (no broker): the same
kinds of assertions as the real-broker tests (test_consumer.py, test_consumer_faults.py), cheap enough to
fuzz with many more examples than those can afford."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

from aiokafka.errors import CommitFailedError, KafkaConnectionError, MessageSizeTooLargeError
from hypothesis import HealthCheck, given, settings

from shared.consumer import MAX_REASON_CHARS, ConsumerRunner, Inbound, Rejection, RetryLater
from shared.events import TOPIC_EVENT_TYPES
from shared.topics import ENGAGEMENT, PURCHASES
from tests.conftest import eventually
from tests.factories import purchase
from tests.shared.memory_feed import MemoryFeed, MemorySink
from tests.shared.test_consumer_faults import CONFLICT, REFUSE, RUNNER_CODES, TRIGGERS, hostile_batches

TOPIC = "memory.v1"
DLQ_TOPIC = "memory.dlq"
Where = tuple[int, int]  # partition, offset


class Recorder:
    """Applies a batch all or nothing; refuses, conflicts on or fails (`outage`) as the test asks."""

    def __init__(self) -> None:
        self.applied: dict[Where, str] = {}
        self.calls = 0
        self.outage: BaseException | None = None
        self.failing_on: set[str] = set()

    async def __call__(self, batch: Sequence[Inbound[Any]]) -> Sequence[Rejection]:
        self.calls += 1
        if self.outage is not None:
            raise self.outage
        if any(m.event.source == CONFLICT for m in batch):
            raise RetryLater("a conflict that never passes")
        if any(m.event.id in self.failing_on for m in batch):
            raise ValueError("cannot handle this one")
        rejections = []
        for m in batch:
            if m.event.source == REFUSE:
                rejections.append(Rejection(m, f"refused \udc80 {m.event.id}"))
            else:
                self.applied[(m.partition, m.offset)] = m.event.id
        return rejections


@asynccontextmanager
async def running(
    partitions: int = 1, **options: Any
) -> AsyncIterator[tuple[ConsumerRunner, MemoryFeed, MemorySink, Recorder]]:
    feed, sink, recorder = MemoryFeed(TOPIC, partitions), MemorySink(), Recorder()
    runner = ConsumerRunner(
        service="test-memory",
        topics=[TOPIC],
        group_id="memory",
        bootstrap_servers="unused:9092",
        handler=recorder,
        dlq_producer=cast(Any, None),  # the sink stands in for it
        dlq_topic=DLQ_TOPIC,
        batch_timeout_ms=5,
        # Purchases and engagement (where custom types belong), so `custom.\udc80` reaches validation.
        topic_event_types={TOPIC: TOPIC_EVENT_TYPES[PURCHASES] | TOPIC_EVENT_TYPES[ENGAGEMENT]},
        retry_later_attempts=3,
        retry_backoff_s=0.001,
        retry_backoff_max_s=0.01,
        feed=feed,
        dlq_sink=sink,
        **options,
    )
    await runner.start()
    try:
        yield runner, feed, sink, recorder
    finally:
        await runner.stop()
    assert feed.started
    assert feed.stopped


async def settled(feed: MemoryFeed) -> None:
    await eventually(feed.settled, timeout_s=10, interval_s=0.002)


def letters_by_offset(sink: MemorySink) -> dict[Where, Any]:
    return {(letter.source_partition, letter.source_offset): letter for letter in sink.letters}


class TestPoisonRecords:
    async def test_each_trigger_is_dead_lettered_alone_and_the_event_behind_it_applied(self) -> None:
        async with running() as (_, feed, sink, recorder):
            sent: list[tuple[bytes, str, str]] = []  # poison bytes, its code, the valid event's id behind it
            for name, (make, code) in TRIGGERS.items():
                tenant = f"t-{uuid.uuid4().hex[:12]}"
                after = purchase(tenant, "c-1")
                sent.append((make(tenant, "c-1", name), code, after.id))
                feed.append(sent[-1][0], key=after.key)
                feed.append(after.to_bytes(), key=after.key)
            await settled(feed)
        letters = letters_by_offset(sink)
        assert sorted(letters) == [(0, 2 * i) for i in range(len(TRIGGERS))], "the poison records alone"
        for i, (poison, code, after_id) in enumerate(sent):
            letter = letters[(0, 2 * i)]
            assert (letter.code, letter.value) == (code, poison)
            assert letter.reason
            assert letter.headers["dlq.source.topic"] == TOPIC.encode()
            assert recorder.applied[(0, 2 * i + 1)] == after_id, "the valid event behind it is applied"
        assert all(r.topic == DLQ_TOPIC for r in sink.records)

    async def test_a_refusal_whose_reason_holds_a_lone_surrogate_is_dead_lettered_escaped(self) -> None:
        async with running() as (runner, feed, sink, recorder):
            refused = purchase("t1", "c-1").model_copy(update={"source": REFUSE})
            after = purchase("t1", "c-1")
            feed.append(refused.to_bytes(), key=refused.key)
            feed.append(after.to_bytes(), key=after.key)
            await settled(feed)
        (letter,) = sink.letters
        assert letter.reason == f"refused \\udc80 {refused.id}"
        assert letter.code == "refused"
        assert letter.key == refused.key
        assert recorder.applied == {(0, 1): after.id}
        assert (runner.processed, runner.dead_lettered) == (1, 1)

    async def test_a_record_over_the_size_limit_is_dead_lettered_too_large(self) -> None:
        async with running(max_event_bytes=100) as (_, feed, sink, recorder):
            feed.append(b"x" * 101)
            await settled(feed)
        (letter,) = sink.letters
        assert letter.code == "too_large"
        assert "101 bytes exceeds the limit of 100" in letter.reason
        assert recorder.calls == 0

    async def test_a_reason_is_bounded(self) -> None:
        async with running() as (_, feed, sink, _recorder):
            feed.append(json.dumps({"type": "x" * 5000}).encode())
            await settled(feed)
        (record,) = sink.records
        reason = dict(record.headers)["dlq.reason"]
        assert 0 < len(reason.decode()) <= MAX_REASON_CHARS

    async def test_a_letter_the_dlq_refuses_goes_without_the_original_bytes(self) -> None:
        async with running() as (_, feed, sink, _recorder):
            sink.faults.append(MessageSizeTooLargeError())
            feed.append(b"not json")
            await settled(feed)
        (letter,) = sink.letters
        assert letter.value is None
        assert letter.code == "not_json"
        assert "MessageSizeTooLargeError" in letter.headers["dlq.original.dropped"].decode()
        assert letter.source_offset == 0, "it names where the original stays"


class TestHandlerFailures:
    async def test_a_conflict_that_never_passes_dead_letters_that_message_alone(self) -> None:
        async with running() as (_, feed, sink, recorder):
            stuck = purchase("t1", "c-1").model_copy(update={"source": CONFLICT})
            others = [purchase("t1", "c-1") for _ in range(4)]
            for event in [others[0], stuck, *others[1:]]:
                feed.append(event.to_bytes(), key=event.key)
            await settled(feed)
        (letter,) = sink.letters
        assert letter.source_offset == 1
        assert letter.code == "handler_failed"
        assert "handler failed 3 times: RetryLater" in letter.reason
        assert [recorder.applied.get((0, o)) for o in (0, 2, 3, 4)] == [e.id for e in others]

    async def test_a_handler_error_on_one_message_dead_letters_only_that_one(self) -> None:
        async with running() as (_, feed, sink, recorder):
            events = [purchase("t1", "c-1") for _ in range(5)]
            recorder.failing_on.add(events[2].id)
            for event in events:
                feed.append(event.to_bytes(), key=event.key)
            await settled(feed)
        (letter,) = sink.letters
        assert letter.source_offset == 2
        assert "handler failed 3 times" in letter.reason
        assert "cannot handle this one" in letter.reason
        assert sorted(recorder.applied) == [(0, 0), (0, 1), (0, 3), (0, 4)]

    async def test_an_outage_is_retried_without_dead_lettering_and_health_follows_it(self) -> None:
        async with running(unready_after_failures=3) as (runner, feed, sink, recorder):
            await eventually(lambda: runner.health() is None, timeout_s=5, interval_s=0.002)
            recorder.outage = ConnectionRefusedError("the database is down")
            events = [purchase("t1", f"c-{i}") for i in range(3)]
            for event in events:
                feed.append(event.to_bytes(), key=event.key)
            problem = await eventually(runner.health, timeout_s=5, interval_s=0.002)
            assert problem.startswith("stalled: ")
            assert "ConnectionRefusedError" in problem
            assert runner.failures >= 3
            assert feed.committed == {}, "nothing settled, nothing committed"
            recorder.outage = None
            await settled(feed)
            await eventually(lambda: runner.health() is None, timeout_s=5, interval_s=0.002)
            assert runner.failures == 0
        assert sink.records == [], "valid input is never dead-lettered for an outage"
        assert sorted(recorder.applied.values()) == sorted(e.id for e in events)

    async def test_a_failed_fetch_is_retried(self) -> None:
        async with running() as (runner, feed, sink, recorder):
            feed.fetch_faults.extend([KafkaConnectionError(), KafkaConnectionError()])
            event = purchase("t1", "c-1")
            feed.append(event.to_bytes(), key=event.key)
            await settled(feed)
            assert runner.failures == 0
        assert recorder.applied == {(0, 0): event.id}
        assert sink.records == []


class TestOffsets:
    async def test_offsets_are_committed_to_the_end_of_each_partition(self) -> None:
        async with running(partitions=3, batch_size=4) as (_, feed, sink, recorder):
            for i in range(20):
                event = purchase("t1", f"c-{i}")
                feed.append(event.to_bytes() if i % 7 else b"{", key=event.key, partition=i % 3)
            await settled(feed)
        assert {tp.partition: offset for tp, offset in feed.committed.items()} == {0: 7, 1: 7, 2: 6}
        # Every commit names each partition's next offset, never going back.
        seen: dict[Any, int] = {}
        for commit in feed.commits:
            for tp, offset in commit.items():
                assert offset > seen.get(tp, 0)
                seen[tp] = offset
        assert len(recorder.applied) + len(sink.records) == 20

    async def test_a_failed_commit_after_a_rebalance_is_logged_and_the_runner_goes_on(self) -> None:
        async with running() as (runner, feed, _sink, recorder):
            feed.commit_faults.append(CommitFailedError("rebalanced"))
            first, second = purchase("t1", "c-1"), purchase("t1", "c-1")
            feed.append(first.to_bytes(), key=first.key)
            await eventually(lambda: recorder.applied, timeout_s=5, interval_s=0.002)
            feed.append(second.to_bytes(), key=second.key)
            await settled(feed)
            assert runner.running
        assert recorder.applied == {(0, 0): first.id, (0, 1): second.id}


class TestFuzz:
    @settings(
        max_examples=200,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(batch=hostile_batches(max_size=8))
    async def test_every_record_ends_applied_or_dead_lettered_and_the_offset_reaches_the_end(
        self, batch: tuple[str, list[bytes]]
    ) -> None:
        tenant, values = batch
        async with running(batch_size=3) as (_, feed, sink, recorder):
            for value in values:
                feed.append(value, key=f"{tenant}:c-fuzz".encode())
            await settled(feed)
        letters = letters_by_offset(sink)
        assert len(letters) == len(sink.records), "one letter per record at most"
        for offset in range(len(values)):
            letter = letters.get((0, offset))
            assert ((0, offset) in recorder.applied) != (letter is not None), "applied or dead-lettered, not both"
            if letter is not None:
                assert letter.reason
                assert letter.code in RUNNER_CODES | {"refused"}
                assert letter.value == values[offset]
        assert (0, len(values) - 1) in recorder.applied, "the valid event behind the others is applied"
