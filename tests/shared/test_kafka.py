import uuid

import pytest
from aiokafka import AIOKafkaProducer

from shared.kafka import delete_topics, ensure_topics, send_all
from shared.topics import TopicSpec
from tests.conftest import KAFKA, read_topic, topic

pytestmark = pytest.mark.kafka


class TestSendAll:
    async def test_lands_where_send_would_in_order_across_many_batches(self) -> None:
        batched, single = topic(f"send-all-{uuid.uuid4().hex[:6]}"), topic(f"send-one-{uuid.uuid4().hex[:6]}")
        await ensure_topics(KAFKA, [TopicSpec(batched, 3), TopicSpec(single, 3)])
        # Small batches, so every partition gets several of them and their order is exercised.
        producer = AIOKafkaProducer(bootstrap_servers=KAFKA, enable_idempotence=True, acks="all", max_batch_size=2048)
        await producer.start()
        try:
            messages = [(f"acme:c-{i % 17}".encode(), f"message {i} ".encode() * 20) for i in range(600)]
            await send_all(producer, ((batched, key, value) for key, value in messages))
            for key, value in messages:
                await producer.send(single, value, key=key)
            await producer.flush()
        finally:
            await producer.stop()

        def placed(name: str) -> dict[int, list[bytes]]:
            by_partition: dict[int, list[bytes]] = {}
            for record in records[name]:
                assert record.value is not None
                by_partition.setdefault(record.partition, []).append(record.value)
            return by_partition

        try:
            records = {
                name: await read_topic(name, until=lambda rs: len(rs) >= len(messages)) for name in (batched, single)
            }
        finally:
            await delete_topics(KAFKA, [batched, single])
        assert len(records[batched]) == len(messages), "every message arrived once"
        # The same partition as `send` chooses for the key, in the order they were given.
        assert placed(batched) == placed(single)
        assert len(placed(batched)) > 1
