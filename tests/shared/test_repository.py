"""shared.repository.RepositoryBase: the driver it hands out is the session's own connection, and what it
writes with COPY belongs to the session's transaction (kept on commit, gone on rollback)."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from rules.models import processed_events
from shared.db import AsyncSession, create_engine, create_sessionmaker, driver_connection
from shared.repository import RepositoryBase
from tests.conftest import service_settings

pytestmark = pytest.mark.db

COLUMNS = ("consumer_group", "tenant_id", "source", "event_id")


class _Events(RepositoryBase[AsyncSession]):
    async def ids(self, prefix: str) -> list[str]:
        stmt = select(processed_events.c.event_id).where(processed_events.c.event_id.startswith(prefix))
        return sorted(await self.get_all(stmt))


class TestRepositoryBase:
    async def test_copy_and_reads_run_in_the_session_transaction(self) -> None:
        engine = create_engine(service_settings("rules").database_url, pool_size=1)
        maker = create_sessionmaker(engine)
        prefix = f"repo-{uuid.uuid4()}"
        rows = [("test-repository", "test", "test", f"{prefix}-{i}") for i in range(3)]
        try:
            async with maker() as session:
                async with session.begin():
                    repo = _Events.from_session(session)
                    assert isinstance(repo, _Events)
                    assert repo.session is session
                    await repo.copy("processed_events", COLUMNS, rows[:2], schema="rules")
                    assert await repo.driver() is await driver_connection(session), "the session's connection"
                    assert await repo.ids(prefix) == [f"{prefix}-0", f"{prefix}-1"]
                    await session.rollback()
            async with maker() as session, session.begin():
                assert await _Events.from_session(session).ids(prefix) == [], "rolled back with the transaction"
                await _Events.from_session(session).copy("processed_events", COLUMNS, rows[2:], schema="rules")
            async with maker() as session:
                assert await _Events.from_session(session).ids(prefix) == [f"{prefix}-2"], "kept on commit"
        finally:
            async with maker() as session, session.begin():
                await session.execute(processed_events.delete().where(processed_events.c.event_id.startswith(prefix)))
            await engine.dispose()
