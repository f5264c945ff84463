"""The rules keep each customer's value segment from segment.changed (the metrics service's): the latest by
event time, each event once, tier.changed on the same topic skipped; a ruleset targets it as
`customer.segment`, and a batch holding a state read before the segment changed is retried."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any, cast

import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker

from rules.batch import StateCache
from rules.engine import CustomerSnapshot, customer_view
from rules.repository import CustomerStateRepository
from rules.service import rules_service
from shared.consumer import Inbound, RetryLater
from shared.db import AsyncSession, transaction
from shared.events import CloudEvent, SegmentChanged, TierChanged, make_event
from tests.rules.helpers import rules_database
from tests.rules.samples import BASE, T0, doc, line, order

pytestmark = pytest.mark.db

WIN_BACK = 500
DOCUMENT = doc(BASE, {"id": "win-back", "kind": "bonus", "points": WIN_BACK, "when": "customer.segment == 'at_risk'"})


def segment_event(tenant: str, customer: str, segment: str, *, minutes: int, previous: str | None = None) -> Any:
    data = SegmentChanged(customer_id=customer, previous_segment=previous, segment=segment, reason="test")
    return make_event("segment.changed", data, tenant_id=tenant, source="metrics", time=T0 + timedelta(minutes=minutes))


def received(*events: CloudEvent[Any]) -> list[Inbound[Any]]:
    return [Inbound(e, "customers", 0, n, cast(Any, None)) for n, e in enumerate(events)]


@pytest.fixture
async def sessionmaker(tenant: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    async with rules_database(tenant, DOCUMENT) as maker:
        yield maker


async def record(maker: async_sessionmaker[AsyncSession], *events: CloudEvent[Any]) -> None:
    async with transaction(maker) as session:
        await rules_service.record_segments(session, received(*events))


async def stored(maker: async_sessionmaker[AsyncSession], tenant: str, customer: str) -> CustomerSnapshot | None:
    async with maker() as session:
        return (await CustomerStateRepository.from_session(session).load([(tenant, customer)])).get((tenant, customer))


class TestRecordSegments:
    async def test_the_latest_by_event_time_wins_in_and_across_batches(
        self, sessionmaker: async_sessionmaker[AsyncSession], tenant: str
    ) -> None:
        # One batch, out of order: the 10-minute event is the latest.
        await record(
            sessionmaker,
            segment_event(tenant, "c-1", "at_risk", minutes=10),
            segment_event(tenant, "c-1", "new", minutes=0),
            segment_event(tenant, "c-2", "ambassador", minutes=5),
        )
        one, two = await stored(sessionmaker, tenant, "c-1"), await stored(sessionmaker, tenant, "c-2")
        assert one is not None
        assert two is not None
        assert (one.segment, one.purchase_count, one.version) == ("at_risk", 0, 1)  # a new state row
        assert two.segment == "ambassador"
        # A later batch with an older event changes nothing; a newer one replaces it and raises the version.
        await record(sessionmaker, segment_event(tenant, "c-1", "loyal_passive", minutes=9))
        assert (await stored(sessionmaker, tenant, "c-1")) == one
        await record(sessionmaker, segment_event(tenant, "c-1", "leaver", minutes=11))
        after = await stored(sessionmaker, tenant, "c-1")
        assert after is not None
        assert (after.segment, after.version) == ("leaver", 2)

    async def test_each_event_once_and_tier_changes_skipped(
        self, sessionmaker: async_sessionmaker[AsyncSession], tenant: str
    ) -> None:
        first = segment_event(tenant, "c-1", "at_risk", minutes=10)
        await record(sessionmaker, first)
        tier = make_event(
            "tier.changed",
            TierChanged(customer_id="c-1", tier="Gold", reason="test"),
            tenant_id=tenant,
            source="rules",
            time=T0 + timedelta(minutes=20),
        )
        await record(sessionmaker, first, tier)  # a redelivery and the rules' own tier change
        state = await stored(sessionmaker, tenant, "c-1")
        assert state is not None
        assert (state.segment, state.tier, state.version) == ("at_risk", None, 1)

    async def test_a_purchase_keeps_the_segment_and_a_cached_state_is_read_again(
        self, sessionmaker: async_sessionmaker[AsyncSession], tenant: str
    ) -> None:
        cache = StateCache(100)

        async def buy() -> int:
            async with transaction(sessionmaker) as session:
                outcome = await rules_service.process_batch(
                    session, received(order(tenant, "c-1", [line("A", "tools", "1", "10")])), state_cache=cache
                )
            cache.keep(outcome.states)
            (row,) = outcome.outbox_rows
            return int(row["value"].split(b'"points":', 1)[1].split(b",", 1)[0])

        assert await buy() == 10  # no segment yet: base points only; the state is now cached
        await record(sessionmaker, segment_event(tenant, "c-1", "at_risk", minutes=1))
        # The cached state predates the segment: its write fails, the batch is retried and reads it again.
        with pytest.raises(RetryLater):
            await buy()
        assert await buy() == 10 + WIN_BACK
        state = await stored(sessionmaker, tenant, "c-1")
        assert state is not None
        assert (state.segment, state.purchase_count) == ("at_risk", 2)  # of three attempts, one failed


def test_the_condition_view_names_the_segment() -> None:
    assert customer_view(CustomerSnapshot("c", segment="at_risk"), T0, ["segment"]) == {"segment": "at_risk"}
    assert customer_view(CustomerSnapshot("c"), T0, ["segment"]) == {"segment": ""}
