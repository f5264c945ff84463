"""redemptions per reward and kind from loyalty.rewards.v1: redemption_orders and redemption_changes (the facts),
redemptions_daily and redemption_values_daily (the sums per tenant, day, reward and kind); the read-only role
`loyalty_reader` may read the sums (Grafana), when it exists

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ZERO = sa.text("0")


def upgrade() -> None:
    op.create_table(
        "redemption_orders",
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("order_id", sa.String(length=200), nullable=False),
        sa.Column("customer_id", sa.String(length=200), nullable=False),
        sa.Column("reward_id", sa.String(length=200), nullable=False),
        sa.Column("reward_kind", sa.String(length=12), nullable=False),
        sa.Column("points", sa.BigInteger(), nullable=False),
        sa.Column("value", sa.Numeric(), nullable=True),
        sa.Column("currency", sa.String(length=3), nullable=True),
        sa.PrimaryKeyConstraint("tenant_id", "order_id", name=op.f("pk_redemption_orders")),
        schema="metrics",
    )
    op.create_table(
        "redemption_changes",
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("order_id", sa.String(length=200), nullable=False),
        sa.Column("source", sa.String(length=200), nullable=False),
        sa.Column("event_id", sa.String(length=200), nullable=False),
        sa.Column("change", sa.String(length=20), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("points_returned", sa.BigInteger(), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "order_id", "source", "event_id", name=op.f("pk_redemption_changes")),
        schema="metrics",
    )
    op.create_table(
        "redemptions_daily",
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("reward_id", sa.String(length=200), nullable=False),
        sa.Column("reward_kind", sa.String(length=12), nullable=False),
        sa.Column("reserved", sa.Integer(), server_default=ZERO, nullable=False),
        sa.Column("confirmed", sa.Integer(), server_default=ZERO, nullable=False),
        sa.Column("cancelled", sa.Integer(), server_default=ZERO, nullable=False),
        sa.Column("expired", sa.Integer(), server_default=ZERO, nullable=False),
        sa.Column("refunded", sa.Integer(), server_default=ZERO, nullable=False),
        sa.Column("coupons_consumed", sa.Integer(), server_default=ZERO, nullable=False),
        sa.Column("points_reserved", sa.BigInteger(), server_default=ZERO, nullable=False),
        sa.Column("points_spent", sa.BigInteger(), server_default=ZERO, nullable=False),
        sa.Column("points_returned", sa.BigInteger(), server_default=ZERO, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "day", "reward_id", "reward_kind", name=op.f("pk_redemptions_daily")),
        schema="metrics",
    )
    op.create_table(
        "redemption_values_daily",
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("reward_id", sa.String(length=200), nullable=False),
        sa.Column("reward_kind", sa.String(length=12), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("value", sa.Numeric(), server_default=ZERO, nullable=False),
        sa.PrimaryKeyConstraint(
            "tenant_id", "day", "reward_id", "reward_kind", "currency", name=op.f("pk_redemption_values_daily")
        ),
        schema="metrics",
    )
    # The default privileges of 0010 cover tables this role creates; granted here too, so the panel works
    # whichever role ran 0010. The service role gets its rights from the env after every run (shared.migrations).
    op.execute(
        """
        do $$ begin
          if exists (select from pg_roles where rolname = 'loyalty_reader') then
            grant select on metrics.redemption_orders, metrics.redemption_changes, metrics.redemptions_daily,
              metrics.redemption_values_daily to loyalty_reader;
          end if;
        end $$
        """
    )


def downgrade() -> None:
    op.drop_table("redemption_values_daily", schema="metrics")
    op.drop_table("redemptions_daily", schema="metrics")
    op.drop_table("redemption_changes", schema="metrics")
    op.drop_table("redemption_orders", schema="metrics")
