"""The consumer runner every service uses: batches in, typed events to a handler, bad input to the DLQ.

Contract:
- The handler gets the decoded events of one batch and makes their effect durable (its own DB
  transaction, idempotent through a tracking row) before it returns. It returns the events it refuses
  on business grounds (`Rejection`), which go to the DLQ with their reason.
- Offsets are committed only after the handler returned and the dead letters are acknowledged, so a
  crash anywhere before that redelivers the batch and the handler's idempotency absorbs it.
- One record's faults are that record's alone: whatever fails while sizing, decoding, validating or
  checking it against the input contract dead-letters it, with a reason that is always encodable
  (escaped, bounded) and a fixed reason code (`dlq.reason.code`, the metric label).
- Handler errors: an outage of the database or broker (`shared.faults.is_infrastructure_error`) is
  retried with back-off for as long as it lasts and never dead-letters valid input; a passing conflict
  (`RetryLater`) is retried `retry_later_attempts` times and any other error `max_handler_attempts`
  times, after which the batch is halved until the message that keeps failing stands alone and is
  dead-lettered by itself.
- A batch that cannot be settled is read again from its own first offsets (never skipped, never
  rewound to a commit that a partition may not have); one the runner keeps failing on for a reason
  other than an outage is settled record by record, so only the record that triggers it is set aside.
- `health()` says when the consumer is stuck: `unready_after_failures` failed attempts in a row, or
  no progress for `stall_after_s` with a batch waiting. `/readyz` and two gauges show it.
- The runner reads through a `RecordFeed` and dead-letters through a `RecordSink`: the aiokafka consumer and
  the DLQ producer by default; tests give it an in-memory pair to run the same logic without a broker.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, NamedTuple, Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError

from shared.contract import Limits, violation
from shared.events import TOPIC_EVENT_TYPES, CloudEvent, EventDecodeError, P, decode_event, utcnow
from shared.faults import is_infrastructure_error
from shared.kafka import EventProducer
from shared.observability import (
    CONSUMER_BATCH_SECONDS,
    CONSUMER_CONSECUTIVE_FAILURES,
    CONSUMER_LAG,
    CONSUMER_LAST_PROGRESS,
    CONSUMER_MESSAGES,
    DLQ_MESSAGES,
)
from shared.topics import DLQ

log = logging.getLogger(__name__)

DLQ_HEADER_PREFIX = "dlq."
# A reason quotes the input at times: the header keeps its first characters only.
MAX_REASON_CHARS = 1000


class Inbound(NamedTuple, Generic[P]):
    """A decoded message of a batch (a named tuple: one is built per message, and cheaply), of a topic
    whose payloads are `P` (a union of shared.events, e.g. `Inbound[PointsCommand]`). Generic for the type
    checker only: at run time it is the same plain tuple subclass."""

    event: CloudEvent[P]
    topic: str
    partition: int
    offset: int
    record: ConsumerRecord[bytes, bytes]


@dataclass(frozen=True)
class Rejection:
    """A message the handler refuses: `reason` says why (DLQ header, log), `code` is a fixed word for the
    metric label (never event data)."""

    message: Inbound[Any]
    reason: str
    code: str = "refused"


# A handler of the batches of topics whose payloads are `P`.
BatchHandler = Callable[[Sequence[Inbound[P]]], Awaitable[Sequence[Rejection]]]


class RetryLater(Exception):
    """Raised by a handler when the batch met a passing conflict (another consumer holds or just wrote
    the same rows), not a fault of the input: the batch is retried a bounded number of times, after which
    the message that keeps conflicting is isolated and dead-lettered."""


def is_transient(exc: BaseException) -> bool:
    """Retrying the same batch later can succeed: an outage, or a passing conflict (`RetryLater`)."""
    return isinstance(exc, RetryLater) or is_infrastructure_error(exc)


class DeadRecord(NamedTuple):
    """A record on its way to the DLQ: why (`reason`), and the fixed word for the metric label (`code`)."""

    record: ConsumerRecord[bytes, bytes]
    code: str
    reason: str


class RecordFeed(Protocol):
    """What the runner uses of a Kafka consumer (`AIOKafkaConsumer` satisfies it)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]: ...

    async def commit(self, offsets: dict[TopicPartition, int] | None = None) -> None: ...

    def seek(self, partition: TopicPartition, offset: int) -> None: ...

    def assignment(self) -> set[TopicPartition]: ...

    def highwater(self, partition: TopicPartition) -> int | None: ...


