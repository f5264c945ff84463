"""rewards: settings (tiers, point value), catalogue, customer tiers (from tier.changed), redeemers, redemption
orders, coupons, entitlements, the rewards outbox and the tracking rows of the ledger's event consumers

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 06:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "processed_events",
        sa.Column("consumer_group", sa.String(length=100), nullable=False),
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("source", sa.String(length=200), nullable=False),
        sa.Column("event_id", sa.String(length=200), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("consumer_group", "tenant_id", "source", "event_id", name=op.f("pk_processed_events")),
        schema="ledger",
    )
    op.create_table(
        "reward_settings",
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("tiers", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("point_value", sa.Numeric(precision=20, scale=6), nullable=True),
        sa.Column("currency", sa.String(length=3), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_reward_settings")),
        schema="ledger",
    )
    op.create_table(
        "rewards",
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("reward_id", sa.String(length=200), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("points", sa.BigInteger(), nullable=False),
        sa.Column("value", sa.Numeric(precision=20, scale=4), nullable=True),
        sa.Column("currency", sa.String(length=3), nullable=True),
        sa.Column("stock", sa.BigInteger(), nullable=True),
        sa.Column("available_from", sa.DateTime(timezone=True), nullable=True),
        sa.Column("available_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("min_tier", sa.String(length=200), nullable=True),
        sa.Column("limit_count", sa.Integer(), nullable=True),
        sa.Column("limit_period", sa.String(length=10), nullable=True),
        sa.Column("duration_days", sa.Integer(), nullable=True),
        sa.Column("coupon_source", sa.String(length=10), nullable=True),
        sa.Column("reserve_seconds", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=10), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "reward_id", name=op.f("pk_rewards")),
        schema="ledger",
    )
    op.create_table(
        "customer_tiers",
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("customer_id", sa.String(length=200), nullable=False),
        sa.Column("tier", sa.Text(), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event_id", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "customer_id", name=op.f("pk_customer_tiers")),
        schema="ledger",
    )
    op.create_table(
        "customer_redeemers",
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("customer_id", sa.String(length=200), nullable=False),
        sa.Column("members", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "customer_id", name=op.f("pk_customer_redeemers")),
        schema="ledger",
    )
    op.create_table(
        "redemption_orders",
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("order_id", sa.Uuid(), nullable=False),
        sa.Column("reward_id", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("customer_id", sa.String(length=200), nullable=False),
        sa.Column("member_id", sa.String(length=200), nullable=True),
        sa.Column("points", sa.BigInteger(), nullable=False),
        sa.Column("hold_id", sa.Uuid(), nullable=False),
        sa.Column("state", sa.String(length=10), nullable=False),
        sa.Column("value", sa.Numeric(precision=20, scale=4), nullable=True),
        sa.Column("currency", sa.String(length=3), nullable=True),
        sa.Column("purchase_order_id", sa.String(length=200), nullable=True),
        sa.Column("order_amount", sa.Numeric(precision=20, scale=4), nullable=True),
        sa.Column("refunded_amount", sa.Numeric(precision=20, scale=4), server_default="0", nullable=False),
        sa.Column("points_returned", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("coupon_code", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "order_id", name=op.f("pk_redemption_orders")),
        schema="ledger",
    )
    op.create_index(
        "ix_redemption_orders_customer",
        "redemption_orders",
        ["tenant_id", "customer_id", "reward_id"],
        unique=False,
        schema="ledger",
    )
    op.create_index(
        "ix_redemption_orders_purchase",
        "redemption_orders",
        ["tenant_id", "purchase_order_id"],
        unique=False,
        schema="ledger",
        postgresql_where=sa.text("purchase_order_id IS NOT NULL"),
    )
    op.create_index(
        "ix_redemption_orders_due",
        "redemption_orders",
        ["expires_at"],
        unique=False,
        schema="ledger",
        postgresql_where=sa.text("state = 'reserved'"),
    )
    op.create_table(
        "coupons",
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("code", sa.String(length=200), nullable=False),
        sa.Column("reward_id", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=10), nullable=False),
        sa.Column("order_id", sa.Uuid(), nullable=True),
        sa.Column("consumed_by", sa.String(length=200), nullable=True),
        sa.Column("consumed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("tenant_id", "code", name=op.f("pk_coupons")),
        schema="ledger",
    )
    op.create_index(
        "ix_coupons_pool",
        "coupons",
        ["tenant_id", "reward_id"],
        unique=False,
        schema="ledger",
        postgresql_where=sa.text("status = 'pooled'"),
    )
    op.create_table(
        "entitlements",
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("order_id", sa.Uuid(), nullable=False),
        sa.Column("customer_id", sa.String(length=200), nullable=False),
        sa.Column("reward_id", sa.String(length=200), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("starts_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ends_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "order_id", name=op.f("pk_entitlements")),
        schema="ledger",
    )
    op.create_index(
        "ix_entitlements_customer",
        "entitlements",
        ["tenant_id", "customer_id", "ends_at"],
        unique=False,
        schema="ledger",
    )
    # Ids from the entries' outbox sequence: both relays quarantine into ledger.outbox_quarantine by row id.
    op.create_table(
        "rewards_outbox",
        sa.Column("id", sa.BigInteger(), server_default=sa.text("nextval('ledger.outbox_id_seq')"), nullable=False),
        sa.Column("key", sa.LargeBinary(), nullable=False),
        sa.Column("value", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rewards_outbox")),
        schema="ledger",
    )


def downgrade() -> None:
    op.drop_table("rewards_outbox", schema="ledger")
    op.drop_index("ix_entitlements_customer", table_name="entitlements", schema="ledger")
    op.drop_table("entitlements", schema="ledger")
    op.drop_index("ix_coupons_pool", table_name="coupons", schema="ledger")
    op.drop_table("coupons", schema="ledger")
    op.drop_index("ix_redemption_orders_due", table_name="redemption_orders", schema="ledger")
    op.drop_index("ix_redemption_orders_purchase", table_name="redemption_orders", schema="ledger")
    op.drop_index("ix_redemption_orders_customer", table_name="redemption_orders", schema="ledger")
    op.drop_table("redemption_orders", schema="ledger")
    op.drop_table("customer_redeemers", schema="ledger")
    op.drop_table("customer_tiers", schema="ledger")
    op.drop_table("rewards", schema="ledger")
    op.drop_table("reward_settings", schema="ledger")
    op.drop_table("processed_events", schema="ledger")
