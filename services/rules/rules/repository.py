"""All SQL of the rules service. Batch paths load and save whole batches with one statement each."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, tuple_, update

from rules.batch import AwardRow, OrderRecord
from rules.engine import AwardRecord, CustomerSnapshot
from rules.models import (
    Award,
    CampaignSpend,
    CustomerState,
    Order,
    OutboxMessage,
    Ruleset,
    RulesetActivation,
    outbox_quarantine,
)
from rules.rows import STATE_COLUMNS, snapshot, state_columns
from shared.db import AsyncSession, SessionT
from shared.outbox import Unpublishable, insert_quarantined
from shared.repository import RepositoryBase

Key = tuple[str, str]


class RulesetRepository(RepositoryBase[SessionT]):
    async def next_version(self: RulesetRepository[AsyncSession], tenant_id: str, ruleset_id: str) -> int:
        # Serialises concurrent creations of one ruleset: the second waits and takes the next number.
        await self.session.execute(select(func.pg_advisory_xact_lock(func.hashtext(f"rules:{tenant_id}:{ruleset_id}"))))
        stmt = select(func.coalesce(func.max(Ruleset.version), 0)).where(
            Ruleset.tenant_id == tenant_id, Ruleset.ruleset_id == ruleset_id
        )
        return int((await self.session.execute(stmt)).scalar_one()) + 1

    async def create(self: RulesetRepository[AsyncSession], ruleset: Ruleset) -> Ruleset:
        self.session.add(ruleset)
        await self.session.flush()
        return ruleset

    async def get(self, tenant_id: str, ruleset_id: str, version: int) -> Ruleset | None:
        return await self.session.get(Ruleset, (tenant_id, ruleset_id, version))

    async def list_versions(self, tenant_id: str, ruleset_id: str | None = None) -> Sequence[Ruleset]:
        stmt = select(Ruleset).where(Ruleset.tenant_id == tenant_id).order_by(Ruleset.ruleset_id, Ruleset.version)
        if ruleset_id is not None:
            stmt = stmt.where(Ruleset.ruleset_id == ruleset_id)
        return await self.get_all(stmt)

    async def activate(self: RulesetRepository[AsyncSession], activation: RulesetActivation) -> RulesetActivation:
        self.session.add(activation)
        await self.session.flush()
        return activation

    async def activations(self, tenant_ids: Iterable[str]) -> Sequence[RulesetActivation]:
        stmt = (
            select(RulesetActivation)
            .where(RulesetActivation.tenant_id.in_(list(tenant_ids)))
            .order_by(RulesetActivation.tenant_id, RulesetActivation.effective_from, RulesetActivation.id)
        )
        return await self.get_all(stmt)

    async def documents(self, keys: Iterable[tuple[str, str, int]]) -> Sequence[Ruleset]:
        wanted = list(keys)
        if not wanted:
            return []
        stmt = select(Ruleset).where(tuple_(Ruleset.tenant_id, Ruleset.ruleset_id, Ruleset.version).in_(wanted))
        return await self.get_all(stmt)


def _keys(keys: Iterable[Key]) -> tuple[list[str], list[str]]:
    wanted = sorted(set(keys))
    return [k[0] for k in wanted], [k[1] for k in wanted]


# Batch look-ups by key are a LATERAL index probe per key, in the keys' (sorted) order. A plain join of the
# key array with the table lets the planner hash the whole table (it cannot know the array holds a few
# thousand keys): a sequential scan per batch, whose cost grows with every order ever seen.
_LOAD_STATES = """
select s.* from unnest($1::text[], $2::text[]) as k(tenant_id, customer_id)
cross join lateral (
  select * from rules.customer_states c where c.tenant_id = k.tenant_id and c.customer_id = k.customer_id
) s
"""

# One upsert for the whole batch, in key order (the lock order every batch uses). Columns travel as arrays for
# `unnest`; the array columns of each state as array literals (unnest cannot take arrays of arrays). A row is
# written only over the version its state was read at (one below the version written; 0 = no row then).
_SAVE_STATES = f"""
insert into rules.customer_states as s ({", ".join(STATE_COLUMNS)})
select t, c, n, f, l, sm::text[], sa::numeric[], pm::text[], pe::bigint[], cat::varchar[], tier, tr, ck::text[],
       cv::bigint[], v
