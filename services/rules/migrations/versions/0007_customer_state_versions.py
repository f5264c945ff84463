"""customer states carry a version: written only over the version read, so consumers may keep states between
batches and read them without a lock

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 22:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Stored rows start at 1 (0 means "no row" to a writer). A constant default adds the column without
    # rewriting the table.
    op.execute("alter table rules.customer_states add column version bigint not null default 1")


def downgrade() -> None:
    op.execute("alter table rules.customer_states drop column version")
