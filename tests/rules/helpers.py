"""Helpers for the rules integration tests: rulesets over REST, events to Kafka, commands read back."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import httpx
from aiokafka import AIOKafkaProducer, ConsumerRecord
from sqlalchemy.ext.asyncio import async_sessionmaker

import rules
from rules.service import rules_service
from shared.consumer import Inbound
from shared.db import AsyncSession, create_engine, create_sessionmaker, transaction
from shared.events import CloudEvent, decode_event
from shared.topics import CUSTOMERS, ENGAGEMENT, POINTS_COMMANDS, PURCHASES
from tests.conftest import read_topic, service_settings, topic
from tests.rules.samples import T0

ACTIVE_FROM = "2026-01-01T00:00:00Z"


async def install(
    client: httpx.AsyncClient,
    key: str,
    document: dict[str, Any],
    *,
    ruleset_id: str = "main",
    effective_from: str = ACTIVE_FROM,
) -> int:
    """Creates a version and activates it; returns the version number."""
    headers = {"X-API-Key": key}
    created = await client.post(f"/v1/rulesets/{ruleset_id}/versions", json={"document": document}, headers=headers)
    assert created.status_code == 201, created.text
    version = int(created.json()["version"])
    activated = await client.post(
        f"/v1/rulesets/{ruleset_id}/versions/{version}/activate",
        json={"effective_from": effective_from},
        headers=headers,
    )
    assert activated.status_code == 201, activated.text
    return version


async def send(producer: AIOKafkaProducer, *events: CloudEvent[Any]) -> None:
    for event in events:
        name = PURCHASES if event.type.startswith("purchase.") else ENGAGEMENT
        await producer.send(topic(name), event.to_bytes(), key=event.key)
    await producer.flush()


def _tenant_events(records: list[ConsumerRecord[bytes, bytes]], tenant: str) -> list[CloudEvent[Any]]:
    out = []
    for r in records:
        if r.value is not None and tenant.encode() in r.value:
            event = decode_event(r.value)
            if event.tenantid == tenant:
                out.append(event)
    return out


async def commands(
    tenant: str, until: Callable[[list[CloudEvent[Any]]], bool], *, timeout_s: float = 30.0
) -> list[CloudEvent[Any]]:
    """The points commands of `tenant` (read_committed, from the beginning) once `until` holds."""
    records = await read_topic(
        topic(POINTS_COMMANDS), until=lambda rs: until(_tenant_events(rs, tenant)), timeout_s=timeout_s
    )
    return _tenant_events(records, tenant)


async def tier_changes(tenant: str, count: int) -> list[CloudEvent[Any]]:
    records = await read_topic(topic(CUSTOMERS), until=lambda rs: len(_tenant_events(rs, tenant)) >= count)
    return _tenant_events(records, tenant)


def earned(events: list[CloudEvent[Any]], customer: str | None = None) -> list[Any]:
    return [e.data for e in events if e.type == "points.earn" and (customer is None or e.data.customer_id == customer)]


def clawed(events: list[CloudEvent[Any]]) -> list[Any]:
    return [e.data for e in events if e.type == "points.clawback"]


async def commands_now(tenant: str, *, read_for_s: float = 3.0) -> list[CloudEvent[Any]]:
    """The points commands of `tenant` that a reader finds within `read_for_s` seconds (to show absence)."""
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + read_for_s
    records = await read_topic(topic(POINTS_COMMANDS), until=lambda rs: loop.time() > stop_at)
    return _tenant_events(records, tenant)


@asynccontextmanager
async def rules_database(tenant: str, document: dict[str, Any]) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """Sessions on the rules test database, with `document` active for `tenant` from a day before T0:
    for tests that drive `rules_service.process_batch` directly, as the consumer does."""
    engine = create_engine(service_settings("rules").database_url, pool_size=3)
    maker = create_sessionmaker(engine)
    try:
        async with transaction(maker) as session:
            await rules_service.create_version(
                session, tenant_id=tenant, ruleset_id="main", source=document, key_id="test"
            )
            await rules_service.activate(
                session,
                tenant_id=tenant,
                ruleset_id="main",
                version=1,
                effective_from=T0 - timedelta(days=1),
                key_id="test",
            )
        yield maker
    finally:
        await engine.dispose()


def inbound(event: CloudEvent[Any]) -> Inbound[Any]:
    """A consumed message as the consumer hands it to the service (no Kafka record needed there)."""
    return Inbound(event, "purchases", 0, 0, cast(Any, None))


def interpreted(module: str) -> ModuleType:
    """rules/engine/<module>.py loaded from its source under another name, beside the compiled module (when
    built); what it imports is the imported (maybe compiled) engine."""
    source = Path(rules.__file__ or "").parent / "engine" / f"{module}.py"  # rules/__init__.py is never compiled
    spec = importlib.util.spec_from_file_location(f"rules_engine_{module}_interpreted", source)
    assert spec is not None
    assert spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = loaded  # dataclasses look their module up while the class is created
    try:
        spec.loader.exec_module(loaded)
    finally:
        del sys.modules[spec.name]
    return loaded