from unnest($1::text[], $2::text[], $3::int[], $4::timestamptz[], $5::timestamptz[], $6::text[], $7::text[],
            $8::text[], $9::text[], $10::text[], $11::text[], $12::timestamptz[], $13::text[], $14::text[],
            $15::bigint[])
  as r(t, c, n, f, l, sm, sa, pm, pe, cat, tier, tr, ck, cv, v)
order by t, c
on conflict (tenant_id, customer_id) do update set
{", ".join(f"{c} = excluded.{c}" for c in STATE_COLUMNS[2:])}
where s.version = excluded.version - 1
"""


# A segment.changed per customer (the batch's latest): a new state row, or the stored one when the event is
# newer than the segment it holds; the version goes up, so a batch holding the state read before retries.
_SAVE_SEGMENTS = """
insert into rules.customer_states as s (tenant_id, customer_id, purchase_count, segment, segment_at, version)
select t, c, 0, seg, at, 1 from unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[]) as r(t, c, seg, at)
order by t, c
on conflict (tenant_id, customer_id) do update set
  segment = excluded.segment, segment_at = excluded.segment_at, version = s.version + 1
where s.segment_at is null or s.segment_at < excluded.segment_at
"""


class StateChanged(Exception):
    """A customer's stored state is newer than the one a batch read (another writer came between)."""


class CustomerStateRepository(RepositoryBase[SessionT]):
    async def get(self, tenant_id: str, customer_id: str) -> CustomerState | None:
        return await self.session.get(CustomerState, (tenant_id, customer_id))

    async def load(self, keys: Iterable[Key]) -> dict[Key, CustomerSnapshot]:
        """The stored states of these customers, unlocked: `save` writes each only over the version read."""
        tenants, customers = _keys(keys)
        if not tenants:
            return {}
        rows = await (await self.driver()).fetch(_LOAD_STATES, tenants, customers)
        return {(r["tenant_id"], r["customer_id"]): snapshot(r) for r in rows}

    async def load_tenant(self, tenant_id: str, *, after: str, limit: int) -> list[CustomerSnapshot]:
        """One page of a tenant's customers in id order, locked for a review."""
        rows = await (await self.driver()).fetch(
            """select * from rules.customer_states where tenant_id = $1 and customer_id > $2
               order by customer_id limit $3 for update""",
            tenant_id,
            after,
            limit,
        )
        return [snapshot(r) for r in rows]

    async def save_segments(
        self: CustomerStateRepository[AsyncSession], segments: Sequence[tuple[str, str, str, datetime]]
    ) -> None:
        """Records (tenant, customer, segment, event time), at most one per customer, where newer."""
        if segments:
            columns = [list(c) for c in zip(*sorted(segments), strict=True)]
            await (await self.driver()).execute(_SAVE_SEGMENTS, *columns)

    async def save(self: CustomerStateRepository[AsyncSession], states: Iterable[tuple[str, CustomerSnapshot]]) -> None:
        """Writes the states, each over the version it was read at, and moves them to the version written.
        Raises StateChanged when any stored row moved on meanwhile (then nothing may be kept)."""
        written = list(states)
        if not written:
            return
        status = await (await self.driver()).execute(_SAVE_STATES, *state_columns(written))
        count = int(status.rsplit(" ", 1)[1])  # "INSERT 0 <rows inserted or updated>"
        if count != len(written):
            raise StateChanged(f"{len(written) - count} of {len(written)} customer states changed since read")
        for _, state in written:
            state.version += 1


