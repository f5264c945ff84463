"""The ledger's tables. Entries are append-only (a trigger in the migration refuses UPDATE and DELETE);
everything else is bookkeeping kept in step with them inside the same transaction."""

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    Numeric,
    Sequence,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    cast,
    func,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, column_property, mapped_column

from shared.auth import api_keys_table
from shared.db import make_metadata
from shared.events import MAX_SOURCE
from shared.outbox import outbox_quarantine_table
from shared.tracking import processed_events_table


class Base(DeclarativeBase):
    metadata = make_metadata("ledger")


api_keys = api_keys_table(Base.metadata)
outbox_quarantine = outbox_quarantine_table(Base.metadata)


class Balance(Base):
    """One row per account: the O(1) balances plus the head of the account's hash chain."""

    __tablename__ = "balances"

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    kind: Mapped[str] = mapped_column(String(10), nullable=False)
    available: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    pending: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    held: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    lifetime_earned: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    redeemed: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    expired: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    last_seq: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    last_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class Entry(Base):
    """One posting: a signed amount on one bucket (available, pending, held) of one account."""

    __tablename__ = "entries"
    __table_args__ = (UniqueConstraint("tenant_id", "account_id", "seq", name="uq_entries_account_seq"),)

    entry_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    transaction_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    tenant_id: Mapped[str] = mapped_column(String(63), nullable=False)
    account_id: Mapped[str] = mapped_column(String(200), nullable=False)
    seq: Mapped[int] = mapped_column(Integer, nullable=False)
    bucket: Mapped[str] = mapped_column(String(10), nullable=False)
    kind: Mapped[str] = mapped_column(String(20), nullable=False)
    points: Mapped[int] = mapped_column(BigInteger, nullable=False)
    balance_after: Mapped[int] = mapped_column(BigInteger, nullable=False)
    source: Mapped[str] = mapped_column(String(MAX_SOURCE), nullable=False)
    event_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    member_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    ruleset_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    ruleset_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    breakdown: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONB, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    actor_key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    reference_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lot_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    hold_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    prev_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    hash: Mapped[str] = mapped_column(String(64), nullable=False)


Index("ix_entries_tenant_kind", Entry.tenant_id, Entry.kind, Entry.created_at)
Index("ix_entries_transaction", Entry.tenant_id, Entry.transaction_id)


class Lot(Base):
    """What is left of one credit (an earn, a transfer in, a positive adjustment) and when it expires."""

    __tablename__ = "lots"

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    lot_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(200), nullable=False)
    points: Mapped[int] = mapped_column(BigInteger, nullable=False)
    remaining: Mapped[int] = mapped_column(BigInteger, nullable=False)
    pending: Mapped[bool] = mapped_column(nullable=False)
    matures_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    # What clawbacks took back of this earn so far: a clawback takes at most `points - clawed_back`.
    clawed_back: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")


# The periodic tasks look for lots that are due; partial indexes keep that cheap as lots pile up.
Index("ix_lots_account", Lot.tenant_id, Lot.account_id, postgresql_where=text("remaining > 0"))
Index("ix_lots_matures_at", Lot.matures_at, postgresql_where=text("pending"))
Index("ix_lots_expires_at", Lot.expires_at, postgresql_where=text("remaining > 0"))


