"""The headline KPIs as Prometheus gauges, per tenant, with bounded label sets.

A periodic task (metrics/tasks.py) computes them and `KpiGauges.publish` sets them; a scrape only reads what
the last refresh set, never the database. Labels: `tenant` (at most `METRICS_KPI_GAUGES_MAX_TENANTS` values:
the pinned tenants, then the most recently active; the others are dropped and counted in
`loyalty_kpi_tenants{state="dropped"}`), and per gauge one small fixed set (`movement`, `state`, `segment`:
the six names of `metrics.segments.SEGMENTS`) or the tenant's one reporting `currency`. A tenant whose refresh
fails keeps its previous values (its `loyalty_kpi_refresh_timestamp_seconds` shows their age); a tenant no
longer exported loses its series.

The figures are the API's (metrics_service.kpis, .lifetime, segment_service.overview), so a gauge and the
REST answer agree: the current calendar month (UTC) as GET /v1/kpis?period=month has it (CRR, churn, active
and new customers, orders, net revenue, NPS, points by movement), the lifetime figures of GET
/v1/kpis/lifetime (repeat-purchase rate, liability) and the customers per segment of GET /v1/segments. Rates
are ratios (0.85 where the API says 85.00) as Prometheus has them; NPS is the score (-100..100).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal

from prometheus_client import Counter, Gauge

from metrics import schemas
from metrics.segments import SEGMENTS, Segment

TENANT = ("tenant",)
RETENTION = Gauge(
    "loyalty_kpi_retention_ratio",
    "Customer retention rate (E - N) / S of the current month (absent while S = 0)",
    TENANT,
)
CHURN = Gauge("loyalty_kpi_churn_ratio", "Churn rate 1 - retention of the current month", TENANT)
ACTIVE = Gauge("loyalty_kpi_active_customers", "Customers active on at least one day of the current month", TENANT)
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

Sample = tuple[Gauge, tuple[str, ...]]


@dataclass(frozen=True)
class Headline:
    """One tenant's KPIs as the API has them: the current month's (GET /v1/kpis?period=month), the lifetime
    ones (GET /v1/kpis/lifetime) and the customers per segment (GET /v1/segments)."""

    period: schemas.PeriodKpis
    lifetime: schemas.Lifetime
    segments: Mapping[Segment, int]


def _ratio(percent: Decimal | None) -> float | None:
    return None if percent is None else float(percent / 100)


def samples(tenant: str, h: Headline, now: float) -> dict[Sample, float]:
    """The gauge values of one tenant (a value that is undefined, such as CRR with S = 0, has no series)."""
    p, life = h.period, h.lifetime
    out: dict[Sample, float] = {
        (ACTIVE, (tenant,)): p.active_customers,
        (NEW, (tenant,)): p.new_customers,
        (ORDERS, (tenant,)): p.orders,
        (NPS_RESPONSES, (tenant,)): p.nps_responses,
        (REFRESHED, (tenant,)): now,
    }
    optional = {
        (RETENTION, (tenant,)): _ratio(p.crr),
        (CHURN, (tenant,)): _ratio(p.churn_rate),
        (REPEAT, (tenant,)): _ratio(life.repeat_purchase_rate),
        (NPS, (tenant,)): None if p.nps is None else float(p.nps),
    }
    out.update((k, v) for k, v in optional.items() if v is not None)
    moved = (p.points_issued, p.points_redeemed, p.points_expired, p.points_clawed_back)
    for movement, points in zip(MOVEMENTS, moved, strict=True):
        out[(POINTS, (tenant, movement))] = points
    held = (life.liability.available_points, life.liability.pending_points)
    for state, points in zip(LIABILITY_STATES, held, strict=True):
        out[(LIABILITY_POINTS, (tenant, state))] = points
    for segment in SEGMENTS:
        out[(CUSTOMERS, (tenant, segment))] = h.segments.get(segment, 0)
    if life.currency is not None:
        out[(NET_REVENUE, (tenant, life.currency))] = float(p.net_revenue)
        value = life.liability.available_value + life.liability.pending_value
        out[(LIABILITY_VALUE, (tenant, life.currency))] = float(value)
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
