from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import timedelta

from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from rules.batch import StateCache
from rules.config import STATE_CACHE_SIZE
from rules.service import OutboxRelay, rules_service
from shared.consumer import BatchHandler, ConsumerRunner, Inbound, Rejection
from shared.db import transaction
from shared.runtime import Runtime
from shared.topics import ENGAGEMENT, PURCHASES

log = logging.getLogger(__name__)

GROUP = "rules"

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
) -> BatchHandler:
    async def on_batch(batch: Sequence[Inbound]) -> Sequence[Rejection]:
        hits, misses = (state_cache.hits, state_cache.misses) if state_cache is not None else (0, 0)
        async with transaction(sessionmaker) as session:
            outcome = await rules_service.process_batch(session, batch, namespace=namespace, state_cache=state_cache)
        if state_cache is not None:
            state_cache.keep(outcome.states)  # committed: the next batches start from these
            STATE_CACHE_LOOKUPS.labels("hit").inc(state_cache.hits - hits)
            STATE_CACHE_LOOKUPS.labels("miss").inc(state_cache.misses - misses)
        # Committed: the commands are durable in the outbox. Publishing them now is the fast path; if
        # this process dies first, the sweep publishes them (same command ids, so no double award).
        await relay.publish(outcome.outbox_ids, outcome.outbox_rows)
        return outcome.rejections

    return on_batch


def purchases_consumer(runtime: Runtime, *, state_cache_size: int = STATE_CACHE_SIZE) -> ConsumerRunner:
    relay = OutboxRelay(runtime.sessionmaker, runtime.producer.raw, namespace=runtime.settings.topic_namespace)
    handler = batch_handler(
        runtime.sessionmaker,
        relay,
        namespace=runtime.settings.topic_namespace,
        state_cache=StateCache(state_cache_size) if state_cache_size else None,
    )
    return runtime.make_consumer(group=GROUP, topics=[PURCHASES, ENGAGEMENT], handler=handler)


async def sweep_outbox(relay: OutboxRelay, *, interval_s: float, older_than: timedelta) -> None:
    """Publishes outbox rows that a crashed process committed but never relayed; runs until cancelled."""
    while True:
        try:
            while await relay.sweep(older_than=older_than):
                pass
        except asyncio.CancelledError:
            raise
        except Exception:  # the database or broker is down: try again next round
            log.warning("outbox sweep failed", exc_info=True)
        await asyncio.sleep(interval_s)
