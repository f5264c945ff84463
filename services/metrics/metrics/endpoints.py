import csv
import io
from collections.abc import AsyncIterator
from datetime import date
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import StreamingResponse

from metrics import schemas
from metrics.domain import Period
from metrics.errors import ClvNotFitted, CustomerNotFound, InvalidCursor, InvalidParameter, InvalidPeriod
from metrics.segments import Segment
from metrics.service import LIST_MAX, clv_service, metrics_service, segment_service
from shared.auth import Principal, require
from shared.db import ReadSessionDep, SessionDep
from shared.errors import DocumentedRoute, raises
from shared.events import EARLIEST, LATEST, MAX_IDENTIFIER, NO_NUL

router = APIRouter(prefix="/v1", tags=["kpis"], route_class=DocumentedRoute)

MetricsRead = Annotated[Principal, Depends(require("metrics:read"))]
Admin = Annotated[Principal, Depends(require("admin"))]
# A range of days [from, to), as the KPIs and the redemptions take it.
FromDay = Annotated[date, Query(alias="from", ge=EARLIEST.date(), lt=LATEST.date(), description="First day")]
ToDay = Annotated[
    date, Query(alias="to", ge=EARLIEST.date(), lt=LATEST.date(), description="First day after the range")
]


@router.get("/kpis", response_model=schemas.KpiList)
@raises(InvalidPeriod, InvalidParameter)
async def kpis(
    principal: MetricsRead,
    session: ReadSessionDep,
    start: FromDay,
    end: ToDay,
    period: Annotated[Period, Query(description="The length of each period")] = "month",
) -> schemas.KpiList:
    """The programme's KPIs per period: one object per whole period (day, week from Monday, month, quarter,
    year) holding a day of [from, to), at most 1,100 periods. Definitions (docs/metrics.md): a customer is
    active on day t with a purchase in the tenant's activity window (W days, default 365) up to t; S
    (`customers_start`) = active on the day before the period, E (`customers_end`) = active on its last day,
    N (`new_customers`) = first purchases in it; CRR = (E - N) / S x 100, churn = 100 - CRR (null when S =
    0). Net revenue = orders minus the refunds applied to them, in the tenant's reporting currency, by the
    time of the order. NPS over each customer's latest answer in the period."""
    return await metrics_service.kpis(session, principal.tenant_id, start=start, end=end, kind=period)


@router.get("/kpis/lifetime", response_model=schemas.Lifetime)
async def lifetime(
    principal: MetricsRead,
    session: ReadSessionDep,
    as_of: Annotated[
        date | None, Query(ge=EARLIEST.date(), lt=LATEST.date(), description="Up to and including; default today")
    ] = None,
) -> schemas.Lifetime:
    """Lifetime KPIs as of a day: repeat-purchase rate, the probability of an n-th purchase (n = 2..5) beside
    the retail benchmarks, the Pareto share of the top 20 % of customers and the concentration curve, the
    historical CLV distribution (net revenue to date), the points liability (times the point value) and the
    redemption and breakage rates over the trailing 12 months."""
    return await metrics_service.lifetime(session, principal.tenant_id, as_of)


@router.get("/kpis/cohorts", response_model=schemas.Cohorts)
@raises(InvalidPeriod, InvalidParameter)
async def cohorts(
    principal: MetricsRead,
    session: ReadSessionDep,
    period: Annotated[Period, Query(description="week, month, quarter or year")] = "month",
    start: Annotated[date | None, Query(alias="from", ge=EARLIEST.date(), lt=LATEST.date())] = None,
    end: Annotated[date | None, Query(alias="to", ge=EARLIEST.date(), lt=LATEST.date())] = None,
) -> schemas.Cohorts:
    """The retention matrix: per cohort (the customers whose first purchase falls in a period of [from,
    to)), its size and, for each period since, how many of them bought then and their share (at most 240
    cohorts)."""
    return await metrics_service.cohorts(session, principal.tenant_id, kind=period, start=start, end=end)


@router.get("/kpis/redemptions", response_model=schemas.RedemptionSummary)
@raises(InvalidPeriod, InvalidParameter)
async def redemptions(
    principal: MetricsRead,
    session: ReadSessionDep,
    start: FromDay,
    end: ToDay,
) -> schemas.RedemptionSummary:
    """Redemption orders per reward and kind over the days of [from, to) (at most 1,100), and the totals per
    kind: orders reserved, confirmed (by fulfilment or by the coupon of a reserved order), cancelled, expired,
    refunded in full, coupons consumed; points reserved, spent (confirmed) and returned by refunds; the money
    value of the confirmed orders per currency. Each change counts on the UTC day it occurred, from the ledger's
    `redemption.changed` events (docs/metrics.md)."""
    return await metrics_service.redemption_summary(session, principal.tenant_id, start=start, end=end)


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


@router.get("/clv", response_model=schemas.ClvFit, tags=["clv"])
@raises(ClvNotFitted)
async def clv_fit(principal: MetricsRead, session: ReadSessionDep) -> schemas.ClvFit:
    """The tenant's latest predictive CLV fit: its parameters, when it ran and on how many customers (the
    per-customer predictions are in `metrics.clv_predictions`)."""
    return await clv_service.latest(session, principal.tenant_id)
