"""The consumer runner every service uses: batches in, typed events to a handler, bad input to the DLQ.

Contract:
- The handler gets the decoded events of one batch and makes their effect durable (its own DB
  transaction, idempotent through a tracking row) before it returns. It returns the events it refuses
  on business grounds (`Rejection`), which go to the DLQ with their reason.
- Offsets are committed only after the handler returned and the dead letters are acknowledged, so a
  crash anywhere before that redelivers the batch and the handler's idempotency absorbs it.
- Input never kills the loop: undecodable, invalid, oversized or refused messages are dead-lettered;
  a handler error that persists for one message dead-letters that message alone; infrastructure
  errors (database or broker down) are retried with back-off until they clear.
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
from typing import Any, NamedTuple

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from shared.contract import Limits, violation
from shared.events import TOPIC_EVENT_TYPES, CloudEvent, EventDecodeError, decode_event, utcnow
from shared.kafka import EventProducer
from shared.observability import (
    CONSUMER_BATCH_SECONDS,
    CONSUMER_LAG,
    CONSUMER_MESSAGES,
    DLQ_MESSAGES,
)
from shared.topics import DLQ

log = logging.getLogger(__name__)

DLQ_HEADER_PREFIX = "dlq."


class Inbound(NamedTuple):
    """A decoded message of a batch (a named tuple: one is built per message, and cheaply)."""

    event: CloudEvent[Any]
    topic: str
    partition: int
    offset: int
    record: ConsumerRecord[bytes, bytes]


@dataclass(frozen=True)
class Rejection:
    message: Inbound
    reason: str


BatchHandler = Callable[[Sequence[Inbound]], Awaitable[Sequence[Rejection]]]


class RetryLater(Exception):
    """Raised by a handler when the batch met a passing conflict (another consumer holds or just wrote
    the same rows), not a fault of the input: the batch is retried, never dead-lettered."""


def is_transient(exc: BaseException) -> bool:
    """Errors of the infrastructure, not of the input: retrying the same batch later can succeed."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(
        exc, RetryLater | OperationalError | InterfaceError | OSError | ConnectionError | TimeoutError | KafkaError
    )