class OrderRepository(RepositoryBase[SessionT]):
    # Orders and awards are appended with COPY (no ON CONFLICT): a batch writes rows only for events it found
    # unrecorded; a duplicate fails the batch (an order recorded concurrently is retried as a whole, anything
    # else message by message, dead-lettering the one at fault).

    async def load(self, keys: Iterable[Key]) -> dict[Key, OrderRecord]:
        tenants, orders = _keys(keys)
        if not tenants:
            return {}
        rows = await (await self.driver()).fetch(
            """select o.* from unnest($1::text[], $2::text[]) as k(tenant_id, order_id)
               cross join lateral (
                 select * from rules.orders r where r.tenant_id = k.tenant_id and r.order_id = k.order_id for update
               ) o""",
            tenants,
            orders,
        )
        return {(r["tenant_id"], r["order_id"]): OrderRecord(*(r[f] for f in OrderRecord._fields)) for r in rows}

    async def awards(self, keys: Iterable[Key]) -> dict[Key, list[AwardRecord]]:
        tenants, orders = _keys(keys)
        out: dict[Key, list[AwardRecord]] = {}
        if not tenants:
            return out
        rows = await (await self.driver()).fetch(
            """select a.tenant_id, a.order_id, a.command_id, a.customer_id, a.points, a.clawed_back
               from unnest($1::text[], $2::text[]) as k(tenant_id, order_id)
               cross join lateral (
                 select * from rules.awards w where w.tenant_id = k.tenant_id and w.order_id = k.order_id
                 order by w.command_id for update
               ) a""",
            tenants,
            orders,
        )
        for r in rows:
            out.setdefault((r["tenant_id"], r["order_id"]), []).append(
                AwardRecord(r["command_id"], r["customer_id"], r["points"], r["clawed_back"])
            )
        return out

    async def insert_orders(self: OrderRepository[AsyncSession], rows: Sequence[OrderRecord]) -> None:
        if rows:
            await self.copy("orders", OrderRecord._fields, rows, schema="rules")

    async def set_refunded(self: OrderRepository[AsyncSession], rows: Sequence[dict[str, Any]]) -> None:
        for row in rows:
            await self.session.execute(
                update(Order)
                .where(Order.tenant_id == row["tenant_id"], Order.order_id == row["order_id"])
                .values(refunded_amount=row["refunded_amount"])
            )

    async def insert_awards(self: OrderRepository[AsyncSession], rows: Sequence[AwardRow]) -> None:
        if rows:
            await self.copy("awards", AwardRow._fields, rows, schema="rules")

    async def add_clawed_back(self: OrderRepository[AsyncSession], amounts: dict[tuple[str, str, str], int]) -> None:
        """Adds clawed-back points to awards, by (tenant, customer, command id)."""
        for (tenant_id, customer_id, command_id), points in sorted(amounts.items()):
            await self.session.execute(
                update(Award)
                .where(Award.tenant_id == tenant_id, Award.customer_id == customer_id, Award.command_id == command_id)
                .values(clawed_back=Award.clawed_back + points)
            )

    async def awards_for_customer(self, tenant_id: str, customer_id: str, limit: int = 100) -> Sequence[Award]:
        stmt = (
            select(Award)
            .where(Award.tenant_id == tenant_id, Award.customer_id == customer_id)
            .order_by(Award.created_at.desc(), Award.command_id)
            .limit(limit)
        )
        return await self.get_all(stmt)


class CampaignRepository(RepositoryBase[SessionT]):
    async def spent(self, keys: Iterable[Key], *, for_update: bool = False) -> dict[Key, int]:
        wanted = sorted(set(keys))
        if not wanted:
            return {}
        stmt = (
            select(CampaignSpend.tenant_id, CampaignSpend.campaign_id, CampaignSpend.points)
            .where(tuple_(CampaignSpend.tenant_id, CampaignSpend.campaign_id).in_(wanted))
            .order_by(CampaignSpend.tenant_id, CampaignSpend.campaign_id)
        )
        if for_update:
            stmt = stmt.with_for_update()
        return {(r.tenant_id, r.campaign_id): int(r.points) for r in (await self.session.execute(stmt)).all()}

    async def add(
        self: CampaignRepository[AsyncSession],
        amounts: dict[Key, int],
        *,
        budgets: dict[Key, int] | None = None,
        read: dict[Key, int] | None = None,
    ) -> list[Key]:
        """Adds a batch's campaign points. With `budgets`, the batch was evaluated against the figures in
        `read`, taken without a lock: a campaign is only added to while its total still equals what was
        read or stays within the budget after the addition, which are exactly the cases where that
        evaluation equals one made under the lock. Returns the campaigns where neither holds (nothing
        of the batch may be kept then)."""
        over: list[Key] = []
        driver = await self.driver()
        for key, points in sorted(amounts.items()):  # sorted: concurrent batches lock rows in one order
            if not points:
                continue
            budget = budgets.get(key) if budgets is not None else None
            seen = (read or {}).get(key, 0)
            if await driver.fetchval(_ADD_SPEND, key[0], key[1], points, budget, seen) is None:
                over.append(key)
        return over


