from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from ledger.config import Settings, settings
from ledger.consumers import commands_consumer, refunds_consumer, tiers_consumer
from ledger.endpoints import router
from ledger.models import api_keys
from ledger.rewards_endpoints import router as rewards_router
from ledger.tasks import start as start_background
from shared.runtime import Runtime, State, base_app

DESCRIPTION = """The append-only, double-entry points ledger: balances, history, redemptions, holds, transfers,
adjustments, expiry and verification.

Every write needs an `Idempotency-Key` header, scoped to the calling API key: the same key with the same
request returns the stored response, the same key with a different request is refused with 422; another
API key's requests never share it.

**Clawback policy.** A clawback takes back at most what its earn gave, less earlier clawbacks of it (409
`ClawbackExceedsEarn` beyond that): pending points first, then available ones (from the original earn's
lot first). Points the customer already spent cannot be taken back; by default
(`clawback_policy=receivable`) the customer's balance never goes below zero and the shortfall is booked
on the programme's `system:receivable` account, where finance can see and settle it. A programme can
choose `negative_balance` instead: the customer's available balance goes negative and future credits
pay it off first.
"""


def create_app(app_settings: Settings = settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        async with Runtime(
            app_settings, api_keys=api_keys, consumers=[commands_consumer, tiers_consumer, refunds_consumer]
        ) as runtime:
            start_background(app_settings, runtime)
            yield runtime.state()

    app = base_app(
        title="Loyalty ledger",
        description=DESCRIPTION,
        version="0.2.0",
        settings=app_settings,
        lifespan=lifespan,
    )
    app.include_router(router)
    app.include_router(rewards_router)
    return app
