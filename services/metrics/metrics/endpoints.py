from datetime import date
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from metrics import schemas
from metrics.errors import ClvNotFitted, InvalidPeriod
from metrics.service import clv_service, metrics_service
from shared.auth import Principal, require
from shared.db import ReadSessionDep, SessionDep
from shared.errors import DocumentedRoute, raises

router = APIRouter(prefix="/v1", tags=["kpis"], route_class=DocumentedRoute)

MetricsRead = Annotated[Principal, Depends(require("metrics:read"))]
Admin = Annotated[Principal, Depends(require("admin"))]


@router.get("/kpis/daily-purchases", response_model=schemas.DailyPurchasesList)
@raises(InvalidPeriod)
async def daily_purchases(
    principal: MetricsRead,
    session: ReadSessionDep,
    start: Annotated[date, Query(alias="from")],
    end: Annotated[date, Query(alias="to")],
) -> schemas.DailyPurchasesList:
    """Orders and net revenue per day and currency for the caller's tenant."""
    rows = await metrics_service.daily(session, tenant_id=principal.tenant_id, start=start, end=end)
    items = [schemas.DailyPurchases.model_validate(r) for r in rows]
    return schemas.DailyPurchasesList(items=items, total_orders=sum(i.orders for i in items))


@router.get("/config", response_model=schemas.TenantConfig, tags=["config"])
async def get_config(principal: MetricsRead, session: ReadSessionDep) -> schemas.TenantConfig:
    """The tenant's metrics configuration (the defaults until a PUT)."""
    return await metrics_service.config(session, principal.tenant_id)


@router.put("/config", response_model=schemas.TenantConfig, tags=["config"])
async def put_config(principal: Admin, session: SessionDep, body: schemas.TenantConfigUpdate) -> schemas.TenantConfig:
    """Replaces the tenant's metrics configuration (scope `admin`). A new activity window recomputes the
    activity aggregates at once; new currencies or factors apply to events processed from then on (`loyalty
    metrics rebuild --tenant T` recomputes the history)."""
    return await metrics_service.put_config(session, principal.tenant_id, body)


@router.get("/clv", response_model=schemas.ClvFit, tags=["clv"])
@raises(ClvNotFitted)
async def clv_fit(principal: MetricsRead, session: ReadSessionDep) -> schemas.ClvFit:
    """The tenant's latest predictive CLV fit: its parameters, when it ran and on how many customers (the
    per-customer predictions are in `metrics.clv_predictions`)."""
    return await clv_service.latest(session, principal.tenant_id)
