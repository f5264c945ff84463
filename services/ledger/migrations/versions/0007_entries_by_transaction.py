"""entries are indexed by (tenant, transaction): verify checks that each transaction an account took part
in sums to zero without scanning the tenant's entries

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 07:20:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_entries_transaction", "entries", ["tenant_id", "transaction_id"], schema="ledger")


def downgrade() -> None:
    op.drop_index("ix_entries_transaction", table_name="entries", schema="ledger")
