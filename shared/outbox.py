"""The outbox relay every service uses: committed rows become Kafka records, and a row that can never
become one is moved aside instead of blocking the rows behind it.

A service describes its outbox with an `OutboxSource` (claim a batch of rows with their records built,
delete rows, insert quarantined rows, the oldest row's time); `OutboxRelay` does the rest:

- `relay_once` claims a batch (the source locks it, FOR UPDATE SKIP LOCKED, so replicas share the work),
  sends it, deletes what the broker acknowledged and quarantines what cannot be published, in one
  transaction. `publish` is the fast path for rows the caller has just committed.
- A row is *unpublishable* when its record cannot be built (the source says why), is larger than
  `max_record_bytes`, or the broker refuses that record alone (`shared.faults.record_refusal`: the
  batch's rows are then sent one by one, on a producer of their own, to find it). It goes to the service's
  `outbox_quarantine` table with a fixed reason code, is counted in `outbox_quarantined_total{service, reason}` and
  logged with its id.
- Anything else (the broker or the database unreachable, a timeout) is an outage: nothing is
  quarantined, the rows stay, and `run` retries with back-off.
- `oldest_age` sets `outbox_oldest_age_seconds{service}`; `readiness(max_age_s)` is a `/readyz` check
  that fails while the oldest waiting row is older than `max_age_s`.

Keep `max_record_bytes` below the topics' `max.message.bytes`: the size is checked before sending because
a batch the broker refuses leaves aiokafka's idempotent producer (the service's) unable to send to that
partition again (its sequence number is ahead of the broker's; aiokafka does not reset it) until the
process restarts; `/readyz` shows that stall.

Inspect quarantined rows with SQL: `select id, topic, reason, detail, quarantined_at from
<schema>.outbox_quarantine order by quarantined_at desc`. The relay never republishes them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

from aiokafka import AIOKafkaProducer
from sqlalchemy import BigInteger, Column, DateTime, LargeBinary, MetaData, String, Table, Text, func
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import async_sessionmaker

from shared.db import AsyncReadSession, AsyncSession, transaction
from shared.events import utcnow
from shared.faults import record_refusal
from shared.kafka import send_all, send_each
from shared.observability import OUTBOX_OLDEST_AGE, OUTBOX_QUARANTINED

log = logging.getLogger(__name__)

# Fixed reason codes (metric labels): the row's record could not be built or validated, is larger than
# the broker takes, or the broker refused that record.
Reason = Literal["invalid", "too_large", "refused"]
Message = tuple[str, bytes, bytes]  # topic, key, value
DETAIL_MAX = 500


@dataclass(frozen=True, slots=True)
class Unpublishable:
    id: int
    topic: str
    reason: Reason
    detail: str
    key: bytes | None = None
    value: bytes | None = None
    reference: str | None = None  # what the row points at when it has no value (an entry id)


@dataclass(slots=True)
class Claimed:
    """A claimed batch: the rows whose records were built (parallel lists) and those that could not be."""

    ids: list[int] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    unpublishable: list[Unpublishable] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids) + len(self.unpublishable)


class OutboxSource(Protocol):
    async def claim(self, session: AsyncSession, limit: int) -> Claimed:
        """Locks up to `limit` of the oldest rows (skipping rows other relays hold) and builds their records."""
        ...

    async def delete(self, session: AsyncSession, ids: Sequence[int]) -> None: ...

    async def quarantine(self, session: AsyncSession, rows: Sequence[Unpublishable]) -> None:
        """Inserts the rows into the service's quarantine table (`insert_quarantined`); the relay deletes them."""
        ...

    async def oldest(self, session: AsyncReadSession) -> datetime | None:
        """When the oldest row this relay would publish was written; None when there is none."""
        ...


