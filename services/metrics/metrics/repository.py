"""All SQL of the metrics service."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert

from metrics.models import ClvFit, ClvPrediction, DailyPurchases, Order, TenantConfig
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


class ClvRepository(RepositoryBase[SessionT]):
    async def daily_net(self, tenant_id: str, as_of: date) -> Sequence[tuple[str, date, Decimal]]:
        """(customer, day, net revenue) of the tenant's orders up to `as_of`, refunds subtracted."""
        net = func.sum(Order.amount - func.least(Order.refunded, Order.amount))
        stmt = (
            select(Order.customer_id, Order.day, net)
            .where(Order.tenant_id == tenant_id, Order.day <= as_of)
            .group_by(Order.customer_id, Order.day)
        )
        return [(c, d, n) for c, d, n in (await self.session.execute(stmt)).tuples()]

    async def replace_predictions(
        self: ClvRepository[AsyncSession], tenant_id: str, rows: Sequence[Sequence[Any]]
    ) -> None:
        """The tenant's predictions become `rows` (in `PREDICTION_COLUMNS` order): the old ones go whole."""
        await self.session.execute(delete(ClvPrediction).where(ClvPrediction.tenant_id == tenant_id))
        await self.copy(ClvPrediction.__tablename__, PREDICTION_COLUMNS, rows, schema="metrics")

    async def add_fit(self: ClvRepository[AsyncSession], fit: ClvFit) -> None:
        self.session.add(fit)
        await self.session.flush()

    async def latest_fit(self, tenant_id: str) -> ClvFit | None:
        stmt = select(ClvFit).where(ClvFit.tenant_id == tenant_id).order_by(ClvFit.fitted_at.desc()).limit(1)
        return (await self.session.execute(stmt)).scalar_one_or_none()

    async def tenants_due(self, fitted_before: datetime) -> Sequence[str]:
        """Tenants with orders whose latest fit (attempted or not, by `clv_fits`) is older than `fitted_before`."""
        latest = select(ClvFit.tenant_id, func.max(ClvFit.fitted_at).label("at")).group_by(ClvFit.tenant_id).subquery()
        stmt = (
            select(Order.tenant_id)
            .distinct()
            .outerjoin(latest, latest.c.tenant_id == Order.tenant_id)
            .where((latest.c.at.is_(None)) | (latest.c.at < fitted_before))
            .order_by(Order.tenant_id)
        )
        return (await self.session.execute(stmt)).scalars().all()


PREDICTION_COLUMNS = (
    "tenant_id",
    "customer_id",
    "fitted_at",
    "frequency",
    "recency",
    "t",
    "currency",
    "monetary_value",
    "expected_spend",
    "p_alive",
    "purchases_90d",
    "purchases_365d",
    "clv",
)
