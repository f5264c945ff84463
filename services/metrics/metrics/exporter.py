"""The headline KPIs as Prometheus gauges, per tenant, with bounded label sets.

A periodic task (metrics/tasks.py) computes them and `KpiGauges.publish` sets them; a scrape only reads what
the last refresh set, never the database. Labels: `tenant` (at most `METRICS_KPI_GAUGES_MAX_TENANTS` values:
the pinned tenants, then the most recently active; the others are dropped and counted in
`loyalty_kpi_tenants{state="dropped"}`), and per gauge one small fixed set (`movement`, `state`, `segment`:
the six names of `shared.events.SegmentName`) or the tenant's one reporting `currency`. A tenant whose refresh
fails keeps its previous values (its `loyalty_kpi_refresh_timestamp_seconds` shows their age); a tenant no
longer exported loses its series.

The period is the current calendar month (UTC) to date: S = customers active on the day before it starts,
E = customers active today, N = customers whose first purchase falls in it. Rates are ratios (0.85, not 85 %)
as Prometheus has them; NPS is the score (-100..100).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from typing import get_args

from prometheus_client import Counter, Gauge

from shared.events import SegmentName

TENANT = ("tenant",)
RETENTION = Gauge(
    "loyalty_kpi_retention_ratio",
    "Customer retention rate (E - N) / S of the current month to date (absent while S = 0)",
    TENANT,
)
CHURN = Gauge("loyalty_kpi_churn_ratio", "Churn rate 1 - retention of the current month to date", TENANT)
ACTIVE = Gauge("loyalty_kpi_active_customers", "Customers with a purchase within the activity window today", TENANT)
NEW = Gauge("loyalty_kpi_new_customers", "Customers whose first purchase falls in the current month", TENANT)
ORDERS = Gauge("loyalty_kpi_orders", "Orders of the current month to date", TENANT)
NET_REVENUE = Gauge(
    "loyalty_kpi_net_revenue",
    "Net revenue (purchases minus refunds) of the current month to date, in the reporting currency",
    ("tenant", "currency"),
)
REPEAT = Gauge(
    "loyalty_kpi_repeat_purchase_ratio", "Customers with 2 or more orders / customers with 1 or more", TENANT
)
NPS = Gauge("loyalty_kpi_nps", "Net promoter score of the current month (latest answer per customer)", TENANT)
NPS_RESPONSES = Gauge("loyalty_kpi_nps_responses", "Customers who gave an NPS answer in the current month", TENANT)
POINTS = Gauge(
    "loyalty_kpi_points",
    "Points of the current month to date by movement (issued, redeemed, expired, clawed_back)",
    ("tenant", "movement"),
)
LIABILITY_POINTS = Gauge(
    "loyalty_kpi_liability_points", "Outstanding points of the customers (available, pending)", ("tenant", "state")
)
LIABILITY_VALUE = Gauge(
    "loyalty_kpi_liability_value",
    "Outstanding points (available and pending) times the tenant's point value, in the reporting currency",
    ("tenant", "currency"),
)
CUSTOMERS = Gauge(
    "loyalty_kpi_customers",
    "Customers per value segment (every segment, 0 when empty; as last classified)",
    ("tenant", "segment"),
)
REFRESHED = Gauge(
    "loyalty_kpi_refresh_timestamp_seconds", "When the tenant's KPI gauges were last refreshed (Unix time)", TENANT
)
TENANTS = Gauge(
    "loyalty_kpi_tenants", "Tenants with business at the last refresh (exported, dropped over the cap)", ("state",)
)
FAILURES = Counter("loyalty_kpi_refresh_failures_total", "Tenant KPI refreshes that failed (the others go on)")

MOVEMENTS = ("issued", "redeemed", "expired", "clawed_back")
LIABILITY_STATES = ("available", "pending")
SEGMENTS: tuple[str, ...] = get_args(SegmentName)

Sample = tuple[Gauge, tuple[str, ...]]


@dataclass(frozen=True)
class Headline:
    """One tenant's raw figures (the period to date, liability from the beginning)."""

    customers_start: int
    active_customers: int
    new_customers: int
    orders: int
    net_revenue: Decimal
    points_issued: int
    points_redeemed: int
    points_expired: int
    points_clawed_back: int
    points_available: int
    points_pending: int
    buyers: int
    repeat_buyers: int
    currency: str | None
    point_value: Decimal | None
    responses: int
    promoters: int
    detractors: int
    segments: Mapping[str, int] = field(default_factory=dict)


