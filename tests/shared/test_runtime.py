import gc

import pytest

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

    async def test_lazy_pool_when_warm_up_is_off(self) -> None:
        settings = service_settings("ledger", database_pool_size=4, consumers_enabled=False, database_pool_warm=False)
        async with Runtime(settings, api_keys=api_keys) as runtime:
            assert runtime.engine.pool.checkedin() == 0  # type: ignore[attr-defined]

    async def test_an_unreachable_database_is_not_fatal(self) -> None:
        engine = db.create_engine(database_url("ledger").replace(":5432/", ":1/"), pool_size=3)
        try:
            assert await db.warm_pool(engine, 3) == 0
        finally:
            await engine.dispose()
