"""Repository paths with their own mechanics: outbox ids come in blocks of consecutive ids per transaction
and deletes go by id range (neither may touch another transaction's rows); customer states go through a
staging table as typed arrays and must come back as they went in."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker

from rules.engine import CustomerSnapshot
from rules.models import OutboxMessage
from rules.repository import (
    OUTBOX_ID_BLOCK,
    CustomerStateRepository,
    OutboxRepository,
    StateChanged,
)
from shared.db import AsyncSession, create_engine, create_sessionmaker, transaction
from tests.conftest import service_settings

pytestmark = pytest.mark.db


@pytest.fixture
async def sessionmaker() -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(service_settings("rules").database_url, pool_size=2)
    yield create_sessionmaker(engine)
    await engine.dispose()


def _rows(tenant: str, count: int) -> list[dict[str, Any]]:
    return [{"topic": f"outbox-test.{tenant}", "key": b"k", "value": f"{tenant}-{i}".encode()} for i in range(count)]


async def _left(maker: async_sessionmaker[AsyncSession], tenant: str) -> list[int]:
    async with maker() as session:
        stmt = select(OutboxMessage.id).where(OutboxMessage.topic == f"outbox-test.{tenant}").order_by(OutboxMessage.id)
        return list((await session.execute(stmt)).scalars().all())


class TestOutboxIds:
    async def test_interleaved_transactions_get_disjoint_ids_and_delete_only_their_own(
        self, sessionmaker: async_sessionmaker[AsyncSession], tenant: str
    ) -> None:
        count = OUTBOX_ID_BLOCK * 2 + 7  # three blocks, the last one partly used
        async with transaction(sessionmaker) as first, transaction(sessionmaker) as second:
            a = await OutboxRepository.from_session(first).add(_rows(f"{tenant}a", count))
            b = await OutboxRepository.from_session(second).add(_rows(f"{tenant}b", 10))
            a += await OutboxRepository.from_session(first).add(_rows(f"{tenant}a", 3))
        assert len(set(a)) == count + 3
        assert not set(a) & set(b)
        assert a[:count] == sorted(a[:count]), "in the rows' order"
        assert await _left(sessionmaker, f"{tenant}a") == sorted(a)
        async with transaction(sessionmaker) as session:
            await OutboxRepository.from_session(session).delete(a)
        assert await _left(sessionmaker, f"{tenant}a") == []
        assert await _left(sessionmaker, f"{tenant}b") == sorted(b), "the other transaction's rows stay"

    async def test_delete_of_ids_with_gaps_keeps_the_rows_in_the_gaps(
        self, sessionmaker: async_sessionmaker[AsyncSession], tenant: str
    ) -> None:
        async with transaction(sessionmaker) as session:
            ids = await OutboxRepository.from_session(session).add(_rows(tenant, 6))
        async with transaction(sessionmaker) as session:
            await OutboxRepository.from_session(session).delete([ids[4], ids[0], ids[1], ids[3]])
        assert await _left(sessionmaker, tenant) == [ids[2], ids[5]]


class TestCustomerStates:
    async def test_states_round_trip_and_an_update_replaces_every_field(
        self, sessionmaker: async_sessionmaker[AsyncSession], tenant: str
    ) -> None:
        rich = CustomerSnapshot(
            "c-1",
            purchase_count=7,
            first_purchase_at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
            last_purchase_at=datetime(2026, 11, 30, 23, 59, tzinfo=UTC),
            spend_by_month={"2026-11": Decimal("1234.5678"), "2025-01": Decimal("0.92"), "2026-02": Decimal("10")},
            points_by_month={"2026-11": 1200, "2025-01": 1},
            categories={"paint", "ünïcode", 'quo"te', "back\\slash", "{br,aces}", " spaced ", "NULL", ""},
            tier="Gold",
            tier_reviewed_at=datetime(2026, 10, 1, tzinfo=UTC),
            counters={"cap:month:2026-11": 1200, "limit:review:week:2026-W48": 1},
        )
        empty = CustomerSnapshot("c-2")
        odd = CustomerSnapshot("c-3", categories={""}, counters={"null": 1, "a,b": 2}, points_by_month={"2026-01": 3})
        states = {(tenant, s.customer_id): s for s in (rich, empty, odd)}
        async with transaction(sessionmaker) as session:
            await CustomerStateRepository.from_session(session).save([(tenant, s) for s in states.values()])
        async with transaction(sessionmaker) as session:
            loaded = await CustomerStateRepository.from_session(session).load(states)
        assert loaded == states
        assert str(loaded[(tenant, "c-1")].spend_by_month["2026-11"]) == "1234.5678", "the exact decimal"
        assert [s.version for s in loaded.values()] == [1, 1, 1]
        changed = CustomerSnapshot(
            "c-1", purchase_count=8, spend_by_month={"2026-12": Decimal("5")}, tier=None, version=1
        )
        async with transaction(sessionmaker) as session:
            await CustomerStateRepository.from_session(session).save([(tenant, changed)])
            assert changed.version == 2, "a saved state is at the version written"
            # A second save in the same transaction writes over the first.
            await CustomerStateRepository.from_session(session).save([(tenant, changed)])
        async with transaction(sessionmaker) as session:
            loaded = await CustomerStateRepository.from_session(session).load([(tenant, "c-1")])
        assert loaded == {(tenant, "c-1"): changed}
        assert loaded[(tenant, "c-1")].version == 3

    @pytest.mark.parametrize("read_at", [0, 1], ids=["as-new-over-a-stored-row", "over-a-newer-version"])
    async def test_a_state_read_before_another_write_is_not_written(
        self, sessionmaker: async_sessionmaker[AsyncSession], tenant: str, read_at: int
    ) -> None:
        async with transaction(sessionmaker) as session:
            repo = CustomerStateRepository.from_session(session)
            await repo.save([(tenant, CustomerSnapshot("c-1", purchase_count=1)), (tenant, CustomerSnapshot("c-2"))])
            await repo.save([(tenant, CustomerSnapshot("c-1", purchase_count=2, version=1))])  # now at 2
        stale = CustomerSnapshot("c-1", purchase_count=99, version=read_at)
        fresh = CustomerSnapshot("c-2", purchase_count=5, version=1)
        with pytest.raises(StateChanged, match="1 of 2 customer states changed since read"):
            async with transaction(sessionmaker) as session:
                await CustomerStateRepository.from_session(session).save([(tenant, fresh), (tenant, stale)])
        assert (stale.version, fresh.version) == (read_at, 1), "nothing counts as written"
        async with transaction(sessionmaker) as session:
            loaded = await CustomerStateRepository.from_session(session).load([(tenant, "c-1"), (tenant, "c-2")])
        # By key: nothing orders the rows a load returns.
        assert {k: (s.purchase_count, s.version) for k, s in loaded.items()} == {
            (tenant, "c-1"): (2, 2),
            (tenant, "c-2"): (0, 1),
        }
