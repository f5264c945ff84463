"""daily revenue as numeric without a precision: a day's sum of orders of up to 10^12 each must not overflow

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05 05:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("alter table metrics.daily_purchases alter column net_revenue type numeric")


def downgrade() -> None:
    op.execute("alter table metrics.daily_purchases alter column net_revenue type numeric(18, 4)")
