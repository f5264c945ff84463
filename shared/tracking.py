"""Process-once bookkeeping for consumers: a tracking row per (consumer group, event id), inserted in
the same transaction as the effect. A redelivered event finds its row and is skipped."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Column, DateTime, MetaData, String, Table, func
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession


def processed_events_table(metadata: MetaData) -> Table:
    return Table(
        "processed_events",
        metadata,
        Column("consumer_group", String(100), primary_key=True),
        Column("event_id", String(200), primary_key=True),
        Column("processed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    )


async def claim_new(session: AsyncSession, table: Table, group: str, event_ids: Iterable[str]) -> set[str]:
    """Inserts tracking rows and returns the ids that were not processed before (in this transaction's view)."""
    ids = list(dict.fromkeys(event_ids))
    if not ids:
        return set()
    stmt = (
        insert(table)
        .values([{"consumer_group": group, "event_id": i} for i in ids])
        .on_conflict_do_nothing()
        .returning(table.c.event_id)
    )
    return set((await session.execute(stmt)).scalars())
