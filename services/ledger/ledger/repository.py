from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from ledger.models import ReceivedCommand


class ReceivedCommandRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    @classmethod
    def from_session(cls, session: AsyncSession) -> ReceivedCommandRepository:
        return cls(session)

    async def get(self, tenant_id: str, command_id: str) -> ReceivedCommand | None:
        return await self.session.get(ReceivedCommand, (tenant_id, command_id))

    async def add_many(self, rows: Sequence[dict[str, Any]]) -> int:
        if not rows:
            return 0
        stmt = insert(ReceivedCommand).values(list(rows)).on_conflict_do_nothing()
        result = await self.session.execute(stmt)
        return int(result.rowcount)  # type: ignore[attr-defined]
