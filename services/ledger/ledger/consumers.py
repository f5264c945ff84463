from __future__ import annotations

from collections.abc import Sequence

from ledger.rewards_service import rewards_service
from ledger.service import ledger_service
from shared.consumer import ConsumerRunner, Inbound, Rejection
from shared.db import transaction
from shared.events import CustomersPayload, PointsCommand, PurchasesPayload
from shared.runtime import Runtime
from shared.topics import CUSTOMERS, POINTS_COMMANDS, PURCHASES

GROUP = "ledger"


def commands_consumer(runtime: Runtime) -> ConsumerRunner:
    async def on_batch(batch: Sequence[Inbound[PointsCommand]]) -> Sequence[Rejection]:
        # The whole batch is one database transaction: the command claims, the entries, the balances
        # and the outbox rows commit together, and only then does the runner commit the offsets.
        async with transaction(runtime.sessionmaker) as session:
            return await ledger_service.handle_commands(session, batch)

    return runtime.make_consumer(group=GROUP, topics=[POINTS_COMMANDS], handler=on_batch)


def tiers_consumer(runtime: Runtime) -> ConsumerRunner:
    async def on_batch(batch: Sequence[Inbound[CustomersPayload]]) -> Sequence[Rejection]:
        async with transaction(runtime.sessionmaker) as session:
            return await rewards_service.handle_customer_events(session, batch)

    return runtime.make_consumer(group=f"{GROUP}-tiers", topics=[CUSTOMERS], handler=on_batch)


def refunds_consumer(runtime: Runtime) -> ConsumerRunner:
    async def on_batch(batch: Sequence[Inbound[PurchasesPayload]]) -> Sequence[Rejection]:
        async with transaction(runtime.sessionmaker) as session:
            return await rewards_service.handle_purchase_events(session, batch)

    return runtime.make_consumer(group=f"{GROUP}-refunds", topics=[PURCHASES], handler=on_batch)
