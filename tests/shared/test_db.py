"""shared.db.driver_connection: statements sent straight to asyncpg belong to the session's transaction,
even as its first statement (SQLAlchemy's adapter would otherwise send BEGIN only before its own)."""

from __future__ import annotations

import gc
import uuid
import weakref

import pytest

from rules.models import processed_events
from shared.db import create_engine, create_sessionmaker, driver_connection
from tests.conftest import service_settings

pytestmark = pytest.mark.db


class TestDriverConnection:
    async def test_a_first_statement_on_the_driver_rolls_back_with_the_transaction(self) -> None:
        engine = create_engine(service_settings("rules").database_url, pool_size=1)
        maker = create_sessionmaker(engine)
        event_id = f"driver-{uuid.uuid4()}"
        insert = (
            "insert into rules.processed_events (consumer_group, tenant_id, source, event_id)"
            " values ('test-driver', 'test', 'test', $1)"
        )
        try:
            async with maker() as session:
                async with session.begin():
                    driver = await driver_connection(session)
                    assert driver.is_in_transaction()
                    await driver.execute(insert, event_id)
                    assert await driver_connection(session) is driver, "looked up once per transaction"
                    await session.rollback()
            async with maker() as session:
                rows = (
                    await session.execute(processed_events.select().where(processed_events.c.event_id == event_id))
                ).all()
            assert rows == [], "the insert was part of the rolled-back transaction"
        finally:
            await engine.dispose()

    async def test_a_session_that_used_the_driver_is_freed_without_the_cyclic_collector(self) -> None:
        # Every request's session: one kept alive by a reference cycle waits for the collector, whose passes
        # over thousands of them stalled a server for tens of milliseconds.
        engine = create_engine(service_settings("rules").database_url, pool_size=1)
        maker = create_sessionmaker(engine)
        gc.collect()
        gc.disable()
        try:
            async with maker() as session:
                async with session.begin():
                    await (await driver_connection(session)).fetch("select 1")
                    await (await driver_connection(session)).fetch("select 2")  # the cached lookup
                freed = weakref.ref(session.sync_session)
            del session
            assert freed() is None, "the session outlived its block: a reference cycle holds it"
        finally:
            gc.enable()
            await engine.dispose()
