from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from rules.config import Settings, settings
from rules.consumers import purchases_consumer
from rules.endpoints import router
from rules.models import api_keys
from shared.runtime import Runtime, State, base_app


def create_app(app_settings: Settings = settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        async with Runtime(app_settings, api_keys=api_keys, consumers=[purchases_consumer]) as runtime:
            yield runtime.state()

    app = base_app(
        title="Loyalty rules",
        description="Versioned, explainable rules that turn purchases and engagement into points.",
        version="0.1.0",
        settings=app_settings,
        lifespan=lifespan,
    )
    app.include_router(router)
    return app
