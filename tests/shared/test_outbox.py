"""The relay's classification, without a broker: a record the broker refuses for what it is gets a reason code
(quarantined), anything else is an outage (retried, nothing quarantined)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import cast

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidTimestampError,
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    OutOfOrderSequenceNumber,
    RecordTooLargeError,
    RequestTimedOutError,
    TopicAuthorizationFailedError,
)
from sqlalchemy.ext.asyncio import async_sessionmaker

from shared.db import AsyncReadSession, AsyncSession
from shared.faults import record_refusal as refusal
from shared.outbox import Claimed, OutboxRelay, Unpublishable, describe_error


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (MessageSizeTooLargeError(), "too_large"),
        (RecordTooLargeError(), "too_large"),
        (InvalidTimestampError(), "refused"),
    ],
)
def test_a_record_the_broker_refuses_has_a_reason(error: BaseException, reason: str) -> None:
    assert refusal(error) == reason


@pytest.mark.parametrize(
    "error",
    [
        KafkaConnectionError(),
        KafkaTimeoutError(),
        RequestTimedOutError(),
        NotLeaderForPartitionError(),
        # A producer's state or the deployment, not the record: never quarantine a row for them.
        OutOfOrderSequenceNumber(),
        TopicAuthorizationFailedError(),
        ConnectionRefusedError(),
        OSError("connection reset"),
        RuntimeError("anything else"),
    ],
)
def test_anything_else_is_an_outage(error: BaseException) -> None:
    assert refusal(error) is None


def test_a_reason_is_always_storable() -> None:
    detail = describe_error(ValueError("bad \udc80 type" + "x" * 1000))
    assert detail.encode("utf-8")
    assert len(detail) <= 500


class _Source:
    def __init__(self) -> None:
        self.deleted: list[int] = []
        self.quarantined: list[Unpublishable] = []

    async def claim(self, session: AsyncSession, limit: int) -> Claimed:
        return Claimed(ids=[1, 2], messages=[("t", b"k", b"v"), ("t", b"k", b"w")])

    async def delete(self, session: AsyncSession, ids: Sequence[int]) -> None:
        self.deleted.extend(ids)

    async def quarantine(self, session: AsyncSession, rows: Sequence[Unpublishable]) -> None:
        self.quarantined.extend(rows)

    async def oldest(self, session: AsyncReadSession) -> datetime | None:
        return None


class _Session:
    @asynccontextmanager
    async def begin(self) -> AsyncIterator[None]:
        yield


@asynccontextmanager
async def _sessions() -> AsyncIterator[_Session]:
    yield _Session()


class _BrokerDown:
    async def partitions_for(self, topic: str) -> set[int]:
        raise KafkaConnectionError("broker unreachable")


async def test_an_outage_is_raised_and_quarantines_nothing() -> None:
    source = _Source()
    relay = OutboxRelay(
        service="test",
        sessionmaker=cast(async_sessionmaker[AsyncSession], _sessions),
        producer=cast(AIOKafkaProducer, _BrokerDown()),
        source=source,
        bootstrap_servers="unused:9092",
    )
    with pytest.raises(KafkaConnectionError):
        await relay.relay_once()
    with pytest.raises(KafkaConnectionError):
        await relay.publish([3], [("t", b"k", b"v")])
    assert (source.deleted, source.quarantined) == ([], [])


class _FlakySource(_Source):
    """The database is unreachable for the first two claims."""

    def __init__(self) -> None:
        super().__init__()
        self.claims = 0

    async def claim(self, session: AsyncSession, limit: int) -> Claimed:
        self.claims += 1
        if self.claims <= 2:
            raise ConnectionRefusedError("database down")
        return Claimed()


async def test_the_loop_outlives_an_outage_and_resumes() -> None:
    source = _FlakySource()
    relay = OutboxRelay(
        service="test",
        sessionmaker=cast(async_sessionmaker[AsyncSession], _sessions),
        producer=cast(AIOKafkaProducer, _BrokerDown()),
        source=source,
        bootstrap_servers="unused:9092",
    )
    task = asyncio.create_task(relay.run(idle_s=0.01, max_backoff_s=0.01, age_every_s=3600))
    try:
        for _ in range(200):
            if source.claims > 3:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert source.claims > 3, "claims go on after the outage"
    assert (source.deleted, source.quarantined) == ([], [])
