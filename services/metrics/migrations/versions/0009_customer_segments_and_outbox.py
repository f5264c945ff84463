"""value segments: customer_segments (each customer's current segment, reason and since when, with the customer
list's sort keys and an index per sort, with and without the segment), segments_pending (customers an ingested
batch touched, for the pending loop), and the outbox (segment.changed) with its quarantine, relayed by
shared.outbox

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 07:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The list's sort keys (metrics.models.LIST_SORTS, copied: a migration does not change with the code).
SORTS = {
    "clv": "(clv is not null), coalesce(clv, 0), customer_id",
    "revenue": "net_revenue, customer_id",
    "p_alive": "(p_alive is null), coalesce(p_alive, 0), customer_id",
    "last_purchase": "last_purchase_at, customer_id",
}


def upgrade() -> None:
    op.create_table(
        "customer_segments",
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("customer_id", sa.String(length=200), nullable=False),
        sa.Column("segment", sa.String(length=20), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("classified_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("orders", sa.Integer(), nullable=False),
        sa.Column("net_revenue", sa.Numeric(), nullable=False),
        sa.Column("last_purchase_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("clv", sa.Numeric(), nullable=True),
        sa.Column("p_alive", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("tenant_id", "customer_id", name=op.f("pk_customer_segments")),
        schema="metrics",
    )
    for name, keys in SORTS.items():
        op.execute(f"create index ix_metrics_customer_segments_{name} on metrics.customer_segments (tenant_id, {keys})")
        op.execute(
            f"create index ix_metrics_customer_segments_segment_{name} "
            f"on metrics.customer_segments (tenant_id, segment, {keys})"
        )
    op.create_table(
        "segments_pending",
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("customer_id", sa.String(length=200), nullable=False),
        sa.Column("marked_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "customer_id", name=op.f("pk_segments_pending")),
        schema="metrics",
    )
    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("topic", sa.String(length=200), nullable=False),
        sa.Column("key", sa.LargeBinary(), nullable=False),
        sa.Column("value", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
        schema="metrics",
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
        schema="metrics",
    )


def downgrade() -> None:
    op.drop_table("outbox_quarantine", schema="metrics")
    op.drop_table("outbox", schema="metrics")
    op.drop_table("segments_pending", schema="metrics")
    op.drop_table("customer_segments", schema="metrics")