def outbox_quarantine_table(metadata: MetaData) -> Table:
    return Table(
        "outbox_quarantine",
        metadata,
        Column("id", BigInteger, primary_key=True, autoincrement=False),
        Column("topic", String(200), nullable=False),
        Column("key", LargeBinary, nullable=True),
        Column("value", LargeBinary, nullable=True),
        Column("reference", String(200), nullable=True),
        Column("reason", String(20), nullable=False),
        Column("detail", Text, nullable=False),
        Column("quarantined_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    )


async def insert_quarantined(session: AsyncSession, table: Table, rows: Sequence[Unpublishable]) -> None:
    if not rows:
        return
    values = [
        {
            "id": r.id,
            "topic": r.topic,
            "key": r.key,
            "value": r.value,
            "reference": r.reference,
            "reason": r.reason,
            "detail": r.detail[:DETAIL_MAX],
        }
        for r in rows
    ]
    # A row two relays both gave up on (the fast path and a sweep) is kept once.
    await session.execute(insert(table).values(values).on_conflict_do_nothing())


def describe_error(exc: BaseException) -> str:
    # The reason must be storable whatever the exception says (a lone surrogate cannot be encoded).
    text = f"{type(exc).__name__}: {exc}"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:DETAIL_MAX]


class OutboxRelay:
    def __init__(
        self,
        *,
        service: str,
        sessionmaker: async_sessionmaker[AsyncSession],
        producer: AIOKafkaProducer,
        source: OutboxSource,
        bootstrap_servers: str,
        batch_size: int = 1000,
        max_record_bytes: int = 1_000_000,
    ) -> None:
        self.service = service
        self._bootstrap_servers = bootstrap_servers
        self.source = source
        self._sessionmaker = sessionmaker
        self._producer = producer
        self._batch_size = batch_size
        self._max_record_bytes = max_record_bytes
        # Until `run` has tried its first round, old rows are a backlog about to be relayed, not a stall.
        self._starting = False

    # --- relaying -----------------------------------------------------------------------------------

    async def publish(self, ids: Sequence[int], messages: Sequence[Message]) -> None:
        """The fast path: sends rows the caller has just committed and deletes them. Raises on an outage;
        the rows then stay for `relay_once` (the same ids: consumers recognise a second copy)."""
        if not ids:
            return
        sent, refused = await self._send(ids, messages)
        async with transaction(self._sessionmaker) as session:
            await self._settle(session, sent, refused)

    async def relay_once(self) -> int:
        """Claims, sends and settles one batch; returns how many rows it took (sent or quarantined)."""
        async with transaction(self._sessionmaker) as session:
            claimed = await self.source.claim(session, self._batch_size)
            if not len(claimed):
                return 0
            sent, refused = await self._send(claimed.ids, claimed.messages)
            await self._settle(session, sent, [*claimed.unpublishable, *refused])
            return len(sent) + len(claimed.unpublishable) + len(refused)

    async def _send(self, ids: Sequence[int], messages: Sequence[Message]) -> tuple[list[int], list[Unpublishable]]:
        if not ids:
            return [], []
        try:
            oversized = await send_all(self._producer, messages, max_record_bytes=self._max_record_bytes)
        except Exception as exc:
            if record_refusal(exc) is None:
                raise
            # The broker refused a batch for one of its records: send each row alone to find which.
            return await self._send_each(ids, messages)
        if not oversized:
            return list(ids), []
        skipped = set(oversized)
        sent = [i for n, i in enumerate(ids) if n not in skipped]
        return sent, [self._too_large(ids[n], messages[n]) for n in oversized]

    async def _send_each(
        self, ids: Sequence[int], messages: Sequence[Message]
    ) -> tuple[list[int], list[Unpublishable]]:
        sent: list[int] = []
        refused: list[Unpublishable] = []
        # On a producer of its own, without idempotence: after a refused batch an idempotent producer's
        # sequence for that partition is ahead of the broker's, and every later record there would fail.
        isolating = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap_servers, acks="all", client_id=f"{self.service}-outbox-isolation"
        )
        await isolating.start()
        try:
            outcomes = await send_each(isolating, messages, max_record_bytes=self._max_record_bytes)
        finally:
            await isolating.stop()
        for row_id, (topic, key, value), outcome in zip(ids, messages, outcomes, strict=True):
            if outcome is None:
                sent.append(row_id)
            elif (reason := record_refusal(outcome)) is not None:
                refused.append(Unpublishable(row_id, topic, reason, describe_error(outcome), key, value))
            else:  # an outage hit this row: it stays for the next round
                log.warning("outbox row not sent", extra={"outbox_id": row_id, "error": type(outcome).__name__})
        return sent, refused

    def _too_large(self, row_id: int, message: Message) -> Unpublishable:
        topic, key, value = message
        size = len(key) + len(value)
        return Unpublishable(
            row_id, topic, "too_large", f"{size} bytes, more than {self._max_record_bytes}", key, value
        )

    async def _settle(self, session: AsyncSession, sent: list[int], refused: Sequence[Unpublishable]) -> None:
        if refused:
            await self.source.quarantine(session, refused)
            for row in refused:
                OUTBOX_QUARANTINED.labels(self.service, row.reason).inc()
                log.error(
                    "outbox row quarantined",
                    extra={"outbox_id": row.id, "topic": row.topic, "reason": row.reason, "detail": row.detail},
                )
        await self.source.delete(session, [*sent, *(r.id for r in refused)])

    async def run(self, *, idle_s: float, max_backoff_s: float = 30.0, age_every_s: float = 5.0) -> None:
        """Relays until cancelled: a full batch is followed at once by the next, otherwise it waits
        `idle_s`. An outage backs off (doubling up to `max_backoff_s`); nothing is quarantined for it."""
        backoff = 0.0
        age_at = 0.0
        self._starting = True
        while True:
            try:
                taken = await self.relay_once()
                if time.monotonic() - age_at >= age_every_s:
                    age_at = time.monotonic()
                    await self.oldest_age()
            except Exception as exc:
                self._starting = False
                backoff = min(max_backoff_s, backoff * 2 or min(0.5, max_backoff_s))
                log.warning(
                    "outbox relay failed; retrying",
                    extra={"error": describe_error(exc), "retry_in_s": backoff},
                    exc_info=not isinstance(exc, ConnectionError | OSError),
                )
                await asyncio.sleep(backoff)
                continue
            self._starting = False
            backoff = 0.0
            if taken < self._batch_size:
                await asyncio.sleep(idle_s)

    # --- stall detection ------------------------------------------------------------------------------

    async def oldest_age(self) -> float:
        """Seconds since the oldest waiting row was written (0 when none), also set as the gauge."""
        async with self._sessionmaker() as session:
            oldest = await self.source.oldest(session)
        age = max(0.0, (utcnow() - oldest).total_seconds()) if oldest is not None else 0.0
        OUTBOX_OLDEST_AGE.labels(self.service).set(age)
        return age

    def readiness(self, max_age_s: float) -> Callable[[], Awaitable[str | None]]:
        async def check() -> str | None:
            if self._starting:
                return None
            age = await self.oldest_age()
            if age > max_age_s:
                return f"oldest unpublished row is {age:.0f}s old (limit {max_age_s:g}s)"
            return None

        return check
