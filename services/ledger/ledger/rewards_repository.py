"""The rewards' SQL: catalogue, settings, tiers, redeemers, orders, coupons, entitlements, the rewards outbox.

A stocked reward's units are spread over `STOCK_SHARDS` rows of ledger.reward_stock (its stock is their
sum): a redemption takes a unit from a share no other transaction holds (SKIP LOCKED), waiting for one only
when every share with units left is held, so concurrent redemptions of one reward do not queue on one row.

Lock order, with the ledger's (ledger/service.py): a customer's account, then its hold, then the
redemption order, then the reward row, then coupon rows, then stock shares, then the system accounts.
Redeeming takes the account, then pooled coupons and one stock share (SKIP LOCKED: never waiting on one
while another is free); an admin's stock change takes the reward row, then every share in order."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert

from ledger.models import (
    STOCK_SHARDS,
    Coupon,
    CustomerRedeemers,
    CustomerTier,
    Entitlement,
    RedemptionOrder,
    Reward,
    RewardSettings,
    RewardsOutbox,
    RewardStock,
    outbox_quarantine,
)
from ledger.repository import _Sql
from ledger.rewards import CustomerContext, Redeemer, RewardsConfig
from ledger.rewards import Reward as RewardTerms
from shared.db import AsyncSession, SessionT
from shared.outbox import Unpublishable, insert_quarantined
from shared.repository import RepositoryBase

TERMS = [name for name in RewardTerms.__dataclass_fields__]
_REWARD_COLUMNS = [c.name for c in Reward.__table__.columns if c.name != "tenant_id"]
# A reward's fields as the statements below read them: its columns and its stock, the sum of its shares.
_REWARD_FIELDS = [*_REWARD_COLUMNS, "stock"]
_REWARDS = f"""
    SELECT {", ".join(_REWARD_COLUMNS)}, (
        SELECT CAST(sum(s.units) AS bigint) FROM ledger.reward_stock s
        WHERE s.tenant_id = rewards.tenant_id AND s.reward_id = rewards.reward_id) AS stock
    FROM ledger.rewards
"""
_COUNTED = "('reserved', 'confirmed', 'refunded')"
# The customer's whole context (balance, tier, redeemers, the programme's settings, redemptions per reward
# and day), read with the rewards by the listing (the hottest rewards read) and by a redemption: each one
# fixed statement straight on the driver.
_CONTEXT = f"""
    SELECT b.available,
        (SELECT t.tier FROM ledger.customer_tiers t WHERE t.tenant_id = :tenant AND t.customer_id = :customer) AS tier,
        (SELECT r.members::text FROM ledger.customer_redeemers r
         WHERE r.tenant_id = :tenant AND r.customer_id = :customer) AS members,
        s.tiers::text AS tiers, s.point_value, s.currency,
        (SELECT p.hold_timeout_seconds FROM ledger.tenant_policies p WHERE p.tenant_id = :tenant) AS hold_timeout,
        (SELECT json_agg(json_build_array(d.reward_id, d.day, d.n))::text FROM (
            SELECT o.reward_id, date_trunc('day', o.created_at, 'UTC') AS day, count(*) AS n
            FROM ledger.redemption_orders o
            WHERE o.tenant_id = :tenant AND o.customer_id = :customer AND o.state IN {_COUNTED}
            GROUP BY 1, 2) AS d) AS redeemed
    FROM ledger.balances b LEFT JOIN ledger.reward_settings s ON s.tenant_id = b.tenant_id
    WHERE b.tenant_id = :tenant AND b.account_id = :customer AND b.kind = 'customer'
