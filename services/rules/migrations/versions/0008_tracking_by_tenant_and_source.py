"""tracking rows keyed by (tracking name, tenant, source, event id): CloudEvents promise only source + id
unique, within one producer, and every tenant is a producer of its own. Business ids (refund, review...) are
tracked in the same table (shared.tracking).

Rows of before are kept, under tenant '' and source '': no key matches them any more (a tenant id is never
empty), so they change nothing; they record offsets already committed, which a restart does not read again.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 04:30:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "rules.processed_events"


def upgrade() -> None:
    # A constant default adds the columns without rewriting the table; dropped at once (the model has none).
    op.execute(
        f"alter table {TABLE} add column tenant_id varchar(63) not null default '', "
        "add column source varchar(200) not null default ''"
    )
    op.execute(f"alter table {TABLE} alter column tenant_id drop default, alter column source drop default")
    op.execute(
        f"alter table {TABLE} drop constraint pk_processed_events, "
        "add constraint pk_processed_events primary key (consumer_group, tenant_id, source, event_id)"
    )


def downgrade() -> None:
    # The old key holds one row per (group, event id): business ids go, and of one event id under several
    # tenants or sources, one row stays.
    op.execute(f"delete from {TABLE} where consumer_group like '%:%'")
    op.execute(
        f"delete from {TABLE} a using {TABLE} b where a.consumer_group = b.consumer_group "
        "and a.event_id = b.event_id and (a.tenant_id, a.source) > (b.tenant_id, b.source)"
    )
    op.execute(
        f"alter table {TABLE} drop constraint pk_processed_events, "
        "add constraint pk_processed_events primary key (consumer_group, event_id)"
    )
    op.execute(f"alter table {TABLE} drop column tenant_id, drop column source")
