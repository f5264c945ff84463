from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from metrics import tasks
from metrics.config import Settings, settings
from metrics.consumers import CONSUMERS
from metrics.endpoints import router
from metrics.models import api_keys
from shared.runtime import Runtime, State, base_app


def create_app(app_settings: Settings = settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        async with Runtime(app_settings, api_keys=api_keys, consumers=CONSUMERS) as runtime:
            tasks.start(app_settings, runtime)
            yield runtime.state()

    app = base_app(
        title="Loyalty metrics",
        description="The loyalty KPIs: retention, churn, repeat purchase, CLV, NPS, Pareto share, segments.",
        version="0.1.0",
        settings=app_settings,
        lifespan=lifespan,
    )
    app.include_router(router)
    return app
