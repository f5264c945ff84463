"""outbox ids in blocks: one nextval reserves OUTBOX_ID_BLOCK ids

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 19:45:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Must equal rules.repository.OUTBOX_ID_BLOCK.
BLOCK = 1024


def upgrade() -> None:
    # A batch writes thousands of outbox rows: a nextval per row was a tenth of the outbox's cost in
    # PostgreSQL. Each nextval now reserves BLOCK consecutive ids for one transaction.
    op.execute(f"alter sequence rules.outbox_id_seq increment by {BLOCK}")


def downgrade() -> None:
    op.execute("alter sequence rules.outbox_id_seq increment by 1")
