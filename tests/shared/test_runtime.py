import asyncio
import gc

import pytest
from sqlalchemy import text

from ledger.models import api_keys
from shared import db
from shared.runtime import GC_THRESHOLDS, Runtime
from tests.conftest import database_url, service_settings

pytestmark = [pytest.mark.db, pytest.mark.kafka]


class TestPoolWarmUp:
    async def test_runtime_opens_the_whole_pool_at_start(self) -> None:
        settings = service_settings("ledger", database_pool_size=4, consumers_enabled=False)
        async with Runtime(settings, api_keys=api_keys) as runtime:
            # Connections the pool holds idle, ready for the first burst of requests.
            assert runtime.engine.pool.checkedin() == 4  # type: ignore[attr-defined]
            assert gc.get_threshold() == GC_THRESHOLDS
            # Start-up's objects are frozen out of the collector's generations (the engine among them).
            assert gc.get_freeze_count() > 0
            assert all(o is not runtime.engine for o in gc.get_objects())
        assert gc.get_freeze_count() == 0, "thawed at the end, so the objects of a stopped runtime can go"

    async def test_lazy_pool_when_warm_up_is_off(self) -> None:
        settings = service_settings("ledger", database_pool_size=4, consumers_enabled=False, database_pool_warm=False)
        async with Runtime(settings, api_keys=api_keys) as runtime:
            assert runtime.engine.pool.checkedin() == 0  # type: ignore[attr-defined]

    async def test_a_database_that_never_answers_holds_start_up_for_the_timeout_only(self) -> None:
        # A listener on loopback that accepts connections and never says a word, like a hung server.
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        engine = db.create_engine(database_url("ledger").replace(":5432/", f":{port}/"), pool_size=2)
        try:
            began = asyncio.get_running_loop().time()
            assert await db.warm_pool(engine, 2, timeout_s=0.5) == 0
            assert asyncio.get_running_loop().time() - began < 3
        finally:
            await engine.dispose()
            server.close()

    async def test_an_unreachable_database_is_not_fatal(self) -> None:
        engine = db.create_engine(database_url("ledger").replace(":5432/", ":1/"), pool_size=3)
        try:
            assert await db.warm_pool(engine, 3) == 0
        finally:
            await engine.dispose()


class TestPlanCacheMode:
    async def test_the_ledger_uses_generic_plans_and_others_the_default(self) -> None:
        for service, expected in (("ledger", "force_generic_plan"), ("rules", "auto")):
            settings = service_settings(service, consumers_enabled=False, database_pool_size=1)
            async with Runtime(settings, api_keys=api_keys) as runtime, runtime.engine.connect() as conn:
                assert (await conn.execute(text("show plan_cache_mode"))).scalar_one() == expected
