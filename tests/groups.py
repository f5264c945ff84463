"""Consumer groups seen from outside, as an operator sees them: their lag, and a reset to the earliest offsets."""

from __future__ import annotations

from collections.abc import Callable

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient


async def group_lag(bootstrap: str, wanted: Callable[[str], bool] = lambda _: True) -> int:
    """Messages the `wanted` groups have not committed yet, over every partition they committed on."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await admin.start()
    await consumer.start()
    try:
        total = 0
        for group, *_ in await admin.list_consumer_groups():
            if not wanted(group):
                continue
            committed = await admin.list_consumer_group_offsets(group)
            ends = await consumer.end_offsets(list(committed))
            total += sum(max(0, ends[tp] - meta.offset) for tp, meta in committed.items() if meta.offset >= 0)
        return total
    finally:
        await consumer.stop()
        await admin.close()


async def reset_to_earliest(bootstrap: str, group: str) -> int:
    """Commits the earliest offset of every partition `group` has committed on (the group must have no running
    members); returns how many messages the group will read again."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = list(committed)
        consumer.assign(partitions)
        earliest = await consumer.beginning_offsets(partitions)
        await consumer.commit(dict(earliest.items()))
        return sum(committed[tp].offset - earliest[tp] for tp in partitions)
    finally:
        await consumer.stop()
