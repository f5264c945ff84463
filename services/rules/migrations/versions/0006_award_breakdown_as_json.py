"""award breakdowns stored as json, not jsonb: written once per award, read back whole, never queried inside

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 21:30:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # jsonb parses every document into its binary form on the way in, which the service never uses: the
    # breakdown is shown as it was written (GET /v1/customers/{id}/awards) and no query looks inside it.
    # json checks the syntax only, which took a sixth of PostgreSQL's cost of writing an award.
    op.execute("alter table rules.awards alter column breakdown type json using breakdown::json")


def downgrade() -> None:
    op.execute("alter table rules.awards alter column breakdown type jsonb using breakdown::jsonb")