DEFAULT_POINT_VALUE = Decimal("0.01")  # schemas.TenantConfig's default, for a tenant without a configuration


def month_start(day: date) -> date:
    return day.replace(day=1)


def next_month_start(day: date) -> date:
    return date(day.year + 1, 1, 1) if day.month == 12 else date(day.year, day.month + 1, 1)


def retention(customers_start: int, customers_end: int, new_customers: int) -> Decimal | None:
    """CRR as a ratio, (E - N) / S; None when S = 0."""
    if customers_start == 0:
        return None
    return Decimal(customers_end - new_customers) / Decimal(customers_start)


def samples(tenant: str, h: Headline, now: float) -> dict[Sample, float]:
    """The gauge values of one tenant (a value that is undefined, such as CRR with S = 0, has no series)."""
    out: dict[Sample, float] = {
        (ACTIVE, (tenant,)): h.active_customers,
        (NEW, (tenant,)): h.new_customers,
        (ORDERS, (tenant,)): h.orders,
        (NPS_RESPONSES, (tenant,)): h.responses,
        (REFRESHED, (tenant,)): now,
    }
    crr = retention(h.customers_start, h.active_customers, h.new_customers)
    if crr is not None:
        out[(RETENTION, (tenant,))] = float(crr)
        out[(CHURN, (tenant,))] = float(1 - crr)
    if h.buyers:
        out[(REPEAT, (tenant,))] = h.repeat_buyers / h.buyers
    if h.responses:
        out[(NPS, (tenant,))] = 100 * (h.promoters - h.detractors) / h.responses
    moved = (h.points_issued, h.points_redeemed, h.points_expired, h.points_clawed_back)
    for movement, points in zip(MOVEMENTS, moved, strict=True):
        out[(POINTS, (tenant, movement))] = points
    for state, points in zip(LIABILITY_STATES, (h.points_available, h.points_pending), strict=True):
        out[(LIABILITY_POINTS, (tenant, state))] = points
    for segment in SEGMENTS:
        out[(CUSTOMERS, (tenant, segment))] = h.segments.get(segment, 0)
    if h.currency is not None:
        out[(NET_REVENUE, (tenant, h.currency))] = float(h.net_revenue)
        value = (h.points_available + h.points_pending) * (h.point_value or DEFAULT_POINT_VALUE)
        out[(LIABILITY_VALUE, (tenant, h.currency))] = float(value)
    return out


class KpiGauges:
    """Sets the gauges of one refresh and removes the series of tenants (or labels) it no longer has."""

    def __init__(self) -> None:
        self._current: dict[Sample, float] = {}

    def publish(
        self,
        fresh: Mapping[str, Headline],
        *,
        kept: Iterable[str],
        dropped: int,
        now: float,
    ) -> dict[Sample, float]:
        """`fresh`: the tenants refreshed now; `kept`: tenants whose refresh failed (their values stay)."""
        keep = set(kept)
        values = {k: v for k, v in self._current.items() if k[1][0] in keep and k[0] is not TENANTS}
        for tenant, headline in fresh.items():
            values.update(samples(tenant, headline, now))
        values[(TENANTS, ("exported",))] = len(fresh) + len(keep)
        values[(TENANTS, ("dropped",))] = dropped
        for gauge, labels in self._current.keys() - values.keys():
            gauge.remove(*labels)
        for (gauge, labels), value in values.items():
            gauge.labels(*labels).set(value)
        self._current = values
        return values
