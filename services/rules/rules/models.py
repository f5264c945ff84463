from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    DateTime,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    Numeric,
    PrimaryKeyConstraint,
    String,
    Text,
    func,
)
from sqlalchemy.dialects.postgresql import JSON, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shared.auth import api_keys_table
from shared.db import make_metadata
from shared.outbox import outbox_quarantine_table
from shared.tracking import processed_events_table


class Base(DeclarativeBase):
    metadata = make_metadata("rules")


api_keys = api_keys_table(Base.metadata)
processed_events = processed_events_table(Base.metadata)
outbox_quarantine = outbox_quarantine_table(Base.metadata)


class CustomerState(Base):
    __tablename__ = "customer_states"

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    purchase_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    first_purchase_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_purchase_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Net spend and points per calendar month ("2026-11" -> amount), as parallel arrays sorted by month:
    # rolling 12-month figures are sums. (Arrays, not JSON: every batch reads and writes thousands of states.)
    spend_months: Mapped[list[str]] = mapped_column(ARRAY(Text), nullable=False, server_default="{}")
    spend_amounts: Mapped[list[Decimal]] = mapped_column(ARRAY(Numeric), nullable=False, server_default="{}")
    points_months: Mapped[list[str]] = mapped_column(ARRAY(Text), nullable=False, server_default="{}")
    points_earned: Mapped[list[int]] = mapped_column(ARRAY(BigInteger), nullable=False, server_default="{}")
    categories: Mapped[list[str]] = mapped_column(ARRAY(String(200)), nullable=False, server_default="{}")
    tier: Mapped[str | None] = mapped_column(String(40))
    tier_reviewed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Per-period counters for engagement limits and per-customer caps ("cap:month:2026-11" -> points).
    counter_keys: Mapped[list[str]] = mapped_column(ARRAY(Text), nullable=False, server_default="{}")
    counter_values: Mapped[list[int]] = mapped_column(ARRAY(BigInteger), nullable=False, server_default="{}")
    # The latest segment.changed of the metrics service, by its event time (an older one arriving late is
    # ignored). Not in rows.STATE_COLUMNS: only the segment consumer writes them (raising the version).
    segment: Mapped[str | None] = mapped_column(String(40))
    segment_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Raised by every write, which happens only over the version the writer read (optimistic concurrency).
    version: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="1")


class Ruleset(Base):
    """One version of a tenant's ruleset document; versions are immutable once created."""

    __tablename__ = "rulesets"

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    ruleset_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    document: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    source: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    created_by: Mapped[str | None] = mapped_column(String(32))


class RulesetActivation(Base):
    """The tenant's schedule: the active version at time t is the latest activation effective at t."""

    __tablename__ = "ruleset_activations"
    __table_args__ = (
        ForeignKeyConstraint(
            ["tenant_id", "ruleset_id", "version"],
            ["rules.rulesets.tenant_id", "rules.rulesets.ruleset_id", "rules.rulesets.version"],
            name="fk_ruleset_activations_version",
        ),
        Index("ix_ruleset_activations_tenant_effective", "tenant_id", "effective_from"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(63), nullable=False)
    ruleset_id: Mapped[str] = mapped_column(String(100), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    effective_from: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    activated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    activated_by: Mapped[str | None] = mapped_column(String(32))


class Order(Base):
    """Every purchase seen, so a refund can be matched to it (and refused when it was never seen)."""

    __tablename__ = "orders"

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    order_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(200), nullable=False)
    event_id: Mapped[str] = mapped_column(String(200), nullable=False)
    currency: Mapped[str] = mapped_column(String(3), nullable=False)
    net_amount: Mapped[Decimal] = mapped_column(Numeric(18, 4), nullable=False)
    refunded_amount: Mapped[Decimal] = mapped_column(Numeric(18, 4), nullable=False, server_default="0")
    ordered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    ruleset_id: Mapped[str | None] = mapped_column(String(100))
    ruleset_version: Mapped[int | None] = mapped_column(Integer)


class Award(Base):
    """An earn command this service issued: what a refund claws back, under the version that awarded it."""

    __tablename__ = "awards"

    command_id: Mapped[str] = mapped_column(String(80), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    order_id: Mapped[str | None] = mapped_column(String(200))
    event_id: Mapped[str] = mapped_column(String(200), nullable=False)
    ruleset_id: Mapped[str] = mapped_column(String(100), nullable=False)
    ruleset_version: Mapped[int] = mapped_column(Integer, nullable=False)
    points: Mapped[int] = mapped_column(BigInteger, nullable=False)
    clawed_back: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    matures_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    breakdown: Mapped[list[Any]] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())

    # Keyed by tenant and customer first: one index serves the customer's listing and a clawback's update.
    __table_args__ = (
        PrimaryKeyConstraint("tenant_id", "customer_id", "command_id", name="pk_awards"),
        Index("ix_awards_tenant_order", "tenant_id", "order_id"),
    )


class CampaignSpend(Base):
    __tablename__ = "campaign_spend"

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    campaign_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    points: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")


class OutboxMessage(Base):
    """Commands and tier changes written with the state change, relayed to Kafka after the commit."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    topic: Mapped[str] = mapped_column(String(200), nullable=False)
    key: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    value: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