_ADD_SPEND = """
insert into rules.campaign_spend as s (tenant_id, campaign_id, points) values ($1, $2, $3)
on conflict (tenant_id, campaign_id) do update set points = s.points + excluded.points
where $4::bigint is null or s.points = $5::bigint or s.points + excluded.points <= $4::bigint
returning s.points
"""


# Each nextval of the outbox's sequence reserves OUTBOX_ID_BLOCK consecutive ids (migration 0003): a batch takes
# a few blocks instead of an id per row, and deletes its rows by id range.
OUTBOX_ID_BLOCK = 1024

_OUTBOX_BLOCKS = """
select array_agg(nextval('rules.outbox_id_seq') order by n) from generate_series(1, $1) as n
"""


class OutboxRepository(RepositoryBase[SessionT]):
    async def add(self: OutboxRepository[AsyncSession], rows: Sequence[dict[str, Any]]) -> list[int]:
        if not rows:
            return []
        # The ids first (one statement), then the rows with COPY: COPY returns nothing.
        driver = await self.driver()
        blocks: list[int] = await driver.fetchval(_OUTBOX_BLOCKS, -(-len(rows) // OUTBOX_ID_BLOCK))
        ids = [start + i for start in blocks for i in range(OUTBOX_ID_BLOCK)][: len(rows)]
        await self.copy(
            "outbox",
            ("id", "topic", "key", "value"),
            [(i, r["topic"], r["key"], r["value"]) for i, r in zip(ids, rows, strict=True)],
            schema="rules",
        )
        return ids

    async def delete(self: OutboxRepository[AsyncSession], ids: Sequence[int]) -> None:
        if not ids:
            return
        # Ids come in runs (a block, or a sweep's sorted claim): a range scan per run, not a probe per id.
        starts: list[int] = []
        ends: list[int] = []
        for i in sorted(ids):
            if ends and i == ends[-1] + 1:
                ends[-1] = i
            else:
                starts.append(i)
                ends.append(i)
        await (await self.driver()).execute(
            """delete from rules.outbox o using unnest($1::bigint[], $2::bigint[]) as r(lo, hi)
               where o.id between r.lo and r.hi""",
            starts,
            ends,
        )

    async def quarantine(self: OutboxRepository[AsyncSession], rows: Sequence[Unpublishable]) -> None:
        await insert_quarantined(self.session, outbox_quarantine, rows)

    async def oldest(self, namespace: str = "") -> datetime | None:
        stmt = (
            select(OutboxMessage.created_at)
            .where(OutboxMessage.topic.startswith(namespace))
            .order_by(OutboxMessage.id)
            .limit(1)
        )
        return (await self.session.execute(stmt)).scalar_one_or_none()

    async def claim_stale(
        self: OutboxRepository[AsyncSession], older_than: timedelta, limit: int, now: datetime, namespace: str = ""
    ) -> Sequence[OutboxMessage]:
        # SKIP LOCKED: several relays (replicas) never publish the same rows at the same time. A relay
        # takes only its deployment's topics (the namespace prefix), never another's.
        stmt = (
            select(OutboxMessage)
            .where(OutboxMessage.created_at < now - older_than, OutboxMessage.topic.startswith(namespace))
            .order_by(OutboxMessage.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return await self.get_all(stmt)