class ConsumerRunner:
    def __init__(
        self,
        *,
        service: str,
        topics: Sequence[str],
        group_id: str,
        bootstrap_servers: str,
        handler: BatchHandler,
        dlq_producer: EventProducer,
        dlq_topic: str = DLQ,
        max_event_bytes: int = 256 * 1024,
        batch_size: int = 500,
        batch_timeout_ms: int = 200,
        topic_event_types: dict[str, frozenset[str]] | None = None,
        max_handler_attempts: int = 3,
        retry_backoff_s: float = 0.5,
        limits: Limits = Limits(),
        **consumer_options: Any,
    ) -> None:
        self.service = service
        self.topics = list(topics)
        self.group_id = group_id
        self._handler = handler
        self._dlq = dlq_producer
        self._dlq_topic = dlq_topic
        self._max_bytes = max_event_bytes
        self._batch_size = batch_size
        self._batch_timeout_ms = batch_timeout_ms
        self._types = topic_event_types if topic_event_types is not None else TOPIC_EVENT_TYPES
        self._attempts = max_handler_attempts
        self._backoff = retry_backoff_s
        self._limits = limits
        self._consumer = AIOKafkaConsumer(
            *self.topics,
            bootstrap_servers=bootstrap_servers,
            group_id=group_id,
            client_id=f"{service}-{group_id}",
            enable_auto_commit=False,
            auto_offset_reset=consumer_options.pop("auto_offset_reset", "earliest"),
            isolation_level=consumer_options.pop("isolation_level", "read_committed"),
            **consumer_options,
        )
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.processed = 0
        self.dead_lettered = 0

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

    async def _run(self) -> None:
        while not self._stopping:
            try:
                batches = await self._consumer.getmany(timeout_ms=self._batch_timeout_ms, max_records=self._batch_size)
            except KafkaError as exc:
                log.warning("fetch failed, retrying", extra={"error": repr(exc), "group": self.group_id})
                await asyncio.sleep(self._backoff)
                continue
            records = [r for tp_records in batches.values() for r in tp_records]
            if not records:
                continue
            try:
                await self.process(records)
            except Exception as exc:
                # Not the input's fault (dead letters could not be sent, a commit failed): rewind to the
                # committed offsets and try the batch again after a pause.
                log.warning("batch not settled, rewinding", exc_info=exc, extra={"group": self.group_id})
                await asyncio.sleep(self._backoff)
                try:
                    await self._consumer.seek_to_committed()
                except KafkaError as seek_error:
                    log.warning("rewind failed", extra={"error": repr(seek_error)})

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
        good: list[Inbound] = []
        dead: list[tuple[ConsumerRecord[bytes, bytes], str]] = []
        now = utcnow()
        for record in records:
            reason = self._check(record)
            if reason is not None:
                dead.append((record, reason))
                continue
            try:
                event = decode_event(record.value, allowed_types=self._types.get(record.topic))
            except EventDecodeError as exc:
                dead.append((record, str(exc)))
                continue
            refused = violation(event, record.key, limits=self._limits, now=now)
            if refused is not None:
                dead.append((record, refused))
                continue
            good.append(Inbound(event, record.topic, record.partition, record.offset, record))
        rejections = await self._handle(good) if good else []
        dead.extend((r.message.record, r.reason) for r in rejections)
        await self._dead_letter(dead)
        next_offsets = _next_offsets(records)
        await self.commit(next_offsets)
        # One metric update per topic and outcome, not per message.
        dead_by_topic = Counter(record.topic for record, _ in dead)
        for topic, count in Counter(record.topic for record in records).items():
            if count > dead_by_topic[topic]:
                CONSUMER_MESSAGES.labels(self.service, topic, "processed").inc(count - dead_by_topic[topic])
        for topic, count in dead_by_topic.items():
            CONSUMER_MESSAGES.labels(self.service, topic, "dead_lettered").inc(count)
        self.processed += len(records) - len(dead)
        self.dead_lettered += len(dead)
        CONSUMER_BATCH_SECONDS.labels(self.service).observe(time.perf_counter() - started)
        self._record_lag(next_offsets)

    def _check(self, record: ConsumerRecord[bytes, bytes]) -> str | None:
        size = len(record.value or b"")
        if size > self._max_bytes:
            return f"message of {size} bytes exceeds the limit of {self._max_bytes} bytes"
        return None

    async def _handle(self, batch: Sequence[Inbound]) -> list[Rejection]:
        try:
            return list(await self._call_until_settled(batch))
        except _PersistentFailure as failure:
            if len(batch) == 1:
                return [Rejection(batch[0], f"handler failed {self._attempts} times: {failure.error!r}")]
        # Some message in the batch keeps failing: handle them one by one so only that one is dead-lettered.
        log.warning("batch keeps failing, isolating messages", extra={"group": self.group_id, "size": len(batch)})
        out: list[Rejection] = []
        for message in batch:
            out.extend(await self._handle([message]))
        return out

    async def _call_until_settled(self, batch: Sequence[Inbound]) -> Sequence[Rejection]:
        attempt = 0
        delay = self._backoff
        while True:
            try:
                return await self._handler(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if is_transient(exc):
                    # The infrastructure is down: wait for it rather than blaming the input.
                    log.warning("transient handler error, retrying", extra={"error": repr(exc)})
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
                    continue
                attempt += 1
                log.exception("handler error", extra={"group": self.group_id, "attempt": attempt})
                if attempt >= self._attempts:
                    raise _PersistentFailure(exc) from exc
                await asyncio.sleep(self._backoff)

    async def _dead_letter(self, dead: Sequence[tuple[ConsumerRecord[bytes, bytes], str]]) -> None:
        if not dead:
            return
        producer = self._dlq.raw
        futures = []
        for record, reason in dead:
            headers = [
                *list(record.headers or ()),
                (f"{DLQ_HEADER_PREFIX}reason", reason.encode()),
                (f"{DLQ_HEADER_PREFIX}source.topic", record.topic.encode()),
                (f"{DLQ_HEADER_PREFIX}source.partition", str(record.partition).encode()),
                (f"{DLQ_HEADER_PREFIX}source.offset", str(record.offset).encode()),
                (f"{DLQ_HEADER_PREFIX}consumer.group", self.group_id.encode()),
                (f"{DLQ_HEADER_PREFIX}service", self.service.encode()),
                (f"{DLQ_HEADER_PREFIX}failed_at", datetime.now(UTC).isoformat().encode()),
            ]
            futures.append(await producer.send(self._dlq_topic, record.value, key=record.key, headers=headers))
            DLQ_MESSAGES.labels(self.service, record.topic, reason.split(":", 1)[0][:60]).inc()
            log.warning(
                "dead-lettered",
                extra={
                    "topic": record.topic,
                    "partition": record.partition,
                    "offset": record.offset,
                    "reason": reason[:500],
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
    def __init__(self, error: BaseException) -> None:
        super().__init__(repr(error))
        self.error = error


def _next_offsets(records: Sequence[ConsumerRecord[bytes, bytes]]) -> dict[TopicPartition, int]:
    last: dict[tuple[str, int], int] = {}
    for record in records:
        key = (record.topic, record.partition)
        if record.offset >= last.get(key, -1):
            last[key] = record.offset
    return {TopicPartition(topic, partition): offset + 1 for (topic, partition), offset in last.items()}


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

    @classmethod
    def from_record(cls, record: ConsumerRecord[bytes, bytes]) -> DeadLetter:
        headers = {k: v for k, v in (record.headers or ())}
        return cls(
            value=record.value,
            key=record.key,
            reason=headers.get(f"{DLQ_HEADER_PREFIX}reason", b"").decode(),
            source_topic=headers.get(f"{DLQ_HEADER_PREFIX}source.topic", b"").decode(),
            source_partition=int(headers.get(f"{DLQ_HEADER_PREFIX}source.partition", b"-1")),
            source_offset=int(headers.get(f"{DLQ_HEADER_PREFIX}source.offset", b"-1")),
            headers=headers,
        )