"""
# The customer's context joined with reward rows: a reward's columns prefixed `r_` (`_reward_of` reads them back).
_REWARD_AS_R = "r.reward_id IS NOT NULL AS r_found, " + ", ".join(f"r.{c} AS r_{c}" for c in _REWARD_FIELDS)
# The listing: the customer's context with a page of the active rewards, one row per reward (the context
# repeated; one row with no reward when the page is empty, none without an account).
_CATALOGUE = _Sql(
    f"""
    SELECT c.*, {_REWARD_AS_R}
    FROM ({_CONTEXT}) AS c LEFT JOIN LATERAL (
        {_REWARDS} WHERE tenant_id = :tenant AND status = 'active' AND reward_id > :after
        ORDER BY reward_id LIMIT :limit
    ) AS r ON true
    ORDER BY r.reward_id
    """
)
# A redemption reads the reward with the customer's context: one round trip (the account is locked, so
# the context's row exists; the reward's columns are null when there is no such reward).
_REDEMPTION_CONTEXT = _Sql(
    f"""
    SELECT c.*, {_REWARD_AS_R}
    FROM ({_CONTEXT}) AS c LEFT JOIN LATERAL ({_REWARDS} WHERE tenant_id = :tenant AND reward_id = :reward) AS r ON true
    """
)
_ORDER_COLUMNS = [c.name for c in RedemptionOrder.__table__.columns]
_ADD_OUTBOX = _Sql(
    "INSERT INTO ledger.rewards_outbox (key, value) "
    "SELECT * FROM unnest(CAST(:keys AS bytea[]), CAST(:values AS bytea[]))"
)


# The share of a reward's stock a statement changes: the first one (meeting `condition`, counting from the
# share `:start`, so that writers spread over them) that no other transaction holds, else the first one,
# waiting for it (PostgreSQL evaluates the second subquery only when the first finds nothing; after the wait
# it re-checks the condition and moves on to the next share if need be).
def _share(condition: str) -> str:
    shares = f"""FROM ledger.reward_stock WHERE tenant_id = :tenant_id AND reward_id = :reward_id {condition}
        ORDER BY (shard + CAST(:start AS int)) % {STOCK_SHARDS} LIMIT 1"""
    return f"shard = COALESCE((SELECT shard {shares} FOR UPDATE SKIP LOCKED), (SELECT shard {shares} FOR UPDATE))"


# A new order, its event and (for a stocked reward, `take`) a unit of stock in one statement, the
# redemption's last: the stock share stays locked only from here to the commit.
_PLACE_ORDER = _Sql(
    f"""
    WITH placed AS (
        INSERT INTO ledger.redemption_orders ({", ".join(_ORDER_COLUMNS)})
        VALUES ({", ".join(":" + c for c in _ORDER_COLUMNS)})
    ), event AS (
        INSERT INTO ledger.rewards_outbox (key, value) VALUES (:event_key, :event_value)
    )
    UPDATE ledger.reward_stock SET units = units - 1
    WHERE tenant_id = :tenant_id AND reward_id = :reward_id AND units > 0 AND CAST(:take AS boolean)
        AND {_share("AND units > 0")}
    RETURNING units
    """
)
_RETURN_UNIT = _Sql(
    f"""
    UPDATE ledger.reward_stock SET units = units + 1
    WHERE tenant_id = :tenant_id AND reward_id = :reward_id AND {_share("")}
    """
)
# What is left, spread evenly over the shares (their rows locked in order, so two changes never deadlock).
_SET_STOCK = _Sql(
    f"""
    INSERT INTO ledger.reward_stock (tenant_id, reward_id, shard, units)
    SELECT CAST(:tenant_id AS text), CAST(:reward_id AS text), s,
        n / {STOCK_SHARDS} + CAST(s < n % {STOCK_SHARDS} AS int)
    FROM generate_series(0, {STOCK_SHARDS - 1}) AS s, CAST(:stock AS bigint) AS n
    ON CONFLICT (tenant_id, reward_id, shard) DO UPDATE SET units = excluded.units
    """
)


def terms(row: Reward | dict[str, Any]) -> RewardTerms:
    """The pure rules' view of a reward row (an ORM row or a fetched record's dict)."""
    if isinstance(row, dict):
        return RewardTerms(**{name: row[name] for name in TERMS})
    return RewardTerms(**{name: getattr(row, name) for name in TERMS})


def _reward_of(row: Any) -> dict[str, Any] | None:
    """The reward a `_REWARD_AS_R` row carries, or None (no such reward, or an empty page)."""
    return {c: row[f"r_{c}"] for c in _REWARD_FIELDS} if row["r_found"] else None


def _context(row: Any) -> tuple[RewardsConfig, CustomerContext]:
    tiers = tuple(json.loads(row["tiers"])) if row["tiers"] else ()
    config = RewardsConfig(tiers, row["point_value"], row["currency"])
    if row["hold_timeout"] is not None:
        config = replace(config, hold_timeout_seconds=row["hold_timeout"])
    redeemed: dict[str, list[tuple[datetime, int]]] = {}
    for reward_id, day, count in json.loads(row["redeemed"] or "[]"):
        redeemed.setdefault(reward_id, []).append((datetime.fromisoformat(day), int(count)))
    members = json.loads(row["members"]) if row["members"] is not None else None
    redeemers = None if members is None else tuple(Redeemer(m["member_id"], m.get("max_points")) for m in members)
    customer = CustomerContext(row["available"], row["tier"], redeemers, redeemed)
    return config, customer


class RewardsRepository(RepositoryBase[SessionT]):
    # --- settings, catalogue ----------------------------------------------------------------------

    async def config(self, tenant_id: str) -> RewardsConfig:
        row = await self.session.get(RewardSettings, tenant_id)
        if row is None:
            return RewardsConfig()
        return RewardsConfig(tuple(row.tiers), row.point_value, row.currency)

    async def set_config(
        self: RewardsRepository[AsyncSession], tenant_id: str, config: RewardsConfig, now: datetime
    ) -> None:
        values = {
            "tiers": list(config.tiers),
            "point_value": config.point_value,
            "currency": config.currency,
            "updated_at": now,
        }
        stmt = insert(RewardSettings).values(tenant_id=tenant_id, **values)
        await self.session.execute(stmt.on_conflict_do_update(index_elements=[RewardSettings.tenant_id], set_=values))

    async def create_reward(self: RewardsRepository[AsyncSession], tenant_id: str, values: dict[str, Any]) -> bool:
        """Inserts the reward and its stock (`values["stock"]`, None: unlimited); False when it exists."""
        columns = {k: v for k, v in values.items() if k != "stock"}
        stmt = insert(Reward).values(tenant_id=tenant_id, **columns).on_conflict_do_nothing()
        if (await self.session.execute(stmt.returning(Reward.reward_id))).first() is None:
            return False
        await self.set_stock(tenant_id, values["reward_id"], values.get("stock"))
        return True

    async def set_stock(
        self: RewardsRepository[AsyncSession], tenant_id: str, reward_id: str, stock: int | None
    ) -> None:
        """Sets what is left of a reward (None: unlimited), waiting for the redemptions that hold a share."""
        if stock is None:
            await self.session.execute(
                delete(RewardStock).where(RewardStock.tenant_id == tenant_id, RewardStock.reward_id == reward_id)
            )
        else:
            await _SET_STOCK.fetch(self, {"tenant_id": tenant_id, "reward_id": reward_id, "stock": stock})

    async def get_reward(self, tenant_id: str, reward_id: str, *, lock: bool = False) -> Reward | None:
        stmt = select(Reward).where(Reward.tenant_id == tenant_id, Reward.reward_id == reward_id)
        if lock:
            stmt = stmt.with_for_update()
        # populate_existing: a locked read must see the row as it is now, not the session's older copy.
        return (await self.session.execute(stmt.execution_options(populate_existing=True))).scalar_one_or_none()

    async def list_rewards(
        self, tenant_id: str, *, active_only: bool, after: str | None, limit: int
    ) -> Sequence[Reward]:
        stmt = select(Reward).where(Reward.tenant_id == tenant_id).order_by(Reward.reward_id).limit(limit)
        if active_only:
            stmt = stmt.where(Reward.status == "active")
        if after is not None:
            stmt = stmt.where(Reward.reward_id > after)
        return await self.get_all(stmt)

    async def update_reward(
        self: RewardsRepository[AsyncSession], tenant_id: str, reward_id: str, values: dict[str, Any]
    ) -> None:
        """Updates the reward's terms; with a "stock" value, sets what is left too."""
        columns = {k: v for k, v in values.items() if k != "stock"}
        await self.session.execute(
            update(Reward).where(Reward.tenant_id == tenant_id, Reward.reward_id == reward_id).values(**columns)
        )
        if "stock" in values:
            await self.set_stock(tenant_id, reward_id, values["stock"])

    async def reward_in_use(self, tenant_id: str, reward_id: str) -> bool:
        orders = select(RedemptionOrder.order_id).where(
            RedemptionOrder.tenant_id == tenant_id, RedemptionOrder.reward_id == reward_id
        )
        coupons = select(Coupon.code).where(Coupon.tenant_id == tenant_id, Coupon.reward_id == reward_id)
        found = await self.session.execute(select(orders.exists() | coupons.exists()))
        return bool(found.scalar_one())

    async def delete_reward(self: RewardsRepository[AsyncSession], tenant_id: str, reward_id: str) -> None:
        await self.session.execute(delete(Reward).where(Reward.tenant_id == tenant_id, Reward.reward_id == reward_id))

    async def redemption_context(
        self, tenant_id: str, customer_id: str, reward_id: str
    ) -> tuple[dict[str, Any] | None, RewardsConfig, CustomerContext] | None:
        """The reward's row (None when there is no such reward), the programme's settings and the
        customer's context in one statement; None without an account."""
        params = {"tenant": tenant_id, "customer": customer_id, "reward": reward_id}
        found = await _REDEMPTION_CONTEXT.fetch(self, params)
        if not found:
            return None
        row = found[0]
        return (_reward_of(row), *_context(row))

    async def place_order(
        self: RewardsRepository[AsyncSession], values: dict[str, Any], event: tuple[bytes, bytes], *, take: bool
    ) -> bool:
        """Inserts the order and its event; with `take`, takes a unit of the reward's stock. False when
        `take` found no unit left (the caller rolls back)."""
        start = values["order_id"].int % STOCK_SHARDS  # a random id: the takers spread over the shares
        params = {**values, "event_key": event[0], "event_value": event[1], "take": take, "start": start}
        return bool(await _PLACE_ORDER.fetch(self, params)) or not take

    async def return_unit(
        self: RewardsRepository[AsyncSession], tenant_id: str, reward_id: str, order_id: uuid.UUID
    ) -> None:
        """Gives the order's unit back to a stocked reward (an unlimited one has no shares: nothing to do)."""
        start = order_id.int % STOCK_SHARDS
        await _RETURN_UNIT.fetch(self, {"tenant_id": tenant_id, "reward_id": reward_id, "start": start})

    async def catalogue(
        self, tenant_id: str, customer_id: str, *, after: str | None, limit: int
    ) -> tuple[RewardsConfig, CustomerContext, list[dict[str, Any]]] | None:
        """The programme's settings, the customer's context and up to `limit` active rewards after `after` (by
        id) in one statement; None without an account."""
        params = {"tenant": tenant_id, "customer": customer_id, "after": after or "", "limit": limit}
        found = await _CATALOGUE.fetch(self, params, begin=False)
        if not found:
            return None
        rewards = [reward for reward in map(_reward_of, found) if reward is not None]
        return (*_context(found[0]), rewards)

    # --- customers: tiers and redeemers -----------------------------------------------------------

    async def save_tiers(
        self: RewardsRepository[AsyncSession], rows: Sequence[tuple[str, str, str, datetime, str]]
    ) -> None:
        """Upserts (tenant, customer, tier, changed_at, event id) rows; a row older than the stored one (by
        event time, then id) changes nothing, so events applied out of order leave the newest tier."""
        if not rows:
            return
        stmt = insert(CustomerTier).values(
            [
                {"tenant_id": t, "customer_id": c, "tier": tier, "changed_at": at, "event_id": e}
                for t, c, tier, at, e in rows
            ]
        )
        newer = tuple_(CustomerTier.changed_at, CustomerTier.event_id) < tuple_(
            stmt.excluded.changed_at, stmt.excluded.event_id
        )
        await self.session.execute(
            stmt.on_conflict_do_update(
                index_elements=[CustomerTier.tenant_id, CustomerTier.customer_id],
                set_={
                    "tier": stmt.excluded.tier,
                    "changed_at": stmt.excluded.changed_at,
                    "event_id": stmt.excluded.event_id,
                },
                where=newer,
            )
        )

    async def redeemers(self, tenant_id: str, customer_id: str) -> tuple[Redeemer, ...] | None:
        stmt = select(CustomerRedeemers.members).where(
            CustomerRedeemers.tenant_id == tenant_id, CustomerRedeemers.customer_id == customer_id
        )
        members = (await self.session.execute(stmt)).scalar_one_or_none()
        if members is None:
            return None
        return tuple(Redeemer(m["member_id"], m.get("max_points")) for m in members)

    async def set_redeemers(
        self: RewardsRepository[AsyncSession],
        tenant_id: str,
        customer_id: str,
        members: list[dict[str, Any]] | None,
        now: datetime,
    ) -> None:
        if members is None:
            await self.session.execute(
                delete(CustomerRedeemers).where(
                    CustomerRedeemers.tenant_id == tenant_id, CustomerRedeemers.customer_id == customer_id
                )
            )
            return
        stmt = insert(CustomerRedeemers).values(
            tenant_id=tenant_id, customer_id=customer_id, members=members, updated_at=now
        )
        await self.session.execute(
            stmt.on_conflict_do_update(
                index_elements=[CustomerRedeemers.tenant_id, CustomerRedeemers.customer_id],
                set_={"members": members, "updated_at": now},
            )
        )

    async def get_order(self, tenant_id: str, order_id: uuid.UUID, *, lock: bool = False) -> RedemptionOrder | None:
        stmt = select(RedemptionOrder).where(
            RedemptionOrder.tenant_id == tenant_id, RedemptionOrder.order_id == order_id
        )
        if lock:
            stmt = stmt.with_for_update()
        return (await self.session.execute(stmt.execution_options(populate_existing=True))).scalar_one_or_none()

    async def flush(self: RewardsRepository[AsyncSession]) -> None:
        """Writes the changes made to loaded orders (their state, refunds)."""
        await self.session.flush()

    async def discounts_for_purchase(
        self, tenant_id: str, customer_id: str, purchase_order_id: str
    ) -> list[tuple[uuid.UUID, str | None]]:
        """The (order id, currency) of the customer's discount redemptions for a webshop order."""
        stmt = (
            select(RedemptionOrder.order_id, RedemptionOrder.currency)
            .where(
                RedemptionOrder.tenant_id == tenant_id,
                RedemptionOrder.purchase_order_id == purchase_order_id,
                RedemptionOrder.customer_id == customer_id,
                RedemptionOrder.kind == "discount",
            )
            .order_by(RedemptionOrder.created_at, RedemptionOrder.order_id)
        )
        return [(row.order_id, row.currency) for row in await self.session.execute(stmt)]

    async def due_orders(self, now: datetime, limit: int) -> list[tuple[str, uuid.UUID]]:
        stmt = (
            select(RedemptionOrder.tenant_id, RedemptionOrder.order_id)
            .where(RedemptionOrder.state == "reserved", RedemptionOrder.expires_at <= now)
            .order_by(RedemptionOrder.expires_at)
            .limit(limit)
        )
        return [(row.tenant_id, row.order_id) for row in await self.session.execute(stmt)]

    # --- coupons and entitlements -----------------------------------------------------------------

    async def import_coupons(
        self: RewardsRepository[AsyncSession], tenant_id: str, reward_id: str, codes: Sequence[str]
    ) -> int:
        stmt = (
            insert(Coupon)
            .values([{"tenant_id": tenant_id, "code": c, "reward_id": reward_id, "status": "pooled"} for c in codes])
            .on_conflict_do_nothing()
            .returning(Coupon.code)
        )
        return len((await self.session.execute(stmt)).all())

    async def take_pooled_coupon(
        self: RewardsRepository[AsyncSession], tenant_id: str, reward_id: str, order_id: uuid.UUID
    ) -> str | None:
        # SKIP LOCKED: concurrent redemptions each take another code instead of queueing on one.
        free = (
            select(Coupon.code)
            .where(Coupon.tenant_id == tenant_id, Coupon.reward_id == reward_id, Coupon.status == "pooled")
            .limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        stmt = (
            update(Coupon)
            .where(Coupon.tenant_id == tenant_id, Coupon.code == free)
            .values(status="issued", order_id=order_id)
            .returning(Coupon.code)
        )
        return (await self.session.execute(stmt)).scalar_one_or_none()

    async def insert_coupon(
        self: RewardsRepository[AsyncSession], tenant_id: str, code: str, reward_id: str, order_id: uuid.UUID
    ) -> bool:
        stmt = (
            insert(Coupon)
            .values(tenant_id=tenant_id, code=code, reward_id=reward_id, status="issued", order_id=order_id)
            .on_conflict_do_nothing()
            .returning(Coupon.code)
        )
        return (await self.session.execute(stmt)).first() is not None

    async def get_coupon(self, tenant_id: str, code: str, *, lock: bool = False) -> Coupon | None:
        stmt = select(Coupon).where(Coupon.tenant_id == tenant_id, Coupon.code == code)
        if lock:
            stmt = stmt.with_for_update()
        return (await self.session.execute(stmt.execution_options(populate_existing=True))).scalar_one_or_none()

    async def update_coupon(
        self: RewardsRepository[AsyncSession], tenant_id: str, code: str, values: dict[str, Any]
    ) -> None:
        await self.session.execute(
            update(Coupon).where(Coupon.tenant_id == tenant_id, Coupon.code == code).values(**values)
        )

    async def insert_entitlement(self: RewardsRepository[AsyncSession], tenant_id: str, values: dict[str, Any]) -> None:
        await self.session.execute(insert(Entitlement).values(tenant_id=tenant_id, **values))

    async def entitlements(self, tenant_id: str, customer_id: str, at: datetime) -> Sequence[Entitlement]:
        stmt = (
            select(Entitlement)
            .where(
                Entitlement.tenant_id == tenant_id,
                Entitlement.customer_id == customer_id,
                Entitlement.starts_at <= at,
                Entitlement.ends_at > at,
            )
            .order_by(Entitlement.starts_at, Entitlement.order_id)
        )
        return await self.get_all(stmt)

    # --- the rewards outbox -----------------------------------------------------------------------

    async def add_outbox(self: RewardsRepository[AsyncSession], rows: Sequence[tuple[bytes, bytes]]) -> None:
        if rows:
            await _ADD_OUTBOX.fetch(self, {"keys": [k for k, _ in rows], "values": [v for _, v in rows]})

    async def claim_outbox(self: RewardsRepository[AsyncSession], limit: int) -> Sequence[RewardsOutbox]:
        stmt = select(RewardsOutbox).order_by(RewardsOutbox.id).limit(limit).with_for_update(skip_locked=True)
        return await self.get_all(stmt)

    async def delete_outbox(self: RewardsRepository[AsyncSession], ids: Sequence[int]) -> None:
        if ids:
            await self.session.execute(delete(RewardsOutbox).where(RewardsOutbox.id.in_(list(ids))))

    async def quarantine_outbox(self: RewardsRepository[AsyncSession], rows: Sequence[Unpublishable]) -> None:
        await insert_quarantined(self.session, outbox_quarantine, rows)

    async def oldest_outbox_row(self) -> datetime | None:
        stmt = select(RewardsOutbox.created_at).order_by(RewardsOutbox.id).limit(1)
        return (await self.session.execute(stmt)).scalar_one_or_none()
