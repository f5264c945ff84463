"""Idempotency-Keys are scoped by (tenant, API key): two partner apps of a tenant that happen to send the
same key each get their own write; rows stored before keep an empty API key id (never matched again)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 07:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "idempotency_keys",
        sa.Column("api_key_id", sa.String(length=32), server_default="", nullable=False),
        schema="ledger",
    )
    op.drop_constraint("pk_idempotency_keys", "idempotency_keys", schema="ledger", type_="primary")
    op.create_primary_key(
        "pk_idempotency_keys", "idempotency_keys", ["tenant_id", "api_key_id", "key"], schema="ledger"
    )
    op.alter_column("idempotency_keys", "api_key_id", server_default=None, schema="ledger")


def downgrade() -> None:
    op.drop_constraint("pk_idempotency_keys", "idempotency_keys", schema="ledger", type_="primary")
    op.execute("DELETE FROM ledger.idempotency_keys WHERE api_key_id <> ''")
    op.create_primary_key("pk_idempotency_keys", "idempotency_keys", ["tenant_id", "key"], schema="ledger")
    op.drop_column("idempotency_keys", "api_key_id", schema="ledger")
