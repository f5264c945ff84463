"""A purchase is recorded by its order row, not by a tracking row: a redelivered purchase is skipped,
and two consumers recording the same purchase at once (a rebalance) end with one recording. Refunds in
later batches read what earlier ones stored."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import async_sessionmaker

from rules.models import Award, CustomerState, Order, processed_events
from rules.service import BatchOutcome, rules_service
from shared.consumer import RetryLater, is_transient
from shared.db import AsyncSession, transaction
from shared.events import CloudEvent, decode_event
from tests.rules.helpers import inbound, rules_database
from tests.rules.samples import BASE, doc, line, order, refund, review

pytestmark = pytest.mark.db

DOCUMENT = doc(BASE, {"id": "review", "kind": "engagement", "on": "review.posted", "points": 10})


@pytest.fixture
async def sessionmaker(tenant: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    async with rules_database(tenant, DOCUMENT) as maker:
        yield maker


async def _process(maker: async_sessionmaker[AsyncSession], *events: CloudEvent[Any]) -> BatchOutcome:
    async with transaction(maker) as session:
        return await rules_service.process_batch(session, [inbound(e) for e in events])


async def _count(maker: async_sessionmaker[AsyncSession], stmt: Any) -> int:
    async with maker() as session:
        return int((await session.execute(stmt)).scalar_one())


class TestRedelivery:
    async def test_a_redelivered_purchase_changes_nothing_and_leaves_no_tracking_row(
        self, sessionmaker: async_sessionmaker[AsyncSession], tenant: str
    ) -> None:
        first = order(tenant, "c1", [line("A", "x", "1", "30")])
        second = order(tenant, "c1", [line("A", "x", "1", "40")])
        done = await _process(sessionmaker, first, second)
        assert done.awards == 2
        # The batch again (a crash before the offset commit), plus one new purchase and a review.
        new, posted = order(tenant, "c1", [line("A", "x", "1", "50")]), review(tenant, "c1")
        again = await _process(sessionmaker, first, second, new, posted)
        assert again.rejections == []
        assert [r["key"] for r in again.outbox_rows] == [f"{tenant}:c1".encode()] * 2
        assert again.awards == 2, "the new purchase and the review; nothing for the redelivered two"
        state = select(CustomerState.purchase_count).where(CustomerState.tenant_id == tenant)
        assert await _count(sessionmaker, state) == 3
        points = select(func.sum(Award.points)).where(Award.tenant_id == tenant)
        assert await _count(sessionmaker, points) == 30 + 40 + 50 + 10
        ids = [first.id, second.id, new.id, posted.id]
        tracked = (
            select(func.count())
            .select_from(processed_events)
            .where(processed_events.c.tenant_id == tenant, processed_events.c.event_id.in_(ids))
        )
        assert await _count(sessionmaker, tracked) == 1, "only the review has an event's tracking row"

    async def test_the_same_purchase_twice_in_one_batch_counts_once(
        self, sessionmaker: async_sessionmaker[AsyncSession], tenant: str
    ) -> None:
        purchase = order(tenant, "c1", [line("A", "x", "1", "30")])
        outcome = await _process(sessionmaker, purchase, purchase)
        assert (outcome.awards, outcome.rejections) == (1, [])

    async def test_another_event_for_a_recorded_order_is_refused(
        self, sessionmaker: async_sessionmaker[AsyncSession], tenant: str
    ) -> None:
        purchase = order(tenant, "c1", [line("A", "x", "1", "30")], order_id="SO-1")
        await _process(sessionmaker, purchase)
        copy = order(tenant, "c1", [line("A", "x", "1", "30")], order_id="SO-1")
        outcome = await _process(sessionmaker, copy)
        (rejection,) = outcome.rejections
        assert rejection.reason == f"order 'SO-1' was already processed (event {purchase.id})"


class TestConcurrentRecording:
    async def test_the_second_consumer_retries_and_then_skips_the_purchase(
        self, sessionmaker: async_sessionmaker[AsyncSession], tenant: str
    ) -> None:
        purchase = order(tenant, "c1", [line("A", "x", "1", "30")])
        first_wrote = asyncio.Event()
        release_first = asyncio.Event()

        async def first_consumer() -> BatchOutcome:
            async with transaction(sessionmaker) as session:
                outcome = await rules_service.process_batch(session, [inbound(purchase)])
                first_wrote.set()
                await release_first.wait()  # commits only after the second consumer has written
            return outcome

        async def second_consumer() -> BatchOutcome:
            await first_wrote.wait()
            async with transaction(sessionmaker) as session:
                return await rules_service.process_batch(session, [inbound(purchase)])

        first = asyncio.create_task(first_consumer())
        second = asyncio.create_task(second_consumer())
        await first_wrote.wait()
        await asyncio.sleep(0.5)  # the second reads no order yet and blocks on the first's order row
        assert not second.done()
        release_first.set()
        assert (await first).awards == 1
        with pytest.raises(RetryLater) as raised:
            await second
        assert is_transient(raised.value), "the consumer retries the batch instead of dead-lettering it"
        retried = await _process(sessionmaker, purchase)
        assert (retried.awards, retried.rejections, retried.outbox_rows) == (0, [], [])
        orders = select(func.count()).select_from(Order).where(Order.tenant_id == tenant)
        assert await _count(sessionmaker, orders) == 1


class TestRefundsAcrossBatches:
    async def test_each_refund_claws_back_its_share_and_the_award_records_the_total(
        self, sessionmaker: async_sessionmaker[AsyncSession], tenant: str
    ) -> None:
        purchase = order(tenant, "c1", [line("A", "x", "1", "200")], order_id="SO-R")
        (earn,) = (await _process(sessionmaker, purchase)).outbox_rows
        # Three batches: 50 of 200 refunded (a quarter of the 200 points), then 100, then 100 more, of
        # which only the 50 still unrefunded count. Each batch reads what the last one stored.
        claws = []
        for amount in ("50", "100", "100"):
            outcome = await _process(sessionmaker, refund(tenant, "c1", "SO-R", amount))
            assert outcome.rejections == []
            claws.append([decode_event(r["value"]).data.points for r in outcome.outbox_rows])
        assert claws == [[50], [100], [50]]
        stored = select(Award.clawed_back).where(
            Award.tenant_id == tenant, Award.command_id == decode_event(earn["value"]).data.command_id
        )
        assert await _count(sessionmaker, stored) == 200
