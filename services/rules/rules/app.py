import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from rules.config import Settings, settings
from rules.consumers import purchases_consumer, segments_consumer
from rules.endpoints import router
from rules.models import api_keys
from rules.tasks import start as start_background
from shared.runtime import Runtime, State, base_app


def create_app(app_settings: Settings = settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        consumer = functools.partial(purchases_consumer, state_cache_size=app_settings.state_cache_size)
        async with Runtime(app_settings, api_keys=api_keys, consumers=[consumer, segments_consumer]) as runtime:
            start_background(app_settings, runtime)
            yield runtime.state()

    app = base_app(
        title="Loyalty rules",
        description="Versioned, explainable rules that turn purchases and engagement into points.",
        version="0.2.0",
        settings=app_settings,
        lifespan=lifespan,
    )
    app.include_router(router)
    return app
