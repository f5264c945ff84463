"""The ledger service against the real database: invariants under random operation sequences, expiry,
maturing, hold timeouts, clawback policies, the append-only trigger and tamper detection."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import async_sessionmaker

from ledger import schemas
from ledger.domain import HoldState
from ledger.errors import ClawbackExceedsEarn, HoldExpired, LedgerError
from ledger.models import Entry
from ledger.repository import LedgerRepository
from ledger.service import PendingResponse, ledger_service
from shared.db import AsyncSession, create_engine, transaction
from shared.events import ClawbackPoints, make_event
from tests.conftest import owner_url
from tests.factories import earn
from tests.ledger.conftest import as_superuser, balances, check_books, inbound, new_tenant

pytestmark = pytest.mark.db

CUSTOMERS = ["acme", "acme-sub", "globex"]
T0 = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)

customer = st.sampled_from(CUSTOMERS)
points = st.integers(min_value=1, max_value=120)
earn_op = st.tuples(st.just("earn"), customer, points, st.booleans())
# Earns are drawn more often: without points on the accounts most other operations are refused.
operation = st.one_of(
    earn_op,
    earn_op,
    earn_op,
    st.tuples(st.just("redeem"), customer, points),
    st.tuples(st.just("reserve"), customer, points),
    st.tuples(st.just("capture"), st.integers(0, 5), st.integers(1, 100)),
    st.tuples(st.just("void"), st.integers(0, 5)),
    st.tuples(st.just("transfer"), customer, customer, points),
    st.tuples(st.just("clawback"), st.integers(0, 5), points),
    st.tuples(st.just("adjust"), customer, st.integers(-60, 60).filter(bool)),
    st.tuples(st.just("tick"), st.integers(1, 400)),
    st.tuples(st.just("replay"), st.integers(0, 30)),
)


class Scenario:
    """Drives the service like its boundaries do: one transaction per operation, explicit clock."""

    def __init__(self, db: async_sessionmaker[AsyncSession], tenant: str) -> None:
        self.db = db
        self.tenant = tenant
        self.now = T0
        self.earns: list[Any] = []  # the Kafka earn commands sent so far
        self.holds: list[uuid.UUID] = []
        self.replayable: list[tuple[str, Any]] = []
        self.rejected = 0
        self.clawed: dict[str, int] = {}  # what clawbacks took of each earn, by its command id
        self.over_clawed = 0  # clawbacks that asked for more than was left of their earn

    async def kafka(self, *events: Any) -> None:
        async with transaction(self.db) as session:
            rejected = await ledger_service.handle_commands(session, [inbound(e) for e in events], now=self.now)
        self.rejected += len(rejected)

    async def once(self, key: str, fingerprint: str, operation: Any) -> None:
        async with transaction(self.db) as session:
            await ledger_service.idempotent(
                session,
                tenant_id=self.tenant,
                api_key_id="k",
                key=key,
                fingerprint=fingerprint,
                status_code=201,
                operation=lambda pending: operation(session, pending),
            )

    async def rest(self, key: str, fingerprint: str, operation: Any) -> None:
        try:
            await self.once(key, fingerprint, operation)
        except LedgerError:
            return  # a refused operation (not enough points, hold closed) rolls back and stores nothing
        self.replayable.append(("rest", (key, fingerprint, operation)))

    async def apply(self, op: tuple[Any, ...]) -> None:
        name, t, now = op[0], self.tenant, self.now
        key = str(uuid.uuid4())
        if name == "earn":
            _, cust, pts, pending = op
            event = earn(t, cust, points=pts, matures_at=now + timedelta(days=14) if pending else None)
            self.earns.append(event)
            await self.kafka(event)
            self.replayable.append(("kafka", event))
        elif name == "clawback" and self.earns:
            original = self.earns[op[1] % len(self.earns)].data
            clawed = self.clawed.get(original.command_id, 0)
            refused = clawed + op[2] > original.points
            self.over_clawed += refused
            if not refused:
                self.clawed[original.command_id] = clawed + op[2]
            data = ClawbackPoints(
                command_id=f"cb-{key}",
                customer_id=original.customer_id,
                original_command_id=original.command_id,
                points=op[2],
                source_event_id=f"refund-{key}",
            )
            event = make_event("points.clawback", data, tenant_id=t, source="tests")
            await self.kafka(event)
            if not refused:  # a refused command is released: replaying it would be refused again
                self.replayable.append(("kafka", event))
        elif name == "redeem":
            body = schemas.RedeemCreate(points=op[2])
            await self.rest(
                key,
                f"redeem {op[1]} {op[2]}",
                lambda s, p: ledger_service.redeem(s, t, op[1], body, source=key, now=now, pending=p),
            )
        elif name == "reserve":
            body_h = schemas.HoldCreate(points=op[2])

            async def reserve(session: AsyncSession, pending: PendingResponse) -> schemas.HoldPosted:
                posted = await ledger_service.reserve(session, t, op[1], body_h, source=key, now=now, pending=pending)
                self.holds.append(posted.hold.hold_id)
                return posted

            await self.rest(key, f"reserve {op[1]} {op[2]}", reserve)
        elif name == "capture" and self.holds:
            hold_id = self.holds[op[1] % len(self.holds)]
            await self.rest(
                key,
                f"capture {hold_id} {op[2]}",
                lambda s, p: ledger_service.capture(
                    s, t, hold_id, schemas.HoldCapture(points=op[2]), source=key, now=now, pending=p
                ),
            )
        elif name == "void" and self.holds:
            hold_id = self.holds[op[1] % len(self.holds)]
            await self.rest(
                key, f"void {hold_id}", lambda s, p: ledger_service.void(s, t, hold_id, source=key, now=now, pending=p)
            )
        elif name == "transfer":
            body_t = schemas.TransferCreate(to_account_id=op[2], points=op[3])
            await self.rest(
                key,
                f"transfer {op[1:]}",
                lambda s, p: ledger_service.transfer(s, t, op[1], body_t, source=key, now=now, pending=p),
            )
        elif name == "adjust":
            body_a = schemas.AdjustmentCreate(points=op[2], reason="property test")
            await self.rest(
                key,
                f"adjust {op[1:]}",
                lambda s, p: ledger_service.adjust(
                    s, t, op[1], body_a, source=key, actor_key_id="k", now=now, pending=p
                ),
            )
        elif name == "tick":
            self.now += timedelta(days=op[1])
            async with transaction(self.db) as session:
                await ledger_service.run_tasks(session, now=self.now, tenant_id=t)
        elif name == "replay" and self.replayable:
            await self.replay(self.replayable[op[1] % len(self.replayable)])

    async def replay(self, item: tuple[str, Any]) -> None:
        before = await balances(self.db, self.tenant)
        kind, payload = item
        if kind == "kafka":
            await self.kafka(payload)
        else:
            await self.once(*payload)
        assert await balances(self.db, self.tenant) == before, f"replaying {item} changed the books"


class TestInvariants:
    @settings(
        max_examples=30,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(ops=st.lists(operation, min_size=20, max_size=60))
    async def test_random_operations_keep_the_books(
        self, db: async_sessionmaker[AsyncSession], ops: list[tuple[Any, ...]]
    ) -> None:
        scenario = Scenario(db, new_tenant())
        for op in ops:
            await scenario.apply(op)
        # Earns are never refused, clawbacks only when they ask for more than is left of their earn.
        assert scenario.rejected == scenario.over_clawed
        await check_books(db, scenario.tenant)


async def _earn(
    db: async_sessionmaker[AsyncSession], tenant: str, account: str, pts: int, now: datetime, **kw: Any
) -> schemas.Posted:
    async with transaction(db) as session:
        return await ledger_service.earn(
            session, tenant, account, schemas.EarnCreate(points=pts, **kw), source=f"t:{uuid.uuid4()}", now=now
        )


async def _redeem(
    db: async_sessionmaker[AsyncSession], tenant: str, account: str, pts: int, now: datetime
) -> schemas.Posted:
    async with transaction(db) as session:
        return await ledger_service.redeem(
            session, tenant, account, schemas.RedeemCreate(points=pts), source=f"t:{uuid.uuid4()}", now=now
        )


async def _tasks(db: async_sessionmaker[AsyncSession], tenant: str, now: datetime) -> schemas.TaskRun:
    async with transaction(db) as session:
        return await ledger_service.run_tasks(session, now=now, tenant_id=tenant)


async def _balance(db: async_sessionmaker[AsyncSession], tenant: str, account: str) -> schemas.Balance:
    async with db() as session:
        balance = await ledger_service.get_balance(session, tenant, account)
    assert balance is not None
    return balance


class TestExpiry:
    async def test_lots_expire_into_breakage_earliest_first(self, db: async_sessionmaker[AsyncSession]) -> None:
        tenant = new_tenant()
        await _earn(db, tenant, "acme", 100, T0)  # expires T0 + 12 months
        await _earn(db, tenant, "acme", 50, T0 + timedelta(days=180))  # expires six months later
        await _redeem(db, tenant, "acme", 70, T0 + timedelta(days=200))  # consumes the first lot first
        assert (await _tasks(db, tenant, T0 + timedelta(days=360))).expired == 0
        async with db() as session:
            soon = await ledger_service.expiring(
                session, tenant, "acme", within=timedelta(days=30), now=T0 + timedelta(days=360)
            )
        assert soon is not None
        assert soon.points == 30
        result = await _tasks(db, tenant, T0 + timedelta(days=366))
        assert result.expired == 1
        balance = await _balance(db, tenant, "acme")
        assert (balance.available, balance.expired, balance.redeemed) == (50, 30, 70)
        assert (await _balance(db, tenant, "system:breakage")).available == 30
        assert (await _tasks(db, tenant, T0 + timedelta(days=366))).expired == 0  # nothing expires twice
        await check_books(db, tenant)

    async def test_end_of_next_year_policy(self, db: async_sessionmaker[AsyncSession]) -> None:
        tenant = new_tenant()
        async with transaction(db) as session:
            await ledger_service.set_policy(session, tenant, schemas.PolicyUpdate(expiry_rule="end_of_next_year"))
        await _earn(db, tenant, "acme", 10, T0)
        assert (await _tasks(db, tenant, datetime(2027, 12, 31, 23, 59, tzinfo=UTC))).expired == 0
        assert (await _tasks(db, tenant, datetime(2028, 1, 1, tzinfo=UTC))).expired == 1
        assert (await _balance(db, tenant, "acme")).expired == 10


class TestPending:
    async def test_pending_points_mature_and_only_then_redeem(self, db: async_sessionmaker[AsyncSession]) -> None:
        tenant = new_tenant()
        await _earn(db, tenant, "acme", 40, T0, matures_at=T0 + timedelta(days=14))
        balance = await _balance(db, tenant, "acme")
        assert (balance.available, balance.pending) == (0, 40)
        with pytest.raises(LedgerError, match="0 available points"):
            await _redeem(db, tenant, "acme", 10, T0 + timedelta(days=1))
        assert (await _tasks(db, tenant, T0 + timedelta(days=13))).matured == 0
        assert (await _tasks(db, tenant, T0 + timedelta(days=14))).matured == 1
        balance = await _balance(db, tenant, "acme")
        assert (balance.available, balance.pending) == (40, 0)
        await _redeem(db, tenant, "acme", 40, T0 + timedelta(days=15))
        await check_books(db, tenant)


class TestHolds:
    async def test_a_hold_is_released_after_its_timeout(self, db: async_sessionmaker[AsyncSession]) -> None:
        tenant = new_tenant()
        await _earn(db, tenant, "acme", 100, T0)
        async with transaction(db) as session:
            posted = await ledger_service.reserve(
                session, tenant, "acme", schemas.HoldCreate(points=60, timeout_seconds=600), source="h", now=T0
            )
        assert (posted.balance.available, posted.balance.held) == (40, 60)
        assert (await _tasks(db, tenant, T0 + timedelta(seconds=599))).holds_released == 0
        assert (await _tasks(db, tenant, T0 + timedelta(seconds=600))).holds_released == 1
        balance = await _balance(db, tenant, "acme")
        assert (balance.available, balance.held) == (100, 0)
        async with db() as session:
            hold = await ledger_service.get_hold(session, tenant, posted.hold.hold_id)
        assert hold is not None
        assert hold.status == "expired"
        await check_books(db, tenant)

    async def test_a_hold_past_its_timeout_cannot_be_captured_before_the_task_runs(
        self, db: async_sessionmaker[AsyncSession]
    ) -> None:
        tenant = new_tenant()
        await _earn(db, tenant, "acme", 100, T0)
        async with transaction(db) as session:
            posted = await ledger_service.reserve(
                session, tenant, "acme", schemas.HoldCreate(points=60, timeout_seconds=600), source="h", now=T0
            )
        hold_id = posted.hold.hold_id
        late = T0 + timedelta(seconds=600)
        with pytest.raises(HoldExpired):
            async with transaction(db) as session:
                await ledger_service.capture(session, tenant, hold_id, schemas.HoldCapture(), source="c", now=late)
        assert (await _balance(db, tenant, "acme")).redeemed == 0
        async with transaction(db) as session:
            voided = await ledger_service.void(session, tenant, hold_id, source="v", now=late)
        assert (voided.hold.status, voided.balance.available, voided.balance.held) == ("expired", 100, 0)
        assert [e.kind for e in voided.entries] == ["hold_expired", "hold_expired"]
        await check_books(db, tenant)

    async def test_holds_saved_by_a_batch_posting_are_inserted_then_updated(
        self, db: async_sessionmaker[AsyncSession]
    ) -> None:
        # A handful of entries saves holds in the posting's one statement (the tests above); a batch (or no
        # entries at all) saves them in a statement of their own: the same upsert.
        tenant = new_tenant()
        hold = HoldState(
            hold_id=uuid.uuid4(),
            account_id="acme",
            points=30,
            captured=0,
            status="active",
            allocations=[["lot-1", 30]],
            member_id="buyer-7",
            reference="order-9",
            expires_at=T0 + timedelta(minutes=5),
            created_at=T0,
        )
        async with transaction(db) as session:
            await LedgerRepository.from_session(session).post(tenant, [], [], T0, holds=[hold])
        hold.status, hold.captured, hold.closed_at = "captured", 30, T0 + timedelta(minutes=1)
        async with transaction(db) as session:
            await LedgerRepository.from_session(session).post(tenant, [], [], T0, holds=[hold])
        async with db() as session:
            saved = await LedgerRepository.from_session(session).get_hold(tenant, hold.hold_id)
        assert saved == HoldState(
            hold_id=hold.hold_id,
            account_id="acme",
            points=30,
            captured=30,
            status="captured",
            allocations=[["lot-1", 30]],
            member_id="buyer-7",
            reference="order-9",
            expires_at=T0 + timedelta(minutes=5),
            created_at=T0,
            closed_at=T0 + timedelta(minutes=1),
        )


async def _clawback(
    db: async_sessionmaker[AsyncSession], tenant: str, original: schemas.Posted, pts: int
) -> schemas.Posted:
    async with transaction(db) as session:
        body = schemas.ClawbackCreate(original_earn=str(original.transaction_id), points=pts)
        return await ledger_service.clawback(session, tenant, "acme", body, source="cb", now=T0)


class TestClawback:
    async def test_default_policy_books_spent_points_on_receivable(self, db: async_sessionmaker[AsyncSession]) -> None:
        tenant = new_tenant()
        first = await _earn(db, tenant, "acme", 100, T0)
        await _earn(db, tenant, "acme", 30, T0, matures_at=T0 + timedelta(days=14))
        await _redeem(db, tenant, "acme", 90, T0)
        posted = await _clawback(db, tenant, first, 100)
        # 30 pending first, then the 10 available, and the 60 already spent go to the receivable account.
        assert (posted.balance.available, posted.balance.pending) == (0, 0)
        assert (await _balance(db, tenant, "system:receivable")).available == -60
        await check_books(db, tenant)

    async def test_negative_balance_policy_lets_later_credits_pay_the_debt(
        self, db: async_sessionmaker[AsyncSession]
    ) -> None:
        tenant = new_tenant()
        async with transaction(db) as session:
            await ledger_service.set_policy(session, tenant, schemas.PolicyUpdate(clawback_policy="negative_balance"))
        first = await _earn(db, tenant, "acme", 100, T0)
        await _redeem(db, tenant, "acme", 80, T0)
        posted = await _clawback(db, tenant, first, 100)
        assert posted.balance.available == -80
        assert (await _earn(db, tenant, "acme", 50, T0)).balance.available == -30
        with pytest.raises(LedgerError):
            await _redeem(db, tenant, "acme", 1, T0)
        await check_books(db, tenant, negative_allowed=True)

    async def test_clawbacks_take_back_at_most_what_the_earn_gave(self, db: async_sessionmaker[AsyncSession]) -> None:
        # The finding: three clawbacks of 100 and one of 1,000,000 against a 100-point earn were all accepted.
        tenant = new_tenant()
        first = await _earn(db, tenant, "acme", 100, T0)
        await _earn(db, tenant, "acme", 400, T0)
        assert (await _clawback(db, tenant, first, 100)).balance.available == 400
        for pts in (100, 100, 1_000_000):
            with pytest.raises(ClawbackExceedsEarn):
                await _clawback(db, tenant, first, pts)
        assert (await _balance(db, tenant, "acme")).available == 400
        assert (await _balance(db, tenant, "system:issuance")).available == -400
        async with db() as session:  # nothing was ever owed
            assert await ledger_service.get_balance(session, tenant, "system:receivable") is None
        await check_books(db, tenant)

    async def test_a_kafka_clawback_beyond_its_earn_is_refused_with_the_reason(
        self, db: async_sessionmaker[AsyncSession]
    ) -> None:
        tenant = new_tenant()
        command = earn(tenant, "acme", points=100)
        async with transaction(db) as session:
            assert await ledger_service.handle_commands(session, [inbound(command)], now=T0) == []

        def back(pts: int) -> Any:
            data = ClawbackPoints(
                command_id=f"cb-{uuid.uuid4()}",
                customer_id="acme",
                original_command_id=command.data.command_id,
                points=pts,
                source_event_id=f"refund-{uuid.uuid4()}",
            )
            return make_event("points.clawback", data, tenant_id=tenant, source="tests")

        # Two of 60 in one batch: the second asks for more than the first left.
        batch = [back(60), back(60), back(40)]
        async with transaction(db) as session:
            rejected = await ledger_service.handle_commands(session, [inbound(e) for e in batch], now=T0)
        assert [r.message.event.id for r in rejected] == [batch[1].id]
        assert rejected[0].reason == (
            f"ClawbackExceedsEarn: cannot claw back 60 points of earn {command.data.command_id!r}: "
            "it gave 100, 60 were clawed back already, 40 are left"
        )
        assert (await _balance(db, tenant, "acme")).available == 0
        async with db() as session:  # the refused command is released: a fixed replay could apply it
            assert await ledger_service.get_command(session, tenant, batch[1].data.command_id) is None
        await check_books(db, tenant)


class TestVerify:
    """verify reports what the books contradict besides the hash chains (broken here as the superuser)."""

    async def test_lots_and_holds_that_disagree_with_the_balances(self, db: async_sessionmaker[AsyncSession]) -> None:
        tenant = new_tenant()
        earned = await _earn(db, tenant, "acme", 100, T0)
        async with transaction(db) as session:
            posted = await ledger_service.reserve(session, tenant, "acme", schemas.HoldCreate(points=30), source="h")
        await check_books(db, tenant)
        await asyncio.to_thread(
            as_superuser,
            f"UPDATE ledger.lots SET remaining = remaining + 50 WHERE tenant_id = '{tenant}'"
            f" AND lot_id = '{earned.transaction_id}';\n"
            f"UPDATE ledger.holds SET status = 'voided' WHERE hold_id = '{posted.hold.hold_id}';\n",
        )
        async with db() as session:
            result = await ledger_service.verify(session, tenant, "acme")
            tenant_wide = await ledger_service.verify_tenant(session, tenant)
        assert result is not None
        assert result.problems == [
            f"lots outside 0 <= remaining, clawed_back <= points: {earned.transaction_id}",
            "open lots hold 120 available points, the balance is 70",
            "active holds hold 0 points, the balance is 30",
        ]
        assert (tenant_wide.ok, [r.account_id for r in tenant_wide.failed]) == (False, ["acme"])

    async def test_an_unbalanced_transaction_and_a_shard_out_of_range(
        self, db: async_sessionmaker[AsyncSession]
    ) -> None:
        tenant = new_tenant()
        earned = await _earn(db, tenant, "acme", 100, T0)
        issuance = next(e for e in earned.entries if e.account_id.startswith("system:issuance/"))
        await asyncio.to_thread(
            as_superuser,
            "SET session_replication_role = replica;\n"
            f"UPDATE ledger.entries SET points = 150, balance_after = 150 WHERE entry_id = '{issuance.entry_id}';\n"
            f"UPDATE ledger.balances SET available = 150 WHERE tenant_id = '{tenant}'"
            f" AND account_id = '{issuance.account_id}';\n"
            "INSERT INTO ledger.balances (tenant_id, account_id, kind)"
            f" VALUES ('{tenant}', 'system:issuance/16', 'system');\n",
        )
        async with db() as session:
            shard = await ledger_service.verify(session, tenant, issuance.account_id)
            stray = await ledger_service.verify(session, tenant, "system:issuance/16")
            tenant_wide = await ledger_service.verify_tenant(session, tenant)
        assert shard is not None
        assert stray is not None
        unbalanced = f"transaction {earned.transaction_id} sums to 250, not 0"
        assert unbalanced in shard.problems
        assert "available is 150; system:issuance is at most 0" in shard.problems
        assert stray.problems == ["not a shard of a system account (system:<name>/00 to /15)"]
        assert unbalanced in tenant_wide.problems
        assert "the balances sum to 250, not 0" in tenant_wide.problems
        assert sorted(r.account_id for r in tenant_wide.failed) == [issuance.account_id, "system:issuance/16"]


class TestAppendOnly:
    async def test_the_service_role_cannot_change_entries_or_their_trigger(
        self, db: async_sessionmaker[AsyncSession]
    ) -> None:
        tenant = new_tenant()
        posted = await _earn(db, tenant, "acme", 10, T0)
        entry_id = posted.entries[0].entry_id
        # The service role (the tests' connection) may insert and read entries, nothing more: no UPDATE,
        # DELETE or TRUNCATE, and no DDL on the table that would switch its append-only trigger off.
        for statement, refused in (
            ("UPDATE ledger.entries SET points = 1000 WHERE entry_id = :id", "permission denied"),
            ("DELETE FROM ledger.entries WHERE entry_id = :id", "permission denied"),
            ("TRUNCATE ledger.entries CASCADE", "permission denied"),
            ("DROP TRIGGER entries_append_only ON ledger.entries", "must be owner"),
            ("ALTER TABLE ledger.entries DISABLE TRIGGER entries_append_only", "must be owner"),
            ("DROP FUNCTION ledger.refuse_entry_change() CASCADE", "must be owner"),
            ("CREATE TABLE ledger.shadow (id int)", "permission denied"),
        ):
            with pytest.raises(DBAPIError, match=refused):
                async with transaction(db) as session:
                    await session.execute(text(statement), {"id": entry_id} if ":id" in statement else {})
        # The owner role, which runs the migrations, still meets the trigger.
        owner = create_engine(owner_url("ledger"), pool_size=1)
        try:
            for statement in (
                "UPDATE ledger.entries SET points = 1000 WHERE entry_id = :id",
                "DELETE FROM ledger.entries WHERE entry_id = :id",
            ):
                with pytest.raises(DBAPIError, match="append-only"):
                    async with owner.begin() as conn:
                        await conn.execute(text(statement), {"id": entry_id})
        finally:
            await owner.dispose()
        async with db() as session:
            stored = await session.get(Entry, entry_id)
        assert stored is not None
        assert stored.points == posted.entries[0].points

    async def test_tampering_as_superuser_is_reported_by_verify(self, db: async_sessionmaker[AsyncSession]) -> None:
        tenant = new_tenant()
        await _earn(db, tenant, "acme", 10, T0)
        await _earn(db, tenant, "acme", 20, T0)
        async with db() as session:
            before = await ledger_service.verify(session, tenant, "acme")
            first = (
                await session.execute(
                    select(Entry.entry_id).where(Entry.tenant_id == tenant, Entry.account_id == "acme", Entry.seq == 1)
                )
            ).scalar_one()
        assert before is not None
        assert before.ok
        await asyncio.to_thread(
            as_superuser,
            "SET session_replication_role = replica;\n"
            f"UPDATE ledger.entries SET points = 1000, balance_after = 1000 WHERE entry_id = '{first}';\n",
        )
        async with db() as session:
            after = await ledger_service.verify(session, tenant, "acme")
        assert after is not None
        assert not after.ok
        assert any("entry 1: content does not match its hash" in p for p in after.problems)
        assert any("available" in p for p in after.problems)  # the balances row no longer adds up either
