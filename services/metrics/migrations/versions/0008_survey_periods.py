"""NPS and effort per period kept incrementally: each customer's latest answer per period (survey_periods)
and the counts of the latest answers and the effort scores (period_surveys), so a query reads one row per
period instead of sorting every answer of the range

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 07:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "survey_periods",
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("period", sa.String(length=8), nullable=False),
        sa.Column("start", sa.Date(), nullable=False),
        sa.Column("customer_id", sa.String(length=200), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event_id", sa.String(length=200), nullable=False),
        sa.Column("nps", sa.SmallInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "period", "start", "customer_id", name=op.f("pk_survey_periods")),
        schema="metrics",
    )
    op.create_table(
        "period_surveys",
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("period", sa.String(length=8), nullable=False),
        sa.Column("start", sa.Date(), nullable=False),
        sa.Column("responses", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("promoters", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("detractors", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("effort_sum", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("efforts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "period", "start", name=op.f("pk_period_surveys")),
        schema="metrics",
    )


def downgrade() -> None:
    op.drop_table("period_surveys", schema="metrics")
    op.drop_table("survey_periods", schema="metrics")
