"""Background jobs of the ledger: the outbox relays (shared/outbox.py: entries, rewards events) and the periodic
run (redemption order expiry, then maturing/expiry/hold release)."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from prometheus_client import Counter
from sqlalchemy.ext.asyncio import async_sessionmaker

from ledger import schemas
from ledger.anchors import anchor_loop
from ledger.config import Settings
from ledger.rewards_service import RewardsOutbox, rewards_service
from ledger.service import LedgerOutbox, ledger_service
from shared.db import AsyncSession, transaction
from shared.events import utcnow
from shared.faults import is_infrastructure_error
from shared.kafka import EventProducer
from shared.outbox import OutboxRelay
from shared.runtime import Runtime
from shared.topics import LEDGER_ENTRIES, REWARDS

log = logging.getLogger(__name__)

TASK_FAILURES = Counter(
    "ledger_task_failures_total", "Tenants whose periodic run (maturing, expiry, hold release) failed, not by an outage"
)


def outbox_relay(
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
    producer: EventProducer,
    *,
    rewards: bool = False,
) -> OutboxRelay:
    # The rows stay locked until the broker acked every event; a crash before the delete commits
    # relays them again, and the duplicates carry the same event id (the entry id).
    return OutboxRelay(
        # The rewards relay has a label of its own: the backlog gauge is one per relay.
        service=f"{settings.service_name}-rewards" if rewards else settings.service_name,
        sessionmaker=sessionmaker,
        producer=producer.raw,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        source=RewardsOutbox(settings.topic(REWARDS)) if rewards else LedgerOutbox(settings.topic(LEDGER_ENTRIES)),
        batch_size=settings.outbox_batch_size,
        max_record_bytes=settings.outbox_max_record_bytes,
    )


async def run_tasks(
    sessionmaker: async_sessionmaker[AsyncSession], *, now: datetime | None, limit: int, tenant_id: str | None = None
) -> schemas.TaskRun:
    async with transaction(sessionmaker) as session:
        return await ledger_service.run_tasks(session, now=now, limit=limit, tenant_id=tenant_id)


async def run_due_tasks(
    sessionmaker: async_sessionmaker[AsyncSession], *, now: datetime | None, limit: int
) -> schemas.TaskRun:
    """Every tenant's due work in one transaction; when that fails for a reason other than an outage, each
    tenant's in a transaction of its own, so an item that keeps failing holds back only its own tenant
    (logged with the tenant, counted in `ledger_task_failures_total`)."""
    now = now or utcnow()
    try:
        return await run_tasks(sessionmaker, now=now, limit=limit)
    except Exception as exc:
        if is_infrastructure_error(exc):
            raise
        log.warning("periodic tasks failed for all tenants at once; running them tenant by tenant", exc_info=exc)
    async with sessionmaker() as session:
        tenants = await ledger_service.due_tenants(session, now=now)
    total = schemas.TaskRun(matured=0, expired=0, holds_released=0)
    for tenant in tenants:
        try:
            done = await run_tasks(sessionmaker, now=now, limit=limit, tenant_id=tenant)
        except Exception as exc:
            if is_infrastructure_error(exc):
                raise
            TASK_FAILURES.inc()
            log.error("periodic tasks failed for a tenant; the others go on", extra={"tenant": tenant}, exc_info=exc)
            continue
        total = schemas.TaskRun(
            matured=total.matured + done.matured,
            expired=total.expired + done.expired,
            holds_released=total.holds_released + done.holds_released,
        )
    return total


async def expire_redemptions(
    sessionmaker: async_sessionmaker[AsyncSession], *, now: datetime | None, limit: int
) -> int:
    """Expires the due redemption orders, each in a transaction of its own: an order's locks (its account,
    hold, order, then the reward row last) are never held while another order's are taken, the order every
    redemption keeps, and an order that keeps failing holds back no other (`ledger_task_failures_total`)."""
    now = now or utcnow()
    async with sessionmaker() as session:
        due = await rewards_service.due_orders(session, now=now, limit=limit)
    done = 0
    for tenant, order_id in due:
        try:
            async with transaction(sessionmaker) as session:
                done += await rewards_service.expire(session, tenant, order_id, now=now)
        except Exception as exc:
            if is_infrastructure_error(exc):
                raise
            TASK_FAILURES.inc()
            log.error("redemption expiry failed", extra={"tenant": tenant, "order_id": str(order_id)}, exc_info=exc)
    return done


async def _tasks_loop(settings: Settings, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
    while True:
        try:
            # Orders first: an order's expiry releases its own hold, before the ledger's hold task would.
            expired = await expire_redemptions(sessionmaker, now=None, limit=settings.tasks_batch_limit)
            if expired:
                log.info("redemption orders expired", extra={"orders": expired})
            result = await run_due_tasks(sessionmaker, now=None, limit=settings.tasks_batch_limit)
            if result.matured or result.expired or result.holds_released:
                log.info("periodic tasks ran", extra=result.model_dump())
        except Exception as exc:
            if is_infrastructure_error(exc):  # an outage: no stack trace every interval while it lasts
                log.warning("periodic tasks failed (outage); retrying at the next interval", extra={"error": repr(exc)})
            else:
                log.exception("periodic tasks failed; retrying at the next interval")
        await asyncio.sleep(settings.tasks_interval_s)


def start(settings: Settings, runtime: Runtime) -> None:
    """The service's background work, run by the runtime for its life: the outbox relay, periodic tasks."""
    relay = outbox_relay(settings, runtime.sessionmaker, runtime.producer)
    # Registered whether this process relays or not: the outbox's age is the database's, whoever relays it.
    runtime.add_check("outbox", relay.readiness(settings.outbox_max_age_seconds))
    rewards_relay = outbox_relay(settings, runtime.sessionmaker, runtime.producer, rewards=True)
    runtime.add_check("rewards-outbox", rewards_relay.readiness(settings.outbox_max_age_seconds))
    if settings.outbox_relay_enabled:
        runtime.spawn("ledger:outbox-relay", relay.run(idle_s=settings.outbox_poll_interval_s))
        runtime.spawn("ledger:rewards-outbox-relay", rewards_relay.run(idle_s=settings.outbox_poll_interval_s))
    if settings.tasks_enabled:
        runtime.spawn("ledger:tasks", _tasks_loop(settings, runtime.sessionmaker))
    # Anchoring is periodic work like the tasks: a process that runs no tasks (a REST replica) anchors nothing.
    if settings.tasks_enabled and settings.anchors_enabled:
        runtime.spawn("ledger:anchors", anchor_loop(runtime.sessionmaker, runtime.producer, settings))
