"""Duplicates and replays change nothing, through the three services on the real broker and PostgreSQL.

A seeded stream of purchases, partial and full refunds and engagement (tests/chaos/stream.py, with its independent
reference), and redemption order changes on the rewards topic as the ledger publishes them, go through rules, the
ledger and metrics; once the books match the reference, the same events are sent again, the consumer groups are
reset to the earliest offsets, or the rules' outbox relay dies with a batch sent but not deleted and is restarted.
Each time, after every group has caught up: every customer's balance and entries and every metrics read route
(`ROUTES["metrics"]` of test_access.py, so new KPIs are included) answer exactly as before.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker

from rules.repository import OutboxRepository
from rules.service import RulesOutbox
from shared.db import AsyncSession, create_engine, create_sessionmaker, transaction
from shared.events import utcnow
from shared.outbox import OutboxRelay
from shared.topics import POINTS_COMMANDS, REWARDS
from tests.chaos.stream import RULESET, Sent, Stream
from tests.conftest import (
    KAFKA,
    NAMESPACE,
    create_api_key,
    database_url,
    eventually,
    read_topic,
    running_app,
    service_settings,
    topic,
)
from tests.e2e.test_access import APPS, ROUTES
from tests.factories import earn, redemption
from tests.groups import group_lag, reset_to_earliest

pytestmark = [pytest.mark.kafka, pytest.mark.db]

SMALL_POOL: dict[str, Any] = {"database_pool_size": 3, "database_pool_warm": False}
# The scheduled classification of every customer would stamp a new classified_at between two reads of the
# books; the classification on ingestion (the pending loop) is what a replay must not change.
ONLY: dict[str, dict[str, Any]] = {"ledger": {}, "rules": {}, "metrics": {"segments_first_run_seconds": 3600}}


@dataclass
class Platform:
    clients: dict[str, httpx.AsyncClient]
    keys: dict[str, dict[str, str]]
    tenant: str
    suffix: str

    async def caught_up(self) -> None:
        """Until every consumer group of this platform has committed everything on its topics, and metrics has
        classified every customer those batches marked (the marks go in the classifying transaction)."""

        async def done() -> bool:
            return await group_lag(KAFKA, lambda group: group.endswith(self.suffix)) == 0

        await eventually(done, timeout_s=180, interval_s=0.5)
        engine = create_engine(database_url("metrics"), pool_size=1)
        try:

            async def classified() -> bool:
                async with engine.connect() as conn:
                    marked = await conn.execute(
                        text("select count(*) from metrics.segments_pending where tenant_id = :t"), {"t": self.tenant}
                    )
                    return int(marked.scalar_one()) == 0

            await eventually(classified, timeout_s=60, interval_s=0.2)
        finally:
            await engine.dispose()

    async def books(self, stream: Stream) -> dict[str, str]:
        """What the ledger and metrics answer about the tenant: balances, entries, every metrics read route (a
        customer's routes for a customer with a purchase)."""
        seen: dict[str, str] = {}
        for customer in stream.customers:
            for path in (f"/v1/accounts/{customer}", f"/v1/accounts/{customer}/entries?limit=500"):
                response = await self.clients["ledger"].get(path, headers=self.keys["ledger"])
                seen[path] = f"{response.status_code} {response.text}"
        today = datetime.now(UTC).date()
        buyer = min(stream.reference.buyers)
        values = {
            "today": today.isoformat(),
            "tomorrow": (today + timedelta(days=1)).isoformat(),
            "yesterday": (today - timedelta(days=1)).isoformat(),
            "customer": buyer,
            "shopper": buyer,
        }
        for name, route in ROUTES["metrics"].items():
            if name.startswith("GET "):
                params = {k: v.format(**values) for k, v in route.query.items()}
                response = await self.clients["metrics"].get(
                    route.path.format(**values), params=params, headers=self.keys["metrics"]
                )
                # The CLV fit is a scheduled job, not a consequence of events: this tenant is never fitted.
                assert response.status_code == (404 if name == "GET /v1/clv" else 200), (name, response.text)
                seen[name] = response.text
        return seen


@asynccontextmanager
async def platform(tenant: str, suffix: str) -> AsyncIterator[Platform]:
    async with AsyncExitStack() as stack:
        clients = {
            name: await stack.enter_async_context(
                running_app(create(service_settings(name, consumer_group_suffix=suffix, **SMALL_POOL, **ONLY[name])))
            )
            for name, create in APPS.items()
        }
        keys = {name: {"X-API-Key": await create_api_key(name, tenant, ["admin"])} for name in APPS}
        yield Platform(clients, keys, tenant, suffix)


async def send(producer: AIOKafkaProducer, events: Sequence[Sent]) -> None:
    for sent in events:
        await producer.send_and_wait(topic(sent.topic), sent.event.to_bytes(), key=sent.event.key)


async def settle(p: Platform, producer: AIOKafkaProducer, stream: Stream, events: list[Sent]) -> None:
    """Activates the stream's ruleset, sends the events and waits for the books to match the reference."""
    created = await p.clients["rules"].post("/v1/rulesets/main/versions", json=RULESET, headers=p.keys["rules"])
    assert created.status_code == 201, created.text
    activated = await p.clients["rules"].post(
        f"/v1/rulesets/main/versions/{created.json()['version']}/activate",
        json={"effective_from": "2000-01-01T00:00:00Z"},
        headers=p.keys["rules"],
    )
    assert activated.status_code == 201, activated.text
    await send(producer, events)
    ref = stream.reference

    async def matches() -> bool:
        for customer in stream.customers:
            response = await p.clients["ledger"].get(f"/v1/accounts/{customer}", headers=p.keys["ledger"])
            found = 0 if response.status_code == 404 else response.json()["available"] + response.json()["pending"]
            if found != ref.points.get(customer, 0):
                return False
        # Metrics has every purchase, every ledger entry and a segment for every buyer.
        today = datetime.now(UTC).date()
        days = {"from": (today - timedelta(days=1)).isoformat(), "to": (today + timedelta(days=1)).isoformat()}
        kpis = await p.clients["metrics"].get("/v1/kpis", params={**days, "period": "day"}, headers=p.keys["metrics"])
        items = kpis.json()["items"]
        segments = (await p.clients["metrics"].get("/v1/segments", headers=p.keys["metrics"])).json()
        found = (
            sum(i["orders"] for i in items),
            sum(i["points_issued"] for i in items),
            sum(i["points_clawed_back"] for i in items),
            segments["customers"],
        )
        redeemed = await p.clients["metrics"].get("/v1/kpis/redemptions", params=days, headers=p.keys["metrics"])
        kinds = {t["reward_kind"]: (t["reserved"], t["confirmed"], t["cancelled"]) for t in redeemed.json()["totals"]}
        return found == (ref.purchases, ref.issued, ref.clawed, len(ref.buyers)) and kinds == REDEEMED

    await eventually(matches, timeout_s=180, interval_s=0.5)
    await p.caught_up()


# What `redemptions` adds per kind today: (reserved, confirmed, cancelled).
REDEEMED = {"gift": (2, 1, 1), "privilege": (0, 0, 0), "discount": (0, 0, 0), "coupon": (1, 1, 0)}


def redemptions(tenant: str, customers: list[str]) -> list[Sent]:
    """A gift confirmed, a gift cancelled and a coupon confirmed by its consumption, as the ledger publishes them."""
    now = utcnow()
    coupon: dict[str, Any] = {"reward_id": "cpn", "reward_kind": "coupon", "customer": customers[1], "occurred_at": now}
    events = [
        redemption(tenant, f"{tenant}-R1", "reserved", customer=customers[0], occurred_at=now),
        redemption(tenant, f"{tenant}-R1", "confirmed", customer=customers[0], occurred_at=now),
        redemption(tenant, f"{tenant}-R2", "reserved", customer=customers[1], occurred_at=now),
        redemption(tenant, f"{tenant}-R2", "cancelled", customer=customers[1], occurred_at=now),
        redemption(tenant, f"{tenant}-R3", "reserved", **coupon),
        redemption(tenant, f"{tenant}-R3", "coupon_consumed", **coupon),
    ]
    return [Sent(REWARDS, e) for e in events]


def stream_of(tenant: str, seed: int) -> tuple[Stream, list[Sent]]:
    stream = Stream(tenant, customers=4, seed=seed)
    events = [stream.next() for _ in range(40)]
    return stream, events + redemptions(tenant, stream.customers)


@pytest.fixture
def suffix(tenant: str) -> str:
    return f"-replay-{tenant}"


class TestReplay:
    async def test_the_same_events_sent_twice_change_nothing(
        self, raw_producer: AIOKafkaProducer, tenant: str, suffix: str
    ) -> None:
        stream, events = stream_of(tenant, seed=11)
        assert stream.reference.refunds, "the stream needs refunds"
        assert stream.reference.engagements, "the stream needs engagement events"
        async with platform(tenant, suffix) as p:
            await settle(p, raw_producer, stream, events)
            before = await p.books(stream)
            await send(raw_producer, events)
            await p.caught_up()
            assert await p.books(stream) == before

    async def test_consumer_groups_reset_to_the_earliest_offsets_change_nothing(
        self, raw_producer: AIOKafkaProducer, tenant: str, suffix: str
    ) -> None:
        stream, events = stream_of(tenant, seed=12)
        async with platform(tenant, suffix) as p:
            await settle(p, raw_producer, stream, events)
            before = await p.books(stream)
        # The groups are empty once the services stopped: every one of them reads its topics again.
        replayed = {svc: await reset_to_earliest(KAFKA, f"{svc}{suffix}") for svc in APPS}
        replayed["metrics-rewards"] = await reset_to_earliest(KAFKA, f"metrics-rewards{suffix}")
        assert replayed["rules"] >= len(events) - len(redemptions(tenant, stream.customers)), replayed
        assert replayed["metrics-rewards"] >= len(redemptions(tenant, stream.customers)), replayed
        assert replayed["metrics"] >= stream.reference.purchases + stream.reference.refunds, replayed
        assert replayed["ledger"] >= 1, replayed
        async with platform(tenant, suffix) as p:
            await p.caught_up()
            assert await p.books(stream) == before


@pytest.fixture
async def rules_sessionmaker() -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(service_settings("rules").database_url, pool_size=2)
    yield create_sessionmaker(engine)
    await engine.dispose()


class KilledAfterSending(RulesOutbox):
    """The relay's source, as a relay killed after the broker acknowledged its batch but before the delete
    committed sees it: the batch is on the topic and its rows are still in the outbox."""

    async def delete(self, session: AsyncSession, ids: Sequence[int]) -> None:
        raise RuntimeError("relay killed mid-batch")


class TestOutboxRelayRestart:
    async def test_a_relay_restarted_mid_batch_publishes_again_and_the_ledger_books_once(
        self,
        raw_producer: AIOKafkaProducer,
        rules_sessionmaker: async_sessionmaker[AsyncSession],
        tenant: str,
        suffix: str,
    ) -> None:
        commands = [earn(tenant, f"c-{i % 3}", points=100 + i, command_id=f"cmd-{uuid.uuid4().hex}") for i in range(12)]
        rows = [{"topic": topic(POINTS_COMMANDS), "key": c.key, "value": c.to_bytes()} for c in commands]
        async with transaction(rules_sessionmaker) as session:
            await OutboxRepository.from_session(session).add(rows)

        def relay(source: RulesOutbox, batch_size: int) -> OutboxRelay:
            return OutboxRelay(
                service="rules",
                sessionmaker=rules_sessionmaker,
                producer=raw_producer,
                source=source,
                bootstrap_servers=KAFKA,
                batch_size=batch_size,
            )

        # The first relay sends a batch of 5 of the 12 rows and dies before deleting them.
        with pytest.raises(RuntimeError, match="killed mid-batch"):
            await relay(KilledAfterSending(namespace=NAMESPACE, sweep_after=timedelta(0)), 5).relay_once()
        async with platform(tenant, suffix) as p:
            restarted = relay(RulesOutbox(namespace=NAMESPACE, sweep_after=timedelta(0)), 1000)
            while await restarted.relay_once():
                pass
            ids = {c.data.command_id for c in commands}

            def copies(records: list[Any]) -> dict[str, int]:
                found: dict[str, int] = {}
                for r in records:
                    for command_id in ids:
                        if command_id.encode() in (r.value or b""):
                            found[command_id] = found.get(command_id, 0) + 1
                return found

            records = await read_topic(topic(POINTS_COMMANDS), until=lambda rs: sum(copies(rs).values()) >= 17)
            assert sorted(copies(records).values()) == [1] * 7 + [2] * 5, "5 commands on the topic twice"
            await p.caught_up()
            expected: dict[str, int] = {}
            for c in commands:
                expected[c.data.customer_id] = expected.get(c.data.customer_id, 0) + c.data.points
            for customer, points in expected.items():
                response = await p.clients["ledger"].get(f"/v1/accounts/{customer}", headers=p.keys["ledger"])
                assert response.json()["available"] == points, customer
                entries = await p.clients["ledger"].get(
                    f"/v1/accounts/{customer}/entries?limit=500", headers=p.keys["ledger"]
                )
                assert len(entries.json()["items"]) == 4, "one entry per command on the customer's account"
