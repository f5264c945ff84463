"""predictive CLV: clv_predictions (per customer, from the latest fit) and clv_fits (one row per fit)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05 06:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "clv_predictions",
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("customer_id", sa.String(length=200), nullable=False),
        sa.Column("fitted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("frequency", sa.Integer(), nullable=False),
        sa.Column("recency", sa.Integer(), nullable=False),
        sa.Column("t", sa.Integer(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("monetary_value", sa.Numeric(), nullable=False),
        sa.Column("expected_spend", sa.Numeric(), nullable=False),
        sa.Column("p_alive", sa.Numeric(), nullable=False),
        sa.Column("purchases_90d", sa.Numeric(), nullable=False),
        sa.Column("purchases_365d", sa.Numeric(), nullable=False),
        sa.Column("clv", sa.Numeric(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "customer_id", name=op.f("pk_clv_predictions")),
        schema="metrics",
    )
    op.create_table(
        "clv_fits",
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("fitted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("as_of", sa.Date(), nullable=False),
        sa.Column("method", sa.String(length=20), nullable=False),
        sa.Column("parameters", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("customers", sa.Integer(), nullable=False),
        sa.Column("repeat_customers", sa.Integer(), nullable=False),
        sa.Column("duration_seconds", sa.Numeric(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("discount_rate", sa.Numeric(), nullable=False),
        sa.Column("horizon_months", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "fitted_at", name=op.f("pk_clv_fits")),
        schema="metrics",
    )


def downgrade() -> None:
    op.drop_table("clv_fits", schema="metrics")
    op.drop_table("clv_predictions", schema="metrics")