class Hold(Base):
    __tablename__ = "holds"

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    hold_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    account_id: Mapped[str] = mapped_column(String(200), nullable=False)
    points: Mapped[int] = mapped_column(BigInteger, nullable=False)
    captured: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    status: Mapped[str] = mapped_column(String(10), nullable=False)
    # Which lots the hold took its points from, so a void puts them back where they came from.
    allocations: Mapped[list[list[Any]]] = mapped_column(JSONB, nullable=False)
    member_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    reference: Mapped[str | None] = mapped_column(String(200), nullable=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


Index("ix_holds_active_expires_at", Hold.expires_at, postgresql_where=text("status = 'active'"))


class Command(Base):
    """Process-once record of a Kafka points command (its command id is the idempotency key)."""

    __tablename__ = "commands"

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    command_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    kind: Mapped[str] = mapped_column(String(20), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class IdempotencyKey(Base):
    """The stored response of a REST write, by (tenant, API key, Idempotency-Key): each partner app's keys
    are its own, so two apps that happen to use the same key (an order number) never share a response."""

    __tablename__ = "idempotency_keys"

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    api_key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    response: Mapped[dict[str, Any] | None] = mapped_column(JSONB, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class Outbox(Base):
    """Entries committed but not yet relayed to Kafka; the relay deletes a row once the broker acked it."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    entry_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    # How long the oldest row has waited is the relay's stall signal (/readyz, outbox_oldest_age_seconds).
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class TenantPolicy(Base):
    __tablename__ = "tenant_policies"

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    expiry_rule: Mapped[str] = mapped_column(String(30), nullable=False)
    expiry_months: Mapped[int] = mapped_column(Integer, nullable=False)
    clawback_policy: Mapped[str] = mapped_column(String(30), nullable=False)
    hold_timeout_seconds: Mapped[int] = mapped_column(Integer, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


# --- rewards (docs/rewards.md) ---------------------------------------------------------------------

processed_events = processed_events_table(Base.metadata)


class RewardSettings(Base):
    """A programme's rewards configuration: its tiers in ascending order and what a point is worth."""

    __tablename__ = "reward_settings"

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    tiers: Mapped[list[str]] = mapped_column(JSONB, nullable=False)
    point_value: Mapped[Decimal | None] = mapped_column(Numeric(20, 6), nullable=True)
    currency: Mapped[str | None] = mapped_column(String(3), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


# A stocked reward's units are spread over this many rows, so that concurrent redemptions take them from
# different rows instead of queuing on one row's lock until each one commits.
STOCK_SHARDS = 8


class RewardStock(Base):
    """A share of a stocked reward's units; the reward's stock is the sum of its shares (no row: unlimited)."""

    __tablename__ = "reward_stock"
    __table_args__ = (
        ForeignKeyConstraint(
            ["tenant_id", "reward_id"], ["ledger.rewards.tenant_id", "ledger.rewards.reward_id"], ondelete="CASCADE"
        ),
        CheckConstraint("units >= 0", name="units_not_negative"),
    )

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    reward_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    shard: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    units: Mapped[int] = mapped_column(BigInteger, nullable=False)


class Reward(Base):
    """One reward of a programme's catalogue; `stock` is what is left, the sum of its `RewardStock` shares
    (null: unlimited)."""

    __tablename__ = "rewards"

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    reward_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    description: Mapped[str] = mapped_column(Text, nullable=False, server_default="")
    kind: Mapped[str] = mapped_column(String(10), nullable=False)
    points: Mapped[int] = mapped_column(BigInteger, nullable=False)
    value: Mapped[Decimal | None] = mapped_column(Numeric(20, 4), nullable=True)
    currency: Mapped[str | None] = mapped_column(String(3), nullable=True)
    available_from: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    available_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    min_tier: Mapped[str | None] = mapped_column(String(200), nullable=True)
    limit_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    limit_period: Mapped[str | None] = mapped_column(String(10), nullable=True)
    duration_days: Mapped[int | None] = mapped_column(Integer, nullable=True)
    coupon_source: Mapped[str | None] = mapped_column(String(10), nullable=True)
    reserve_seconds: Mapped[int | None] = mapped_column(Integer, nullable=True)
    status: Mapped[str] = mapped_column(String(10), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    stock: Mapped[int | None] = column_property(
        select(cast(func.sum(RewardStock.units), BigInteger))
        .where(RewardStock.tenant_id == tenant_id, RewardStock.reward_id == reward_id)
        .correlate_except(RewardStock)
        .scalar_subquery()
    )


class CustomerTier(Base):
    """A customer's tier as the last `tier.changed` (by event time) said; an older event never overwrites it."""

    __tablename__ = "customer_tiers"

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    tier: Mapped[str] = mapped_column(Text, nullable=False)
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    event_id: Mapped[str] = mapped_column(String(200), nullable=False)


class CustomerRedeemers(Base):
    """Which members (buyers) of a customer may redeem: no row means all of them."""

    __tablename__ = "customer_redeemers"

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    # [{"member_id": ..., "max_points": int | null}, ...]
    members: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class RedemptionOrder(Base):
    """A redemption order: a reward reserved with a hold, then confirmed, cancelled, expired or refunded."""

    __tablename__ = "redemption_orders"

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    order_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    reward_id: Mapped[str] = mapped_column(String(200), nullable=False)
    kind: Mapped[str] = mapped_column(String(10), nullable=False)
    customer_id: Mapped[str] = mapped_column(String(200), nullable=False)
    member_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    points: Mapped[int] = mapped_column(BigInteger, nullable=False)
    hold_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    state: Mapped[str] = mapped_column(String(10), nullable=False)
    value: Mapped[Decimal | None] = mapped_column(Numeric(20, 4), nullable=True)
    currency: Mapped[str | None] = mapped_column(String(3), nullable=True)
    purchase_order_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    order_amount: Mapped[Decimal | None] = mapped_column(Numeric(20, 4), nullable=True)
    refunded_amount: Mapped[Decimal] = mapped_column(Numeric(20, 4), nullable=False, server_default="0")
    points_returned: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    coupon_code: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


# Limits count a customer's orders of a reward; refunds find the orders of a webshop order; expiry the due ones.
Index(
    "ix_redemption_orders_customer", RedemptionOrder.tenant_id, RedemptionOrder.customer_id, RedemptionOrder.reward_id
)
Index(
    "ix_redemption_orders_purchase",
    RedemptionOrder.tenant_id,
    RedemptionOrder.purchase_order_id,
    postgresql_where=text("purchase_order_id IS NOT NULL"),
)
Index("ix_redemption_orders_due", RedemptionOrder.expires_at, postgresql_where=text("state = 'reserved'"))


class Coupon(Base):
    """A coupon code: pooled (imported, not yet issued), issued to an order, consumed, or void."""

    __tablename__ = "coupons"

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    code: Mapped[str] = mapped_column(String(200), primary_key=True)
    reward_id: Mapped[str] = mapped_column(String(200), nullable=False)
    status: Mapped[str] = mapped_column(String(10), nullable=False)
    order_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    consumed_by: Mapped[str | None] = mapped_column(String(200), nullable=True)
    consumed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


Index("ix_coupons_pool", Coupon.tenant_id, Coupon.reward_id, postgresql_where=text("status = 'pooled'"))


class Entitlement(Base):
    """What a confirmed privilege grants a customer, from `starts_at` until `ends_at`."""

    __tablename__ = "entitlements"

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    order_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(200), nullable=False)
    reward_id: Mapped[str] = mapped_column(String(200), nullable=False)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    starts_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    ends_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


Index("ix_entitlements_customer", Entitlement.tenant_id, Entitlement.customer_id, Entitlement.ends_at)


class RewardsOutbox(Base):
    """`redemption.changed` events written with the order's change, relayed to loyalty.rewards.v1."""

    __tablename__ = "rewards_outbox"

    # The entries' outbox sequence: both relays quarantine into one outbox_quarantine table keyed by row id.
    id: Mapped[int] = mapped_column(
        BigInteger, Sequence("outbox_id_seq", schema="ledger", metadata=Base.metadata), primary_key=True
    )
    key: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    value: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
