from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from rules.models import CustomerState


class CustomerStateRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    @classmethod
    def from_session(cls, session: AsyncSession) -> CustomerStateRepository:
        return cls(session)

    async def get(self, tenant_id: str, customer_id: str) -> CustomerState | None:
        return await self.session.get(CustomerState, (tenant_id, customer_id))

    async def count_purchase(self, tenant_id: str, customer_id: str, at: datetime) -> None:
        table = CustomerState
        stmt = insert(table).values(
            tenant_id=tenant_id, customer_id=customer_id, purchase_count=1, first_purchase_at=at, last_purchase_at=at
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[table.tenant_id, table.customer_id],
            set_={
                "purchase_count": table.purchase_count + 1,
                "first_purchase_at": func.least(table.first_purchase_at, at),
                "last_purchase_at": func.greatest(table.last_purchase_at, at),
            },
        )
        await self.session.execute(stmt)

    async def total_purchases(self, tenant_id: str) -> int:
        stmt = select(func.coalesce(func.sum(CustomerState.purchase_count), 0)).where(
            CustomerState.tenant_id == tenant_id
        )
        return int((await self.session.execute(stmt)).scalar_one())
