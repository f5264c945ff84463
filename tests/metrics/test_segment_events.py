"""Through Kafka: the metrics consumers classify the customers of each ingested batch again, and a change goes
out as segment.changed on loyalty.customers.v1 (from the outbox, by the relay), keyed tenant:customer."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, ConsumerRecord
from sqlalchemy.ext.asyncio import AsyncEngine

from metrics.app import create_app
from shared.events import CloudEvent, ReferralConverted, decode_event, make_event, utcnow
from shared.topics import CUSTOMERS, ENGAGEMENT, PURCHASES
from tests.conftest import read_topic, running_app, service_settings, topic
from tests.factories import purchase
from tests.metrics.helpers import metrics_engine

pytestmark = [pytest.mark.kafka, pytest.mark.db]


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[AsyncEngine]:
    async with metrics_engine() as engine:  # the segment queries read the CLV job's table
        yield engine


def changes(records: list[ConsumerRecord[bytes, bytes]], tenant: str) -> list[CloudEvent[Any]]:
    events = [decode_event(r.value) for r in records if r.value is not None and tenant.encode() in r.value]
    return [e for e in events if e.tenantid == tenant and e.type == "segment.changed"]


async def test_ingested_purchases_and_engagement_publish_segment_changes(
    engine: AsyncEngine, raw_producer: AIOKafkaProducer, tenant: str
) -> None:
    now = utcnow()
    settings = service_settings(
        "metrics", consumer_group_suffix=f"-seg-{uuid.uuid4().hex[:6]}", outbox_poll_seconds=0.2
    )
    async with running_app(create_app(settings)):
        # c-1 bought 400 and 10 days ago: a repeat buyer, no advocacy; c-2 bought once, a year and a half ago.
        for customer, days in (("c-1", 400), ("c-1", 10), ("c-2", 550)):
            event = purchase(tenant, customer, ordered_at=now - timedelta(days=days))
            await raw_producer.send_and_wait(topic(PURCHASES), event.to_bytes(), key=event.key)

        def first_segments(records: list[ConsumerRecord[bytes, bytes]]) -> bool:
            # Both orders of c-1 counted (a regular buyer), c-2 classified.
            seen = {(e.data.customer_id, e.data.segment) for e in changes(records, tenant)}
            return ("c-1", "loyal_passive") in seen and any(c == "c-2" for c, _ in seen)

        records = await read_topic(topic(CUSTOMERS), until=first_segments)
        # Then c-1 refers someone: an ambassador.
        referral = make_event(
            "referral.converted",
            ReferralConverted(referral_id=f"R-{uuid.uuid4().hex[:8]}", customer_id="c-1", referred_customer_id="c-9"),
            tenant_id=tenant,
            source="tests",
        )
        await raw_producer.send_and_wait(topic(ENGAGEMENT), referral.to_bytes(), key=referral.key)
        records = await read_topic(
            topic(CUSTOMERS), until=lambda rs: any(e.data.segment == "ambassador" for e in changes(rs, tenant))
        )
    by_customer: dict[str, list[tuple[str | None, str]]] = {}
    for event in changes(records, tenant):
        by_customer.setdefault(event.data.customer_id, []).append((event.data.previous_segment, event.data.segment))
        assert event.key == f"{tenant}:{event.data.customer_id}".encode()
    # c-1's first batch may have seen one or both of its orders (one order 400 days ago: a leaver; both: loyal).
    assert by_customer["c-1"][-1] == ("loyal_passive", "ambassador")
    assert by_customer["c-2"] == [(None, "leaver")]
    assert all(a != b for a, b in by_customer["c-1"])
