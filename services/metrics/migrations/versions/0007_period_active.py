"""customers active in each period (period_active) replace daily.spell_starts: a customer with two spells in
one period is one active customer, not two

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 06:55:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "period_active",
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("period", sa.String(length=8), nullable=False),
        sa.Column("start", sa.Date(), nullable=False),
        sa.Column("customers", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "period", "start", name=op.f("pk_period_active")),
        schema="metrics",
    )
    op.drop_column("daily", "spell_starts", schema="metrics")


def downgrade() -> None:
    op.add_column(
        "daily",
        sa.Column("spell_starts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        schema="metrics",
    )
    op.drop_table("period_active", schema="metrics")
