"""An in-memory `RecordFeed` and `RecordSink` for `ConsumerRunner` (tests only): partitions as lists, a
position and a committed offset per partition, dead letters as a list. Faults are queued by hand: the
next fetches, commits or sends raise them in turn.

It keeps what the runner relies on of a broker (records of a partition come in offset order, `seek`
moves the next fetch, `highwater` is the next offset) and nothing else (one member, no rebalances)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition

from shared.consumer import DeadLetter


def record(
    topic: str, partition: int, offset: int, value: bytes | None, key: bytes | None = None, headers: Sequence[Any] = ()
) -> ConsumerRecord[bytes, bytes]:
    size = len(value) if value is not None else 0
    return ConsumerRecord(topic, partition, offset, 0, 0, key, value, None, 0, size, tuple(headers))


class MemoryFeed:
    def __init__(self, topic: str, partitions: int = 1) -> None:
        self.topic = topic
        self.logs: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {
            TopicPartition(topic, p): [] for p in range(partitions)
        }
        self.positions = dict.fromkeys(self.logs, 0)
        self.committed: dict[TopicPartition, int] = {}
        self.commits: list[dict[TopicPartition, int]] = []
        self.fetch_faults: list[BaseException] = []
        self.commit_faults: list[BaseException] = []
        self.started = self.stopped = False
        self._arrived = asyncio.Event()

    def append(self, value: bytes | None, *, key: bytes | None = None, partition: int = 0) -> TopicPartition:
        tp = TopicPartition(self.topic, partition)
        log = self.logs[tp]
        log.append(record(self.topic, partition, len(log), value, key))
        self._arrived.set()
        return tp

    def settled(self) -> bool:
        """Every partition's committed offset is at its end."""
        return all(self.committed.get(tp, 0) == len(log) for tp, log in self.logs.items())

    # --- RecordFeed -------------------------------------------------------------------------------

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        if self.fetch_faults:
            raise self.fetch_faults.pop(0)
        batch = self._take(max_records)
        if not batch:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout_ms / 1000)
            except TimeoutError:
                return {}
            batch = self._take(max_records)
        return batch

    def _take(self, max_records: int | None) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        left = max_records if max_records is not None else 1 << 30
        batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}
        for tp, log in self.logs.items():
            records = log[self.positions[tp] : self.positions[tp] + left]
            if records:
                batch[tp] = records
                self.positions[tp] += len(records)
                left -= len(records)
        return batch

    async def commit(self, offsets: dict[TopicPartition, int] | None = None) -> None:
        if self.commit_faults:
            raise self.commit_faults.pop(0)
        offsets = dict(offsets if offsets is not None else self.positions)
        self.commits.append(offsets)
        self.committed.update(offsets)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.positions[partition] = offset

    def assignment(self) -> set[TopicPartition]:
        return set(self.logs)

    def highwater(self, partition: TopicPartition) -> int | None:
        return len(self.logs[partition])


class MemorySink:
    """Dead letters kept as the records the DLQ topic would hold."""

    def __init__(self) -> None:
        self.records: list[ConsumerRecord[bytes, bytes]] = []
        self.faults: list[BaseException] = []

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> Awaitable[Any]:
        if self.faults:
            raise self.faults.pop(0)
        stored = record(topic, 0, len(self.records), value, key, headers or ())
        self.records.append(stored)
        acked: asyncio.Future[ConsumerRecord[bytes, bytes]] = asyncio.get_running_loop().create_future()
        acked.set_result(stored)
        return acked

    @property
    def letters(self) -> list[DeadLetter]:
        return [DeadLetter.from_record(r) for r in self.records]
