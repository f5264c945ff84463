"""outbox rows carry their creation time (the relay's stall signal); rows that can never be published are
moved to outbox_quarantine

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 04:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # now() is the same for every existing row: adding the column does not rewrite the table.
    op.add_column(
        "outbox",
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        schema="ledger",
    )
    op.create_table(
        "outbox_quarantine",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("topic", sa.String(length=200), nullable=False),
        sa.Column("key", sa.LargeBinary(), nullable=True),
        sa.Column("value", sa.LargeBinary(), nullable=True),
        sa.Column("reference", sa.String(length=200), nullable=True),
        sa.Column("reason", sa.String(length=20), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("quarantined_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_quarantine")),
        schema="ledger",
    )


def downgrade() -> None:
    op.drop_table("outbox_quarantine", schema="ledger")
    op.drop_column("outbox", "created_at", schema="ledger")
