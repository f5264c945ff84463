"""awards keyed by (tenant, customer, command): the customer's awards listing is an index range

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 21:40:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # GET /v1/customers/{id}/awards filtered a tenant's every award through the (tenant, order) index. The
    # command id alone was the key; with the tenant and customer in front, the same one index serves the
    # listing and a clawback's update, at no extra cost per award written.
    op.execute(
        "alter table rules.awards drop constraint pk_awards,"
        " add constraint pk_awards primary key (tenant_id, customer_id, command_id)"
    )


def downgrade() -> None:
    op.execute("alter table rules.awards drop constraint pk_awards, add constraint pk_awards primary key (command_id)")
