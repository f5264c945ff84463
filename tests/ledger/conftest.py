"""Ledger test helpers: a session factory on the test database and the books' invariants."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import async_sessionmaker

from ledger.models import Balance, Entry, Lot
from ledger.service import ledger_service
from shared.consumer import Inbound
from shared.db import AsyncSession, create_engine, create_sessionmaker
from shared.events import CloudEvent
from tests.conftest import database_url


@pytest.fixture(scope="session")
async def db() -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(database_url("ledger"), pool_size=5)
    yield create_sessionmaker(engine)
    await engine.dispose()


def inbound(event: CloudEvent[Any]) -> Inbound[Any]:
    # The handler never reads the raw record (only the runner does, to dead-letter it).
    return Inbound(event, "points-commands", 0, 0, cast(Any, None))


def as_superuser(sql: str) -> str:
    """Runs SQL as the postgres superuser (the trigger does not stop it with replication role replica)."""
    dbname = database_url("ledger").rsplit("/", 1)[1]
    done = subprocess.run(
        ["su", "postgres", "-c", f"psql -v ON_ERROR_STOP=1 -tA -d {dbname}"],
        input=sql,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def new_tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


async def balances(db: async_sessionmaker[AsyncSession], tenant: str) -> dict[str, tuple[int, ...]]:
    async with db() as session:
        rows = (await session.execute(select(Balance).where(Balance.tenant_id == tenant))).scalars()
        return {
            b.account_id: (b.available, b.pending, b.held, b.lifetime_earned, b.redeemed, b.expired, b.last_seq)
            for b in rows
        }


async def check_books(db: async_sessionmaker[AsyncSession], tenant: str, *, negative_allowed: bool = False) -> None:
    """The invariants every sequence of operations must keep."""
    async with db() as session:
        # Every ledger transaction sums to zero.
        unbalanced = (
            await session.execute(
                select(Entry.transaction_id, func.sum(Entry.points))
                .where(Entry.tenant_id == tenant)
                .group_by(Entry.transaction_id)
                .having(func.sum(Entry.points) != 0)
            )
        ).all()
        assert unbalanced == []
        rows = list((await session.execute(select(Balance).where(Balance.tenant_id == tenant))).scalars())
        assert sum(b.available + b.pending + b.held for b in rows) == 0
        for b in rows:
            if b.kind == "customer":
                assert b.pending >= 0
                assert b.held >= 0
                if not negative_allowed:
                    assert b.available >= 0, b.account_id
        # The balances rows equal what the entries add up to, and every hash chain holds.
        verified = await ledger_service.verify_tenant(session, tenant)
        assert verified.ok, (verified.problems, verified.failed)
        # Lots never hold more than was credited, and they cover exactly what is available or pending.
        lots = list((await session.execute(select(Lot).where(Lot.tenant_id == tenant))).scalars())
        for lot in lots:
            assert 0 <= lot.remaining <= lot.points
        for b in rows:
            if b.kind != "customer":
                continue
            mine = [lot for lot in lots if lot.account_id == b.account_id]
            assert sum(lot.remaining for lot in mine if lot.pending) == b.pending
            assert sum(lot.remaining for lot in mine if not lot.pending) == max(b.available, 0)
