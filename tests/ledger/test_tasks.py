"""The outbox relay (every committed entry reaches loyalty.ledger-entries.v1 exactly as stored, also when
the service died before relaying) and the ledger's CLI commands."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from aiokafka import ConsumerRecord
from prometheus_client import REGISTRY
from sqlalchemy import delete, func, insert, select
from sqlalchemy.ext.asyncio import async_sessionmaker
from typer.testing import CliRunner

from ledger.app import create_app
from ledger.models import Entry, Hold, Outbox
from ledger.tasks import run_due_tasks
from ops.cli import app as cli
from shared.db import AsyncSession
from shared.topics import LEDGER_ENTRIES
from tests.conftest import create_api_key, eventually, read_topic, running_app, service_settings, topic

pytestmark = [pytest.mark.kafka, pytest.mark.db]


def settings(**overrides: Any) -> Any:
    return service_settings("ledger", consumers_enabled=False, tasks_enabled=False, **overrides)


async def write_some(client: httpx.AsyncClient, admin: str) -> None:
    for account, points in (("acme", 30), ("acme", 20), ("globex", 5)):
        response = await client.post(
            f"/v1/accounts/{account}/earn",
            json={"points": points, "member_id": "m-1"},
            headers={"X-API-Key": admin, "Idempotency-Key": str(uuid.uuid4())},
        )
        assert response.status_code == 201, response.text
    redeem = await client.post(
        "/v1/accounts/acme/redeem", json={"points": 15}, headers={"X-API-Key": admin, "Idempotency-Key": "r-1"}
    )
    assert redeem.status_code == 201


async def stored_entries(db: async_sessionmaker[AsyncSession], tenant: str) -> list[Entry]:
    async with db() as session:
        return list((await session.execute(select(Entry).where(Entry.tenant_id == tenant))).scalars())


async def published(tenant: str, count: int) -> dict[str, dict[str, Any]]:
    def mine(records: list[ConsumerRecord[bytes, bytes]]) -> dict[str, dict[str, Any]]:
        out = {}
        for record in records:
            event = json.loads(record.value or b"{}")
            if event.get("tenantid") == tenant:
                out[event["id"]] = event
        return out

    return mine(await read_topic(topic(LEDGER_ENTRIES), until=lambda rs: len(mine(rs)) >= count))


async def outbox_rows(db: async_sessionmaker[AsyncSession], entries: list[Entry]) -> int:
    async with db() as session:
        stmt = select(func.count()).select_from(Outbox).where(Outbox.entry_id.in_([e.entry_id for e in entries]))
        return int((await session.execute(stmt)).scalar_one())


def assert_as_stored(entry: Entry, event: dict[str, Any]) -> None:
    data = event["data"]
    assert event["type"] == "ledger.entry.posted"
    assert event["id"] == data["entry_id"] == str(entry.entry_id)
    assert data["transaction_id"] == str(entry.transaction_id)
    assert (data["account_id"], data["kind"], data["bucket"]) == (entry.account_id, entry.kind, entry.bucket)
    assert (data["points"], data["balance_after"], data["sequence"]) == (entry.points, entry.balance_after, entry.seq)
    assert (data["entry_hash"], data["prev_hash"]) == (entry.hash, entry.prev_hash)
    assert data.get("member_id") == entry.member_id
    assert datetime.fromisoformat(data["created_at"]) == entry.created_at


class TestOutboxRelay:
    async def test_every_entry_is_published_as_stored(self, tenant: str, db: async_sessionmaker[AsyncSession]) -> None:
        admin = await create_api_key("ledger", tenant, ["admin"])
        async with running_app(create_app(settings())) as client:
            await write_some(client, admin)
            entries = await stored_entries(db, tenant)
            events = await published(tenant, len(entries))
        assert len(entries) == 8
        assert set(events) == {str(e.entry_id) for e in entries}
        for entry in entries:
            assert_as_stored(entry, events[str(entry.entry_id)])
        customer = events[next(str(e.entry_id) for e in entries if e.account_id == "acme")]
        assert customer["subject"] == "acme"  # keyed by customer, so one customer's entries stay in order

    async def test_entries_committed_while_the_relay_was_down_arrive_after_restart(
        self, tenant: str, db: async_sessionmaker[AsyncSession]
    ) -> None:
        admin = await create_api_key("ledger", tenant, ["admin"])
        async with running_app(create_app(settings(outbox_relay_enabled=False))) as client:
            await write_some(client, admin)
        entries = await stored_entries(db, tenant)
        assert await outbox_rows(db, entries) == len(entries) == 8  # committed, not relayed: the service "died" here
        async with running_app(create_app(settings())):
            events = await published(tenant, len(entries))
            for entry in entries:
                assert_as_stored(entry, events[str(entry.entry_id)])
            # The relay deletes the rows once the broker acked them (in its own transaction, just after).

            async def drained() -> bool:
                return await outbox_rows(db, entries) == 0

            await eventually(drained, timeout_s=10)


class TestCli:
    async def test_verify_and_run_tasks(
        self, tenant: str, db: async_sessionmaker[AsyncSession], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        admin = await create_api_key("ledger", tenant, ["admin"])
        async with running_app(create_app(settings(outbox_relay_enabled=False))) as client:
            await write_some(client, admin)
        monkeypatch.setattr("ledger.cli.settings", settings())
        runner = CliRunner()
        # The CLI runs its own event loop, so it is invoked from a worker thread here.
        ok = await asyncio.to_thread(runner.invoke, cli, ["ledger", "verify", "--tenant", tenant])
        assert ok.exit_code == 0, ok.output
        assert "0 with problems: ok" in ok.output
        assert "MISMATCH" not in ok.output
        one = await asyncio.to_thread(runner.invoke, cli, ["ledger", "verify", "--tenant", tenant, "--account", "acme"])
        assert one.exit_code == 0, one.output
        assert "acme" in one.output
        later = (datetime.now(UTC) + timedelta(days=400)).isoformat()
        ran = await asyncio.to_thread(runner.invoke, cli, ["ledger", "run-tasks", "--tenant", tenant, "--now", later])
        assert ran.exit_code == 0, ran.output
        assert "expired 3 lots" in ran.output
        async with db() as session:
            breakage = (
                await session.execute(
                    select(func.sum(Entry.points)).where(
                        Entry.tenant_id == tenant, Entry.account_id.startswith("system:breakage/")
                    )
                )
            ).scalar_one()
        assert breakage == 30 + 20 + 5 - 15
        unknown = await asyncio.to_thread(runner.invoke, cli, ["ledger", "verify", "--tenant", f"none-{tenant}"])
        assert unknown.exit_code == 1


class TestPeriodicTasks:
    async def test_a_tenant_whose_item_keeps_failing_holds_back_no_other_tenant(
        self, tenant: str, db: async_sessionmaker[AsyncSession]
    ) -> None:
        poisoned, hold_id = f"p-{tenant}", uuid.uuid4()
        admin = await create_api_key("ledger", tenant, ["admin"])
        async with running_app(create_app(settings(outbox_relay_enabled=False))) as client:
            headers = {"X-API-Key": admin, "Idempotency-Key": str(uuid.uuid4())}
            earned = await client.post("/v1/accounts/acme/earn", json={"points": 40}, headers=headers)
            assert earned.status_code == 201, earned.text
            headers["Idempotency-Key"] = str(uuid.uuid4())
            held = await client.post(
                "/v1/accounts/acme/holds", json={"points": 25, "timeout_seconds": 1}, headers=headers
            )
            assert held.status_code == 201, held.text
        valid = uuid.UUID(held.json()["hold"]["hold_id"])
        # Another tenant's due hold that can never be released: it names a lot that does not exist.
        async with db() as session, session.begin():
            await session.execute(
                insert(Hold).values(
                    tenant_id=poisoned,
                    hold_id=hold_id,
                    account_id="acme",
                    points=5,
                    status="active",
                    allocations=[["no-such-lot", 5]],
                    expires_at=datetime.now(UTC) - timedelta(hours=1),
                    created_at=datetime.now(UTC) - timedelta(hours=2),
                )
            )
        failures = REGISTRY.get_sample_value("ledger_task_failures_total") or 0
        try:
            done = await run_due_tasks(db, now=datetime.now(UTC) + timedelta(minutes=1), limit=1000)
            assert done.holds_released >= 1
            async with db() as session:
                rows = await session.execute(
                    select(Hold.hold_id, Hold.status).where(Hold.hold_id.in_([valid, hold_id]))
                )
                statuses = {hold: status for hold, status in rows}
            assert statuses == {valid: "expired", hold_id: "active"}
            assert (REGISTRY.get_sample_value("ledger_task_failures_total") or 0) >= failures + 1
        finally:
            async with db() as session, session.begin():
                await session.execute(delete(Hold).where(Hold.tenant_id == poisoned))
