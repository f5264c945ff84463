"""The ledger's tables. Entries are append-only (a trigger in the migration refuses UPDATE and DELETE);
everything else is bookkeeping kept in step with them inside the same transaction."""

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Index, Integer, String, Text, UniqueConstraint, Uuid, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shared.auth import api_keys_table
from shared.db import make_metadata
from shared.events import MAX_SOURCE
from shared.outbox import outbox_quarantine_table


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
