"""All SQL of the metrics service."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert

from metrics.models import DailyPurchases, TenantConfig
from shared.db import AsyncSession, SessionT
from shared.repository import RepositoryBase


class DailyPurchasesRepository(RepositoryBase[SessionT]):
    async def add(
        self: DailyPurchasesRepository[AsyncSession],
        tenant_id: str,
        day: date,
        currency: str,
        orders: int,
        net_revenue: Decimal,
    ) -> None:
        table = DailyPurchases
        stmt = insert(table).values(
            tenant_id=tenant_id, day=day, currency=currency, orders=orders, net_revenue=net_revenue
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[table.tenant_id, table.day, table.currency],
            set_={"orders": table.orders + orders, "net_revenue": table.net_revenue + net_revenue},
        )
        await self.session.execute(stmt)

    async def between(self, tenant_id: str, start: date, end: date) -> Sequence[DailyPurchases]:
        stmt = (
            select(DailyPurchases)
            .where(DailyPurchases.tenant_id == tenant_id, DailyPurchases.day >= start, DailyPurchases.day <= end)
            .order_by(DailyPurchases.day, DailyPurchases.currency)
        )
        return await self.get_all(stmt)


class ConfigRepository(RepositoryBase[SessionT]):
    async def get(self, tenant_id: str) -> TenantConfig | None:
        return await self.session.get(TenantConfig, tenant_id)

    async def get_many(self, tenant_ids: Sequence[str]) -> Sequence[TenantConfig]:
        return await self.get_all(select(TenantConfig).where(TenantConfig.tenant_id.in_(tenant_ids)))

    async def put(self: ConfigRepository[AsyncSession], tenant_id: str, values: dict[str, Any]) -> TenantConfig:
        upsert = insert(TenantConfig).values(tenant_id=tenant_id, **values, updated_at=func.now())
        stmt = (
            upsert.on_conflict_do_update(
                index_elements=[TenantConfig.tenant_id], set_={**values, "updated_at": func.now()}
            )
            .returning(TenantConfig)
            .execution_options(populate_existing=True)
        )
        row: TenantConfig = (await self.session.execute(stmt)).scalar_one()
        return row
