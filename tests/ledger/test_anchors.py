"""Chain heads anchored outside the database: a chain rewritten with every hash recomputed (which the chain
alone cannot show) is caught against the signed head published on the anchors topic."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker

from ledger import schemas
from ledger.anchors import Anchors, publish_heads, read_anchors, sign
from ledger.app import create_app
from ledger.config import Settings
from ledger.domain import GENESIS_HASH, entry_hash
from ledger.repository import LedgerRepository
from ledger.service import ledger_service
from shared.db import AsyncSession, transaction
from shared.events import ChainAnchored
from shared.kafka import EventProducer
from tests.conftest import KAFKA, create_api_key, eventually, running_app, service_settings
from tests.ledger.conftest import as_superuser, new_tenant

KEY = b"test-anchor-key"
AT = datetime(2026, 3, 1, 12, tzinfo=UTC)


def _signature(key: bytes, tenant: str, account: str, seq: int, head: str, at: datetime) -> str:
    # Computed here, as the documented HMAC-SHA256 over the newline-joined fields.
    message = f"{tenant}\n{account}\n{seq}\n{head}\n{at.isoformat()}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def _anchor(tenant: str, seq: int, head: str, *, key: bytes = KEY) -> ChainAnchored:
    return ChainAnchored(
        account_id="acme",
        sequence=seq,
        entry_hash=head,
        signed_at=AT,
        signature=_signature(key, tenant, "acme", seq, head, AT),
    )


class TestCheck:
    chain = [{"seq": 1, "hash": "a" * 64}, {"seq": 2, "hash": "b" * 64}, {"seq": 3, "hash": "c" * 64}]

    def test_the_signature_is_the_documented_hmac(self) -> None:
        assert sign(KEY, "t-1", "acme", 2, "b" * 64, AT) == _signature(KEY, "t-1", "acme", 2, "b" * 64, AT)

    def test_an_intact_chain_matches_its_anchor_and_may_have_grown_since(self) -> None:
        anchors = Anchors(KEY, "t-1", {"acme": _anchor("t-1", 2, "b" * 64)})
        assert anchors.check("acme", self.chain) == (2, [])
        assert anchors.check("other", self.chain) == (None, [])  # not anchored yet

    def test_a_rewritten_or_truncated_chain_contradicts_its_anchor(self) -> None:
        rewritten = Anchors(KEY, "t-1", {"acme": _anchor("t-1", 2, "d" * 64)})
        assert rewritten.check("acme", self.chain)[1] == [
            f"entry 2: its hash differs from the chain head anchored at {AT.isoformat()} "
            "(the chain up to it was rewritten)"
        ]
        ahead = Anchors(KEY, "t-1", {"acme": _anchor("t-1", 5, "e" * 64)})
        assert ahead.check("acme", self.chain)[1] == [
            f"seq 5 was anchored at {AT.isoformat()}, but the chain ends at 3"
        ]

    def test_an_anchor_not_signed_with_the_key_or_for_another_tenant_is_refused(self) -> None:
        for anchor in (_anchor("t-1", 2, "b" * 64, key=b"another key"), _anchor("t-2", 2, "b" * 64)):
            anchors = Anchors(KEY, "t-1", {"acme": anchor})
            assert anchors.check("acme", self.chain)[1] == [
                f"the anchor of seq 2 ({AT.isoformat()}) is not signed with this ledger's anchor key"
            ]

    def test_anchors_that_could_not_be_read_fail_the_check(self) -> None:
        anchors = Anchors(KEY, "t-1", error="KafkaConnectionError: no broker")
        assert anchors.check("acme", self.chain) == (
            None,
            ["the anchors could not be read: KafkaConnectionError: no broker"],
        )


@pytest.fixture
async def producer(kafka_topics: list[str]) -> AsyncIterator[EventProducer]:
    producer = EventProducer(KAFKA, client_id="tests-anchors")
    await producer.start()
    yield producer
    await producer.stop()


def _rewrite_sql(entries: list[dict[str, Any]], points: int) -> str:
    """What an attacker with the database in hand does: change the first entry, recompute every hash after it
    and the balances row, with the append-only trigger out of the way (as the superuser)."""
    statements = ["SET session_replication_role = replica;"]
    previous, balance = GENESIS_HASH, 0
    for index, original in enumerate(entries):
        entry = dict(original)
        if index == 0:
            entry["points"] = points
        balance += entry["points"]
        entry["balance_after"], entry["prev_hash"] = balance, previous
        entry["hash"] = entry_hash(entry)
        previous = entry["hash"]
        statements.append(
            f"UPDATE ledger.entries SET points = {entry['points']}, balance_after = {balance}, "
            f"prev_hash = '{entry['prev_hash']}', hash = '{entry['hash']}' WHERE entry_id = '{entry['entry_id']}';"
        )
    tenant, account = entries[0]["tenant_id"], entries[0]["account_id"]
    statements.append(
        f"UPDATE ledger.balances SET available = {balance}, lifetime_earned = {balance}, last_hash = '{previous}' "
        f"WHERE tenant_id = '{tenant}' AND account_id = '{account}';"
    )
    return "\n".join(statements) + "\n"


@pytest.mark.db
@pytest.mark.kafka
class TestAgainstTheDatabase:
    async def test_a_chain_rewritten_with_recomputed_hashes_is_caught_by_its_anchor(
        self, db: async_sessionmaker[AsyncSession], producer: EventProducer
    ) -> None:
        tenant = new_tenant()
        settings: Settings = service_settings("ledger", anchor_key=KEY.decode(), anchors_enabled=False)
        started = datetime.now(UTC) - timedelta(seconds=1)
        for points in (10, 20):
            async with transaction(db) as session:
                await ledger_service.earn(
                    session, tenant, "acme", schemas.EarnCreate(points=points), source=f"t:{uuid.uuid4()}"
                )
        # Only what changed since the test began: the heads of acme and its issuance shard (and other runs').
        assert await publish_heads(db, producer, settings, since=started) >= 2
        anchors = await read_anchors(settings, tenant)
        assert anchors.error is None
        assert anchors.latest["acme"].sequence == 2
        async with db() as session:
            before = await ledger_service.verify(session, tenant, "acme", anchors=anchors)
            entries = await LedgerRepository.from_session(session).all_entries(tenant, "acme")
        assert before is not None
        assert (before.ok, before.anchored_seq) == (True, 2)

        await asyncio.to_thread(as_superuser, _rewrite_sql(entries, 1000))

        async with db() as session:
            chain_only = await ledger_service.verify(session, tenant, "acme")
            anchored = await ledger_service.verify(session, tenant, "acme", anchors=anchors)
            tenant_wide = await ledger_service.verify_tenant(session, tenant, anchors=anchors)
        # The chain and the balances agree with each other again: without the anchor nothing shows, except
        # that the issuance no longer balances the customer (the attacker could rewrite that chain too).
        assert chain_only is not None
        assert not any("hash" in p or "balances row" in p for p in chain_only.problems)
        assert anchored is not None
        assert not anchored.ok
        assert anchored.problems[0].startswith("entry 2: its hash differs from the chain head anchored at")
        assert anchored.anchored_seq is None
        assert [r.account_id for r in tenant_wide.failed] == ["acme"]
        # And over REST, where verify reads the anchors topic itself.
        key = await create_api_key("ledger", tenant, ["points:read"])
        app_settings = service_settings("ledger", consumers_enabled=False, tasks_enabled=False, anchor_key=KEY.decode())
        async with running_app(create_app(app_settings)) as client:
            response = await client.get("/v1/accounts/acme/verify", headers={"X-API-Key": key})
        assert response.status_code == 200
        assert response.json()["ok"] is False
        assert response.json()["problems"][0].startswith("entry 2: its hash differs from the chain head")

    async def test_the_service_anchors_changed_heads_periodically(self, kafka_topics: list[str]) -> None:
        tenant = new_tenant()
        admin = await create_api_key("ledger", tenant, ["admin"])
        app_settings: Settings = service_settings(
            "ledger", consumers_enabled=False, anchors_enabled=True, anchor_interval_s=0.3, anchor_key=KEY.decode()
        )

        async def anchored(seq: int) -> bool:
            anchors = await read_anchors(app_settings, tenant, "acme")
            return "acme" in anchors.latest and anchors.latest["acme"].sequence == seq

        async with running_app(create_app(app_settings)) as client:
            for points, seq in ((10, 1), (20, 2)):
                response = await client.post(
                    "/v1/accounts/acme/earn",
                    json={"points": points},
                    headers={"X-API-Key": admin, "Idempotency-Key": str(uuid.uuid4())},
                )
                assert response.status_code == 201, response.text
                # The first run anchors every head; later runs the heads changed since (the second earn).
                await eventually(partial(anchored, seq), timeout_s=30)
            verified = (await client.get("/v1/accounts/acme/verify", headers={"X-API-Key": admin})).json()
        assert (verified["ok"], verified["anchored_seq"]) == (True, 2)
