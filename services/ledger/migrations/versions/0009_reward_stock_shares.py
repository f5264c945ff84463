"""a stocked reward's units are spread over 8 rows of ledger.reward_stock (its stock is their sum; no row:
unlimited), so that concurrent redemptions take units from different rows instead of queuing on one

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SHARDS = 8  # ledger.models.STOCK_SHARDS when this was written: a migration does not follow the code


def upgrade() -> None:
    op.create_table(
        "reward_stock",
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("reward_id", sa.String(length=200), nullable=False),
        sa.Column("shard", sa.SmallInteger(), nullable=False),
        sa.Column("units", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("units >= 0", name=op.f("ck_reward_stock_units_not_negative")),
        sa.ForeignKeyConstraint(
            ["tenant_id", "reward_id"],
            ["ledger.rewards.tenant_id", "ledger.rewards.reward_id"],
            name=op.f("fk_reward_stock_tenant_id_rewards"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "reward_id", "shard", name=op.f("pk_reward_stock")),
        schema="ledger",
    )
    op.execute(
        f"""
        INSERT INTO ledger.reward_stock (tenant_id, reward_id, shard, units)
        SELECT r.tenant_id, r.reward_id, s, r.stock / {SHARDS} + CASE WHEN s < r.stock % {SHARDS} THEN 1 ELSE 0 END
        FROM ledger.rewards r CROSS JOIN generate_series(0, {SHARDS - 1}) AS s
        WHERE r.stock IS NOT NULL
        """
    )
    op.drop_column("rewards", "stock", schema="ledger")


def downgrade() -> None:
    op.add_column("rewards", sa.Column("stock", sa.BigInteger(), nullable=True), schema="ledger")
    op.execute(
        """
        UPDATE ledger.rewards r SET stock = s.units
        FROM (SELECT tenant_id, reward_id, sum(units) AS units FROM ledger.reward_stock GROUP BY 1, 2) AS s
        WHERE s.tenant_id = r.tenant_id AND s.reward_id = r.reward_id
        """
    )
    op.drop_table("reward_stock", schema="ledger")
