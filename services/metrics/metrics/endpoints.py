import csv
import io
from collections.abc import AsyncIterator
from datetime import date
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import StreamingResponse

from metrics import schemas
from metrics.errors import CustomerNotFound, InvalidCursor, InvalidPeriod
from metrics.segments import Segment
from metrics.service import LIST_MAX, metrics_service, segment_service
from shared.auth import Principal, require
from shared.db import ReadSessionDep, SessionDep
from shared.errors import DocumentedRoute, raises
from shared.events import MAX_IDENTIFIER, NO_NUL

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


# --- value segments (docs/segments.md) -----------------------------------------------------------------

SortQuery = Annotated[
    schemas.CustomerSort,
    Query(description="clv and revenue: highest first; p_alive: lowest first; last_purchase: latest first"),
]
SegmentQuery = Annotated[Segment | None, Query(description="Only customers in this segment")]
CSV_PAGE = 1000
CSV_FIELDS = list(schemas.CustomerListItem.model_fields)
# A spreadsheet runs a cell starting with one of these as a formula (CSV injection): such cells get a quote.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


@router.get("/segments", response_model=schemas.SegmentOverview, tags=["segments"])
async def segments(principal: MetricsRead, session: ReadSessionDep) -> schemas.SegmentOverview:
    """Customers per value segment and the rules and thresholds that assign them."""
    return await segment_service.overview(session, principal.tenant_id)


@router.get("/customers", response_model=schemas.CustomerList, tags=["segments"])
@raises(InvalidCursor)
async def customers(
    principal: MetricsRead,
    session: ReadSessionDep,
    sort: SortQuery = "clv",
    segment: SegmentQuery = None,
    cursor: Annotated[str | None, Query(max_length=2000, description="`next_cursor` of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=LIST_MAX)] = 50,
) -> schemas.CustomerList:
    """The customers an account manager calls from: a page in the chosen order, ties by customer id;
    customers without a CLV prediction come last in the `clv` and `p_alive` orders."""
    return await segment_service.customers(
        session, principal.tenant_id, sort=sort, segment=segment, cursor=cursor, limit=limit
    )


@router.get("/customers.csv", tags=["segments"], response_class=StreamingResponse)
async def customers_csv(
    principal: MetricsRead, request: Request, sort: SortQuery = "clv", segment: SegmentQuery = None
) -> StreamingResponse:
    """The same list as CSV for a CRM import: every page, streamed; a cell that would start a formula gets a
    leading quote."""
    sessionmaker = request.state.sessionmaker
    tenant_id = principal.tenant_id

    async def rows() -> AsyncIterator[str]:
        buffer = io.StringIO()
        writer = csv.writer(buffer, quoting=csv.QUOTE_ALL)
        writer.writerow(CSV_FIELDS)
        cursor = None
        while True:
            async with sessionmaker() as session:
                page = await segment_service.customers(
                    session, tenant_id, sort=sort, segment=segment, cursor=cursor, limit=CSV_PAGE
                )
            for item in page.items:
                writer.writerow([csv_cell(v) for v in item.model_dump(mode="json").values()])
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    return StreamingResponse(
        rows(), media_type="text/csv", headers={"Content-Disposition": 'attachment; filename="customers.csv"'}
    )


@router.get("/customers/{customer_id}/metrics", response_model=schemas.CustomerMetrics, tags=["segments"])
@raises(CustomerNotFound)
async def customer_metrics(
    principal: MetricsRead,
    session: ReadSessionDep,
    customer_id: Annotated[str, Path(min_length=1, max_length=MAX_IDENTIFIER, pattern=NO_NUL)],
) -> schemas.CustomerMetrics:
    """One customer's summary, current segment and latest CLV prediction."""
    return await segment_service.customer_metrics(session, principal.tenant_id, customer_id)
