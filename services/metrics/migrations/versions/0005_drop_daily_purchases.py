"""daily_purchases goes: its per-currency sums counted every order event (an order re-sent under a new id
twice, refunds never) and are replaced by metrics.daily; `loyalty metrics rebuild --tenant T` recomputes a
tenant's aggregates from the topics

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 06:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_table("daily_purchases", schema="metrics")


def downgrade() -> None:
    op.create_table(
        "daily_purchases",
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("orders", sa.Integer(), nullable=False),
        sa.Column("net_revenue", sa.Numeric(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "day", "currency", name=op.f("pk_daily_purchases")),
        schema="metrics",
    )
