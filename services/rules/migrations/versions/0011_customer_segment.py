"""customer_states.segment and segment_at: the value segment the metrics service announced last
(segment.changed on loyalty.customers.v1), by its event time, so rulesets can target it (`customer.segment`)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05 07:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("customer_states", sa.Column("segment", sa.String(length=40), nullable=True), schema="rules")
    op.add_column("customer_states", sa.Column("segment_at", sa.DateTime(timezone=True), nullable=True), schema="rules")


def downgrade() -> None:
    op.drop_column("customer_states", "segment_at", schema="rules")
    op.drop_column("customer_states", "segment", schema="rules")
