"""A consumer keeps the customer states it committed for its next batches (StateCache). A state someone else
wrote meanwhile is caught when the batch writes it: the batch is retried with the state read again, and
the award is the one the current state gives."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import REGISTRY
from sqlalchemy.ext.asyncio import async_sessionmaker

from rules.batch import StateCache
from rules.consumers import batch_handler
from rules.engine import CustomerSnapshot
from rules.repository import CustomerStateRepository
from rules.service import BatchOutcome, RulesOutbox, rules_service
from shared.consumer import RetryLater, is_transient
from shared.db import AsyncSession, transaction
from shared.events import CloudEvent
from shared.outbox import OutboxRelay
from tests.conftest import KAFKA, NAMESPACE
from tests.rules.helpers import inbound, rules_database
from tests.rules.samples import BASE, doc, line, order

pytestmark = pytest.mark.db

THIRD = 1000
DOCUMENT = doc(BASE, {"id": "third", "kind": "bonus", "points": THIRD, "when": "customer.purchase_count == 2"})


@pytest.fixture
async def sessionmaker(tenant: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    async with rules_database(tenant, DOCUMENT) as maker:
        yield maker


async def _consume(
    maker: async_sessionmaker[AsyncSession], cache: StateCache | None, *events: CloudEvent[Any]
) -> BatchOutcome:
    """What the consumer's handler does: one transaction, then the committed states go back to the cache."""
    async with transaction(maker) as session:
        outcome = await rules_service.process_batch(session, [inbound(e) for e in events], state_cache=cache)
    if cache is not None:
        cache.keep(outcome.states)
    return outcome


def _points(outcome: BatchOutcome) -> int:
    (row,) = outcome.outbox_rows
    return int(row["value"].split(b'"points":', 1)[1].split(b",", 1)[0])


async def _stored(maker: async_sessionmaker[AsyncSession], tenant: str, customer: str) -> CustomerSnapshot:
    async with maker() as session:
        return (await CustomerStateRepository.from_session(session).load([(tenant, customer)]))[(tenant, customer)]


def _purchase(tenant: str, n: int) -> CloudEvent[Any]:
    return order(tenant, "c1", [line("A", "x", "1", "10")], order_id=f"SO-{n}")


class TestStateCache:
    async def test_kept_states_are_not_read_again_and_give_the_same_awards(
        self, sessionmaker: async_sessionmaker[AsyncSession], tenant: str
    ) -> None:
        cache = StateCache(100)
        points = [_points(await _consume(sessionmaker, cache, _purchase(tenant, n))) for n in (1, 2, 3)]
        assert points == [10, 10, 10 + THIRD], "the third purchase saw the count the first two left"
        assert (cache.hits, cache.misses) == (2, 1)
        stored = await _stored(sessionmaker, tenant, "c1")
        assert (stored.purchase_count, stored.version) == (3, 3)

    async def test_a_state_written_by_another_consumer_is_read_again(
        self, sessionmaker: async_sessionmaker[AsyncSession], tenant: str
    ) -> None:
        cache = StateCache(100)
        other = order(tenant, "c2", [line("A", "x", "1", "10")], order_id="SO-c2")
        await _consume(sessionmaker, cache, _purchase(tenant, 1), other)  # cached: c1 and c2, version 1
        # Another consumer (the partition moved during a rebalance) records c1's second purchase.
        await _consume(sessionmaker, None, _purchase(tenant, 2))
        third = _purchase(tenant, 3)
        with pytest.raises(RetryLater) as raised:
            await _consume(sessionmaker, cache, third)
        assert is_transient(raised.value), "the consumer retries the batch instead of dead-lettering it"
        assert len(cache) == 0, "a failed batch gives nothing back, and a stale state empties the cache"
        retried = await _consume(sessionmaker, cache, third)
        assert _points(retried) == 10 + THIRD, "evaluated on the stored state (two purchases), not the stale copy"
        stored = await _stored(sessionmaker, tenant, "c1")
        assert (stored.purchase_count, stored.version) == (3, 3)

    async def test_a_consumer_without_a_cache_sees_what_one_with_a_cache_wrote(
        self, sessionmaker: async_sessionmaker[AsyncSession], tenant: str
    ) -> None:
        cache = StateCache(100)
        await _consume(sessionmaker, cache, _purchase(tenant, 1))
        await _consume(sessionmaker, cache, _purchase(tenant, 2))
        assert _points(await _consume(sessionmaker, None, _purchase(tenant, 3))) == 10 + THIRD


def _lookups(result: str) -> float:
    return REGISTRY.get_sample_value("rules_state_cache_lookups_total", {"result": result}) or 0.0


@pytest.mark.kafka
class TestConsumerHandler:
    async def test_the_handler_keeps_committed_states_and_counts_lookups(
        self, sessionmaker: async_sessionmaker[AsyncSession], tenant: str, raw_producer: AIOKafkaProducer
    ) -> None:
        cache = StateCache(100)
        relay = OutboxRelay(
            service="rules",
            sessionmaker=sessionmaker,
            producer=raw_producer,
            source=RulesOutbox(),
            bootstrap_servers=KAFKA,
        )
        handler = batch_handler(sessionmaker, relay, namespace=NAMESPACE, state_cache=cache)
        before = (_lookups("hit"), _lookups("miss"))
        assert await handler([inbound(_purchase(tenant, 1))]) == []
        assert len(cache) == 1, "the committed state is kept"
        assert await handler([inbound(_purchase(tenant, 2)), inbound(_purchase(tenant, 3))]) == []
        assert (_lookups("hit") - before[0], _lookups("miss") - before[1]) == (1, 1)
        stored = await _stored(sessionmaker, tenant, "c1")
        assert (stored.purchase_count, stored.version) == (3, 2)


class TestStateCacheBounds:
    def test_take_removes_and_keep_evicts_the_oldest_beyond_the_limit(self) -> None:
        cache = StateCache(2)
        a, b, c = (("t", x) for x in "abc")
        cache.keep({a: CustomerSnapshot("a"), b: CustomerSnapshot("b")})
        cache.keep({c: CustomerSnapshot("c")})
        assert len(cache) == 2
        found, missing = cache.take({a, b, c})
        assert (sorted(found), missing) == ([b, c], {a}), "a, the oldest, was evicted"
        assert len(cache) == 0, "taken states are out until given back"
        cache.keep({b: found[b]})
        cache.keep({c: found[c]})
        cache.keep({a: CustomerSnapshot("a")})  # b and c kept again before a: b is now the oldest
        assert cache.take({a, b, c})[1] == {b}
        assert (cache.hits, cache.misses) == (4, 2)
