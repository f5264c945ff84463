"""One consumer per input topic; each batch is one transaction and one service call."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from metrics.service import metrics_service
from shared.consumer import ConsumerRunner, Inbound, Rejection
from shared.db import AsyncSession, transaction
from shared.runtime import Runtime
from shared.topics import CUSTOMERS, ENGAGEMENT, LEDGER_ENTRIES, PURCHASES, REWARDS

Handle = Callable[[AsyncSession, Sequence[Inbound[Any]]], Awaitable[list[Rejection]]]

# Group ids: the purchases consumer keeps the service's first group (and its committed offsets).
GROUPS: dict[str, tuple[str, Handle]] = {
    PURCHASES: ("metrics", metrics_service.handle_purchases),
    ENGAGEMENT: ("metrics-engagement", metrics_service.handle_engagement),
    LEDGER_ENTRIES: ("metrics-ledger-entries", metrics_service.handle_ledger_entries),
    CUSTOMERS: ("metrics-customers", metrics_service.handle_customers),
    REWARDS: ("metrics-rewards", metrics_service.handle_rewards),
}


def consumer(topic: str) -> Callable[[Runtime], ConsumerRunner]:
    group, handle = GROUPS[topic]

    def make(runtime: Runtime) -> ConsumerRunner:
        async def on_batch(batch: Sequence[Inbound[Any]]) -> Sequence[Rejection]:
            async with transaction(runtime.sessionmaker) as session:
                return await handle(session, batch)

        return runtime.make_consumer(group=group, topics=[topic], handler=on_batch)

    return make


CONSUMERS = [consumer(topic) for topic in GROUPS]
