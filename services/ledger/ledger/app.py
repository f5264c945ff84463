from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from ledger.config import Settings, settings
from ledger.consumers import commands_consumer
from ledger.endpoints import router
from ledger.models import api_keys
from shared.runtime import Runtime, State, base_app


def create_app(app_settings: Settings = settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        async with Runtime(app_settings, api_keys=api_keys, consumers=[commands_consumer]) as runtime:
            yield runtime.state()

    app = base_app(
        title="Loyalty ledger",
        description="The append-only, double-entry points ledger: balances, history, redemptions, holds.",
        version="0.1.0",
        settings=app_settings,
        lifespan=lifespan,
    )
    app.include_router(router)
    return app
