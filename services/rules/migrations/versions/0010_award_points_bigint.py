"""award points as bigint: an award may be as large as a points command (10^12), more than an integer holds

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 05:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("alter table rules.awards alter column points type bigint, alter column clawed_back type bigint")


def downgrade() -> None:
    op.execute("alter table rules.awards alter column points type integer, alter column clawed_back type integer")
