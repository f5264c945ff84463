"""lots record what clawbacks took back of their earn (a clawback takes at most what is left of it);
backfilled from the clawback entries already posted

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 07:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "lots", sa.Column("clawed_back", sa.BigInteger(), server_default="0", nullable=False), schema="ledger"
    )
    # A clawback credits the issuance shard with what it took back, and names the earn it corrects.
    op.execute(
        """
        UPDATE ledger.lots AS l SET clawed_back = c.points
        FROM (
            SELECT tenant_id, reference_id, sum(points) AS points FROM ledger.entries
            WHERE kind = 'clawback' AND account_id LIKE 'system:issuance/%'
            GROUP BY tenant_id, reference_id
        ) AS c
        WHERE l.tenant_id = c.tenant_id AND l.lot_id = c.reference_id
        """
    )


def downgrade() -> None:
    op.drop_column("lots", "clawed_back", schema="ledger")
