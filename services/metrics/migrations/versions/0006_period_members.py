"""active members per period (period_members), member days by customer (to find a customer's other days)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 06:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "period_members",
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("period", sa.String(length=8), nullable=False),
        sa.Column("start", sa.Date(), nullable=False),
        sa.Column("members", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "period", "start", name=op.f("pk_period_members")),
        schema="metrics",
    )
    op.create_index(
        "ix_metrics_member_days_customer",
        "member_days",
        ["tenant_id", "customer_id", "day"],
        unique=False,
        schema="metrics",
    )


def downgrade() -> None:
    op.drop_index("ix_metrics_member_days_customer", table_name="member_days", schema="metrics")
    op.drop_table("period_members", schema="metrics")
