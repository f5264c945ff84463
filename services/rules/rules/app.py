import asyncio
import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import timedelta

from fastapi import FastAPI

from rules.config import Settings, settings
from rules.consumers import purchases_consumer, sweep_outbox
from rules.endpoints import router
from rules.models import api_keys
from rules.service import OutboxRelay
from shared.runtime import Runtime, State, base_app


def create_app(app_settings: Settings = settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        consumer = functools.partial(purchases_consumer, state_cache_size=app_settings.state_cache_size)
        async with Runtime(app_settings, api_keys=api_keys, consumers=[consumer]) as runtime:
            sweeper = None
            if app_settings.consumers_enabled:
                relay = OutboxRelay(runtime.sessionmaker, runtime.producer.raw, namespace=app_settings.topic_namespace)
                sweeper = asyncio.create_task(
                    sweep_outbox(
                        relay,
                        interval_s=app_settings.outbox_sweep_seconds,
                        older_than=timedelta(seconds=app_settings.outbox_sweep_after_seconds),
                    ),
                    name="outbox-sweep",
                )
            try:
                yield runtime.state()
            finally:
                if sweeper is not None:
                    sweeper.cancel()
                    with suppress(asyncio.CancelledError):
                        await sweeper

    app = base_app(
        title="Loyalty rules",
        description="Versioned, explainable rules that turn purchases and engagement into points.",
        version="0.2.0",
        settings=app_settings,
        lifespan=lifespan,
    )
    app.include_router(router)
    return app
