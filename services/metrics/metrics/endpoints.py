from datetime import date
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from metrics import schemas
from metrics.errors import InvalidPeriod
from metrics.service import metrics_service
from shared.auth import Principal, require
from shared.db import ReadSessionDep
from shared.errors import DocumentedRoute, raises

router = APIRouter(prefix="/v1", tags=["kpis"], route_class=DocumentedRoute)

MetricsRead = Annotated[Principal, Depends(require("metrics:read"))]


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
