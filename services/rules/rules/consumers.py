from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import cast

from prometheus_client import Counter
from sqlalchemy.ext.asyncio import async_sessionmaker

from rules.batch import StateCache
from rules.config import STATE_CACHE_SIZE, Settings
from rules.service import rules_service
from rules.tasks import outbox_relay
from shared.consumer import BatchHandler, ConsumerRunner, Inbound, Rejection
from shared.db import AsyncSession, transaction
from shared.events import CustomersPayload, EngagementPayload, PurchasesPayload
from shared.outbox import OutboxRelay
from shared.runtime import Runtime
from shared.topics import CUSTOMERS, ENGAGEMENT, PURCHASES

log = logging.getLogger(__name__)

GROUP = "rules"
SEGMENTS_GROUP = "rules-segments"

STATE_CACHE_LOOKUPS = Counter(
    "rules_state_cache_lookups_total",
    "Customer states committed batches found in the consumer's cache (hit) or read from the database (miss)",
    ["result"],
)


def batch_handler(
    sessionmaker: async_sessionmaker[AsyncSession],
    relay: OutboxRelay,
    *,
    namespace: str,
    state_cache: StateCache | None = None,
) -> BatchHandler[PurchasesPayload | EngagementPayload]:
    async def on_batch(batch: Sequence[Inbound[PurchasesPayload | EngagementPayload]]) -> Sequence[Rejection]:
        hits, misses = (state_cache.hits, state_cache.misses) if state_cache is not None else (0, 0)
        async with transaction(sessionmaker) as session:
            outcome = await rules_service.process_batch(session, batch, namespace=namespace, state_cache=state_cache)
        if state_cache is not None:
            state_cache.keep(outcome.states)  # committed: the next batches start from these
            STATE_CACHE_LOOKUPS.labels("hit").inc(state_cache.hits - hits)
            STATE_CACHE_LOOKUPS.labels("miss").inc(state_cache.misses - misses)
        # Committed: the commands are durable in the outbox. Publishing them now is the fast path; if
        # this process dies first, the sweep publishes them (same command ids, so no double award).
        await relay.publish(outcome.outbox_ids, [(r["topic"], r["key"], r["value"]) for r in outcome.outbox_rows])
        return outcome.rejections

    return on_batch


def purchases_consumer(runtime: Runtime, *, state_cache_size: int = STATE_CACHE_SIZE) -> ConsumerRunner:
    relay = outbox_relay(cast(Settings, runtime.settings), runtime.sessionmaker, runtime.producer)
    handler = batch_handler(
        runtime.sessionmaker,
        relay,
        namespace=runtime.settings.topic_namespace,
        state_cache=StateCache(state_cache_size) if state_cache_size else None,
    )
    return runtime.make_consumer(group=GROUP, topics=[PURCHASES, ENGAGEMENT], handler=handler)


def segments_consumer(runtime: Runtime) -> ConsumerRunner:
    """The customers' value segments from the metrics service (segment.changed), for `customer.segment`."""

    async def on_batch(batch: Sequence[Inbound[CustomersPayload]]) -> Sequence[Rejection]:
        async with transaction(runtime.sessionmaker) as session:
            await rules_service.record_segments(session, batch)
        return []

    return runtime.make_consumer(group=SEGMENTS_GROUP, topics=[CUSTOMERS], handler=on_batch)
