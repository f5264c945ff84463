"""the read-only role `loyalty_reader` (Grafana's PostgreSQL data source) may read the metrics schema: every
table but api_keys, now and created later by the migrating role; nothing when the role does not exist (the
cluster's administrator creates it: deploy/postgres/db-up.sh, deploy/postgres/init.sql)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 06:55:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        do $$ begin
          if exists (select from pg_roles where rolname = 'loyalty_reader') then
            grant usage on schema metrics to loyalty_reader;
            grant select on all tables in schema metrics to loyalty_reader;
            revoke select on metrics.api_keys from loyalty_reader;
            alter default privileges in schema metrics grant select on tables to loyalty_reader;
          end if;
        end $$
        """
    )


def downgrade() -> None:
    op.execute(
        """
        do $$ begin
          if exists (select from pg_roles where rolname = 'loyalty_reader') then
            alter default privileges in schema metrics revoke select on tables from loyalty_reader;
            revoke select on all tables in schema metrics from loyalty_reader;
            revoke usage on schema metrics from loyalty_reader;
          end if;
        end $$
        """
    )