class RecordSink(Protocol):
    """What the runner uses of a Kafka producer to dead-letter (`AIOKafkaProducer` satisfies it): `send`
    enqueues a record and returns an awaitable that resolves once the broker acknowledged it."""

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> Awaitable[Any]: ...


class ConsumerRunner:
    def __init__(
        self,
        *,
        service: str,
        topics: Sequence[str],
        group_id: str,
        bootstrap_servers: str,
        handler: BatchHandler[Any],
        dlq_producer: EventProducer,
        dlq_topic: str = DLQ,
        max_event_bytes: int = 256 * 1024,
        batch_size: int = 500,
        batch_timeout_ms: int = 200,
        topic_event_types: dict[str, frozenset[str]] | None = None,
        max_handler_attempts: int = 3,
        retry_later_attempts: int = 5,
        retry_backoff_s: float = 0.5,
        retry_backoff_max_s: float = 30.0,
        stall_after_s: float = 120.0,
        unready_after_failures: int = 5,
        limits: Limits = Limits(),
        feed: RecordFeed | None = None,
        dlq_sink: RecordSink | None = None,
        **consumer_options: Any,
    ) -> None:
        self.service = service
        self.topics = list(topics)
        self.group_id = group_id
        # Any: a topic's batch goes to a handler of that topic's payload union (`BatchHandler[PointsCommand]`,
        # say), which holds because `process` admits only the event types `topic_event_types` lists for
        # the topic; the types say so, at no cost per event (tests/shared/test_events.py checks the unions).
        self._handler = handler
        self._dlq = dlq_producer
        self._dlq_sink = dlq_sink
        self._dlq_topic = dlq_topic
        self._max_bytes = max_event_bytes
        self._batch_size = batch_size
        self._batch_timeout_ms = batch_timeout_ms
        self._types = topic_event_types if topic_event_types is not None else TOPIC_EVENT_TYPES
        self._attempts = max_handler_attempts
        self._retry_later_attempts = retry_later_attempts
        self._backoff = retry_backoff_s
        self._backoff_max = retry_backoff_max_s
        self._stall_after_s = stall_after_s
        self._unready_after = unready_after_failures
        self._limits = limits
        if feed is None:
            feed = AIOKafkaConsumer(
                *self.topics,
                bootstrap_servers=bootstrap_servers,
                group_id=group_id,
                client_id=f"{service}-{group_id}",
                enable_auto_commit=False,
                auto_offset_reset=consumer_options.pop("auto_offset_reset", "earliest"),
                isolation_level=consumer_options.pop("isolation_level", "read_committed"),
                **consumer_options,
            )
        self._consumer = feed
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.processed = 0
        self.dead_lettered = 0
        # Progress, for health(): failed attempts in a row, the last one's error, when the runner last
        # advanced (or found nothing to do), and whether a batch is waiting to be settled.
        self.failures = 0
        self._last_error = ""
        self._progress_at = time.monotonic()
        self._waiting = False
        self._failures_gauge = CONSUMER_CONSECUTIVE_FAILURES.labels(service, group_id)
        self._progress_gauge = CONSUMER_LAST_PROGRESS.labels(service, group_id)
        self._failures_gauge.set(0)
        self._progress_gauge.set(time.time())

    async def start(self) -> None:
        await self._consumer.start()
        self._task = asyncio.create_task(self._run(), name=f"consumer:{self.group_id}")

    async def stop(self, grace_s: float = 10.0) -> None:
        # A batch in flight is let finish (its dead letters sent, its offsets committed) for up to `grace_s`:
        # cancelling it would be safe (the batch is redelivered and the handler's idempotency absorbs
        # it) but would hand the next process work this one had almost done.
        self._stopping = True
        if self._task is not None:
            await asyncio.wait([self._task], timeout=grace_s)
            self._task.cancel()
            await asyncio.wait([self._task])
            if not self._task.cancelled() and self._task.exception() is not None:
                log.error("consumer loop had died", exc_info=self._task.exception(), extra={"group": self.group_id})
        await self._consumer.stop()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def health(self) -> str | None:
        """None while the consumer makes progress; else why it does not (for `/readyz`)."""
        if not self.running:
            return "stopped"
        if self.failures >= self._unready_after:
            return f"stalled: {self.failures} failed attempts in a row (last: {self._last_error})"
        idle = time.monotonic() - self._progress_at
        if self._waiting and idle > self._stall_after_s:
            return f"stalled: no progress for {idle:.0f}s with messages waiting"
        return None

    async def _run(self) -> None:
        while not self._stopping:
            try:
                batches = await self._consumer.getmany(timeout_ms=self._batch_timeout_ms, max_records=self._batch_size)
            except Exception as exc:  # the broker, or a record the client cannot parse: try again
                await self._failed(exc, "fetch failed, retrying")
                continue
            records = [r for tp_records in batches.values() for r in tp_records]
            if not records:
                if not self._waiting:
                    self._advanced()  # nothing waiting is no stall
                continue
            self._waiting = True
            try:
                await self._settle(records)
            except Exception as exc:
                # An outage, or a fault the runner cannot pin on one record: read the batch again from its own
                # first offsets (a rewind to the committed ones would skip it on a partition without any).
                self._waiting = self._rewind(records)
                await self._failed(exc, "batch not settled, reading it again")
            else:
                self._waiting = False
                self._advanced()

    def _advanced(self) -> None:
        if self.failures:
            self.failures = 0
            self._failures_gauge.set(0)
        self._progress_at = time.monotonic()
        self._progress_gauge.set(time.time())

    async def _failed(self, exc: BaseException, message: str) -> None:
        self.failures += 1
        self._last_error = type(exc).__name__
        self._failures_gauge.set(self.failures)
        log.warning(message, exc_info=exc, extra={"group": self.group_id, "failures": self.failures})
        await asyncio.sleep(min(self._backoff * 2 ** min(self.failures - 1, 20), self._backoff_max))

    def _rewind(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> bool:
        """Moves back to the records' first offsets; False when none of their partitions is ours any more."""
        rewound = False
        assigned = self._consumer.assignment()
        for tp, offset in _first_offsets(records).items():
            if tp not in assigned:
                continue  # a rebalance took it: its new owner reads on from the committed offset
            try:
                self._consumer.seek(tp, offset)
            except IllegalStateError:
                continue  # taken away just now
            rewound = True
        return rewound

    async def _settle(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
        try:
            await self.process(records)
            return
        except Exception as exc:
            if is_infrastructure_error(exc):
                raise
            fault = exc
        # Neither an outage nor one record's own fault (those are settled inside `process`): something the
        # runner calls fails on some record. One by one, the others go through and that one is set aside.
        if len(records) > 1:
            log.error("batch not settled, settling it record by record", exc_info=fault, extra={"group": self.group_id})
            for record in records:
                await self._settle([record])
            return
        record = records[0]
        await self._dead_letter([DeadRecord(record, "internal", f"could not be processed: {fault!r}")])
        await self.commit(_next_offsets(records))
        CONSUMER_MESSAGES.labels(self.service, record.topic, "dead_lettered").inc()
        self.dead_lettered += 1

    async def process(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
        # A batch's objects (decoded events, states, rows) live until the batch is done, then go by
        # reference counting: the cyclic collector, running meanwhile, would only walk them again and
        # again. It pauses for the batch and resumes after it (cyclic garbage waits until then).
        paused = gc.isenabled()
        gc.disable()
        try:
            await self._process(records)
        finally:
            if paused:
                gc.enable()

    async def _process(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
        started = time.perf_counter()
        good: list[Inbound[Any]] = []
        dead: list[DeadRecord] = []
        now = utcnow()
        for record in records:
            value = record.value
            if value is not None and len(value) > self._max_bytes:
                reason = f"message of {len(value)} bytes exceeds the limit of {self._max_bytes} bytes"
                dead.append(DeadRecord(record, "too_large", reason))
                continue
            try:
                event = decode_event(value, allowed_types=self._types.get(record.topic))
            except EventDecodeError as exc:
                dead.append(DeadRecord(record, exc.code, str(exc)))
                continue
            except Exception as exc:  # whatever else goes wrong with one record's bytes is theirs
                dead.append(DeadRecord(record, "invalid", f"cannot be decoded: {type(exc).__name__}: {exc}"))
                continue
            try:
                refused = violation(event, record.key, limits=self._limits, now=now)
            except Exception as exc:
                refused = f"the input contract cannot be checked: {type(exc).__name__}: {exc}"
            if refused is not None:
                dead.append(DeadRecord(record, "contract", refused))
                continue
            good.append(Inbound(event, record.topic, record.partition, record.offset, record))
        rejections = await self._handle(good) if good else []
        dead.extend(DeadRecord(r.message.record, r.code, r.reason) for r in rejections)
        await self._dead_letter(dead)
        next_offsets = _next_offsets(records)
        await self.commit(next_offsets)
        # One metric update per topic and outcome, not per message.
        dead_by_topic = Counter(d.record.topic for d in dead)
        for topic, count in Counter(record.topic for record in records).items():
            if count > dead_by_topic[topic]:
                CONSUMER_MESSAGES.labels(self.service, topic, "processed").inc(count - dead_by_topic[topic])
        for topic, count in dead_by_topic.items():
            CONSUMER_MESSAGES.labels(self.service, topic, "dead_lettered").inc(count)
        self.processed += len(records) - len(dead)
        self.dead_lettered += len(dead)
        CONSUMER_BATCH_SECONDS.labels(self.service).observe(time.perf_counter() - started)
        self._record_lag(next_offsets)

    async def _handle(self, batch: Sequence[Inbound[Any]]) -> list[Rejection]:
        try:
            return list(await self._call_until_settled(batch))
        except _PersistentFailure as failure:
            if len(batch) == 1:
                reason = f"handler failed {failure.attempts} times: {failure.error!r}"
                return [Rejection(batch[0], reason, "handler_failed")]
        # Some message in the batch keeps failing: halve the batch, in order (a customer's events keep
        # theirs), until that message stands alone and is dead-lettered by itself.
        log.warning("batch keeps failing, isolating messages", extra={"group": self.group_id, "size": len(batch)})
        middle = len(batch) // 2
        return [*await self._handle(batch[:middle]), *await self._handle(batch[middle:])]

    async def _call_until_settled(self, batch: Sequence[Inbound[Any]]) -> Sequence[Rejection]:
        failures = conflicts = 0
        while True:
            try:
                return await self._handler(batch)
            except Exception as exc:
                if isinstance(exc, RetryLater):
                    conflicts += 1
                    attempts, limit = conflicts, self._retry_later_attempts
                elif is_infrastructure_error(exc):
                    raise  # an outage: the runner backs off and reads the batch again, for as long as it lasts
                else:
                    failures += 1
                    attempts, limit = failures, self._attempts
                log.warning("handler error", exc_info=exc, extra={"group": self.group_id, "attempt": attempts})
                if attempts >= limit:
                    raise _PersistentFailure(exc, attempts) from exc
                await asyncio.sleep(self._backoff)

    async def _dead_letter(self, dead: Sequence[DeadRecord]) -> None:
        if not dead:
            return
        producer = self._dlq_sink if self._dlq_sink is not None else self._dlq.raw
        futures = []
        failed_at = datetime.now(UTC).isoformat().encode()
        for record, code, reason in dead:
            # Escaped (a lone surrogate cannot be encoded as it is) and bounded: the reason may quote the input.
            encoded = reason[:MAX_REASON_CHARS].encode("utf-8", "backslashreplace")
            ours = [
                (f"{DLQ_HEADER_PREFIX}reason", encoded),
                (f"{DLQ_HEADER_PREFIX}reason.code", code.encode()),
                (f"{DLQ_HEADER_PREFIX}source.topic", record.topic.encode()),
                (f"{DLQ_HEADER_PREFIX}source.partition", str(record.partition).encode()),
                (f"{DLQ_HEADER_PREFIX}source.offset", str(record.offset).encode()),
                (f"{DLQ_HEADER_PREFIX}consumer.group", self.group_id.encode()),
                (f"{DLQ_HEADER_PREFIX}service", self.service.encode()),
                (f"{DLQ_HEADER_PREFIX}failed_at", failed_at),
            ]
            try:
                future = await producer.send(
                    self._dlq_topic, record.value, key=record.key, headers=[*(record.headers or ()), *ours]
                )
            except Exception as exc:
                if is_infrastructure_error(exc):
                    raise
                # This letter cannot go as it is (too large with its headers, say): it goes without the
                # original bytes and headers, which stay on the source topic at the offset it names.
                dropped = (f"{DLQ_HEADER_PREFIX}original.dropped", repr(exc)[:MAX_REASON_CHARS].encode())
                future = await producer.send(self._dlq_topic, None, key=record.key, headers=[*ours, dropped])
            futures.append(future)
            DLQ_MESSAGES.labels(self.service, record.topic, code).inc()
            log.warning(
                "dead-lettered",
                extra={
                    "topic": record.topic,
                    "partition": record.partition,
                    "offset": record.offset,
                    "code": code,
                    "reason": encoded.decode(),
                },
            )
        # The dead letters must be durable before the offsets move past them.
        await asyncio.gather(*futures)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        try:
            await self._consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # The partitions moved to another member; it redelivers and the handler's idempotency absorbs it.
            log.warning("offset commit failed after a rebalance", extra={"error": repr(exc)})

    def _record_lag(self, next_offsets: dict[TopicPartition, int]) -> None:
        assigned = self._consumer.assignment()
        for tp, next_offset in next_offsets.items():
            if tp not in assigned:
                continue  # taken away by a rebalance while the batch was handled
            highwater = self._consumer.highwater(tp)
            if highwater is not None:
                CONSUMER_LAG.labels(self.service, tp.topic, str(tp.partition)).set(max(highwater - next_offset, 0))


class _PersistentFailure(Exception):
    def __init__(self, error: BaseException, attempts: int) -> None:
        super().__init__(repr(error))
        self.error = error
        self.attempts = attempts


def _next_offsets(records: Sequence[ConsumerRecord[bytes, bytes]]) -> dict[TopicPartition, int]:
    last: dict[tuple[str, int], int] = {}
    for record in records:
        key = (record.topic, record.partition)
        if record.offset >= last.get(key, -1):
            last[key] = record.offset
    return {TopicPartition(topic, partition): offset + 1 for (topic, partition), offset in last.items()}


def _first_offsets(records: Sequence[ConsumerRecord[bytes, bytes]]) -> dict[TopicPartition, int]:
    first: dict[tuple[str, int], int] = {}
    for record in records:
        key = (record.topic, record.partition)
        if record.offset < first.get(key, record.offset + 1):
            first[key] = record.offset
    return {TopicPartition(topic, partition): offset for (topic, partition), offset in first.items()}


@dataclass(frozen=True)
class DeadLetter:
    """A DLQ message read back: the original bytes and where they came from."""

    value: bytes | None
    key: bytes | None
    reason: str
    source_topic: str
    source_partition: int
    source_offset: int
    headers: dict[str, bytes]
    code: str = ""

    @classmethod
    def from_record(cls, record: ConsumerRecord[bytes, bytes]) -> DeadLetter:
        headers = {k: v for k, v in (record.headers or ())}
        return cls(
            value=record.value,
            key=record.key,
            reason=headers.get(f"{DLQ_HEADER_PREFIX}reason", b"").decode(errors="replace"),
            source_topic=headers.get(f"{DLQ_HEADER_PREFIX}source.topic", b"").decode(),
            source_partition=int(headers.get(f"{DLQ_HEADER_PREFIX}source.partition", b"-1")),
            source_offset=int(headers.get(f"{DLQ_HEADER_PREFIX}source.offset", b"-1")),
            headers=headers,
            code=headers.get(f"{DLQ_HEADER_PREFIX}reason.code", b"").decode(errors="replace"),
        )
