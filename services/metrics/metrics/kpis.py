"""The KPI math, pure: from the per-day sums and per-period counts the repository reads, the numbers
docs/metrics.md defines. Percentages are Decimal with 2 decimals (half-even), money with 4, None where the
denominator is zero.

Per period [start, end), W the activity window:
- active on day t: a purchase in the W days up to and including t. active(t) = the running sum of the
  daily `active_delta` up to t.
- S = active(start - 1), E = active(end - 1), N = first purchases in the period; CRR = (E - N) / S x 100,
  churn = 100 - CRR (both None when S = 0).
- active customers: active on at least one day of the period.
- orders, net revenue (order amounts minus the refunds applied to them, in the orders' periods), average
  order value = net revenue / orders, buyers (customers with an order in the period), purchase frequency =
  orders / buyers.
- NPS over each customer's latest answer in the period: % promoters (9-10) - % detractors (0-6); CES the
  mean of the effort scores answered in the period.
- share of wallet: our net revenue from the estimated customers over the estimates' periods / their
  estimated spend, for the estimates whose period ends in this period.
- points issued, redeemed, expired, clawed back, active members (customers that earned or redeemed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import ROUND_HALF_EVEN, Decimal

from metrics.domain import Period, next_start, period_start

PERCENT = Decimal("0.01")
MONEY = Decimal("0.0001")
HUNDRED = Decimal(100)
# Retail benchmarks of the probability of an n-th purchase (n = 2, 3, 4; none published for 5).
BENCHMARKS: dict[str, Decimal | None] = {"2": Decimal(27), "3": Decimal(45), "4": Decimal(54), "5": None}
TOP_CUSTOMERS = 10


def percent(part: Decimal | int, whole: Decimal | int) -> Decimal | None:
    if not whole:
        return None
    return (Decimal(part) * HUNDRED / Decimal(whole)).quantize(PERCENT, ROUND_HALF_EVEN)


def money(value: Decimal) -> Decimal:
    return value.quantize(MONEY, ROUND_HALF_EVEN)


@dataclass
class Day:
    """One day's sums (metrics.daily), all zero for a day without a row."""

    orders: int = 0
    amount: Decimal = Decimal(0)
    refunded: Decimal = Decimal(0)
    buyers: int = 0
    new_customers: int = 0
    active_delta: int = 0
    points_issued: int = 0
    points_redeemed: int = 0
    points_expired: int = 0
    points_clawed_back: int = 0


@dataclass
class Survey:
    """A period's survey facts: latest answer per customer (responses, promoters, detractors) and efforts."""

    responses: int = 0
    promoters: int = 0
    detractors: int = 0
    effort_sum: int = 0
    effort_responses: int = 0


@dataclass
class Wallet:
    ours: Decimal = Decimal(0)
    estimated: Decimal = Decimal(0)
    estimates: int = 0


@dataclass
class PeriodInput:
    """What the KPIs of a run of periods are computed from."""

    kind: Period
    periods: list[tuple[date, date]]
    days: Mapping[date, Day]
    active_before: int  # the sum of active_delta over the days before the first day of `days`' range
    first_day: date  # the first day `days` covers (the day before the first period)
    buyers: Mapping[date, int] = field(default_factory=dict)  # by period start (kinds other than day)
    members: Mapping[date, int] = field(default_factory=dict)  # by period start
    active: Mapping[date, int] = field(default_factory=dict)  # by period start (kinds other than day)
    surveys: Mapping[date, Survey] = field(default_factory=dict)
    wallets: Mapping[date, Wallet] = field(default_factory=dict)


def period_list(kind: Period, start: date, end: date) -> list[tuple[date, date]]:
    """The whole periods of `kind` holding a day of [start, end)."""
    out: list[tuple[date, date]] = []
    current = period_start(kind, start)
    while current < end:
        following = next_start(kind, current)
        out.append((current, following))
        current = following
    return out


def period_kpis(data: PeriodInput) -> list[dict[str, object]]:
    empty = Day()
    # active(t) for every t from first_day on, as a running sum.
    active: dict[date, int] = {}
    running = data.active_before
    last = data.periods[-1][1] if data.periods else data.first_day
    day = data.first_day
    while day < last:
        running += data.days.get(day, empty).active_delta
        active[day] = running
        day += timedelta(days=1)
    out: list[dict[str, object]] = []
    for start, end in data.periods:
        span = [data.days.get(start + timedelta(days=i), empty) for i in range((end - start).days)]
        s, e = active[start - timedelta(days=1)], active[end - timedelta(days=1)]
        n = sum(d.new_customers for d in span)
        orders = sum(d.orders for d in span)
        net = sum((d.amount - d.refunded for d in span), Decimal(0))
        buyers = sum(d.buyers for d in span) if data.kind == "day" else data.buyers.get(start, 0)
        crr = percent(e - n, s)
        survey = data.surveys.get(start, Survey())
        wallet = data.wallets.get(start, Wallet())
        out.append(
            {
                "start": start,
                "end": end,
                "customers_start": s,
                "customers_end": e,
                "new_customers": n,
                "crr": crr,
                "churn_rate": None if crr is None else HUNDRED - crr,
                "active_customers": active[start] if data.kind == "day" else data.active.get(start, 0),
                "buyers": buyers,
                "orders": orders,
                "net_revenue": net,
                "refunds": sum((d.refunded for d in span), Decimal(0)),
                "average_order_value": money(net / orders) if orders else None,
                "purchase_frequency": (Decimal(orders) / buyers).quantize(PERCENT) if buyers else None,
                "nps": percent(survey.promoters - survey.detractors, survey.responses),
                "nps_responses": survey.responses,
                "promoters": survey.promoters,
                "detractors": survey.detractors,
                "ces": (Decimal(survey.effort_sum) / survey.effort_responses).quantize(PERCENT)
                if survey.effort_responses
                else None,
                "ces_responses": survey.effort_responses,
                "share_of_wallet": percent(wallet.ours, wallet.estimated) if wallet.estimates else None,
                "wallet_estimates": wallet.estimates,
                "points_issued": sum(d.points_issued for d in span),
                "points_redeemed": sum(d.points_redeemed for d in span),
                "points_expired": sum(d.points_expired for d in span),
                "points_clawed_back": sum(d.points_clawed_back for d in span),
                "active_members": data.members.get(start, 0),
            }
        )
    return out


QUANTILES = (Decimal("0.5"), Decimal("0.9"))


def cut_ranks(n: int) -> list[int]:
    """The ranks (1 = the highest net revenue) whose revenue prefix the lifetime KPIs need: floor(k/10 n)."""
    return [(n * step) // 10 for step in range(1, 11)]


def quantile_ranks(n: int) -> list[int]:
    """The ranks (1 = the highest) of the values the quantiles interpolate between: positions floor and ceil
    of (n - 1) q in ascending order."""
    out: list[int] = []
    for q in QUANTILES:
        position = (n - 1) * q
        low = int(position)
        out += [n - low, n - min(low + 1, n - 1)]
    return out


@dataclass
class Customers:
    """What the lifetime KPIs need of the customers with at least one order, ranked by net revenue (highest
    first): counts, the revenue of the top `cut_ranks(n)`, the values at `quantile_ranks(n)`, the top ones."""

    n: int = 0
    orders: int = 0
    total: Decimal = Decimal(0)
    at_least: dict[int, int] = field(default_factory=dict)  # k -> customers with >= k orders, k = 1..5
    prefix: dict[int, Decimal] = field(default_factory=dict)  # rank -> revenue of the top `rank`
    values: dict[int, Decimal] = field(default_factory=dict)  # rank -> that customer's revenue
    top: list[tuple[str, int, Decimal]] = field(default_factory=list)


def lifetime(c: Customers) -> dict[str, object]:
    n, total = c.n, c.total
    at_least = {k: c.at_least.get(k, 0) for k in range(1, 6)}
    p_nth = {str(k): percent(at_least[k], at_least[k - 1]) for k in range(2, 6)}
    curve = [
        {"customers_share": Decimal(10 * step), "revenue_share": percent(c.prefix.get(rank, Decimal(0)), total)}
        for step, rank in enumerate(cut_ranks(n), start=1)
    ]
    quantiles: list[Decimal | None] = []
    if n:
        ranks = quantile_ranks(n)
        for i, q in enumerate(QUANTILES):
            position = (n - 1) * q
            low, high = c.values[ranks[2 * i]], c.values[ranks[2 * i + 1]]
            quantiles.append(money(low + (high - low) * (position - int(position))))
    else:
        quantiles = [None, None]
    return {
        "customers": n,
        "orders": c.orders,
        "net_revenue": total,
        "repeat_purchase_rate": percent(at_least[2], at_least[1]),
        "p_nth_purchase": p_nth,
        "p_nth_purchase_benchmark": BENCHMARKS,
        "pareto_top20_share": percent(c.prefix.get(n // 5, Decimal(0)), total),
        "pareto_curve": curve,
        "clv": {
            "mean": money(total / n) if n else None,
            "median": quantiles[0],
            "p90": quantiles[1],
            "top": [{"customer_id": t[0], "orders": t[1], "net_revenue": t[2]} for t in c.top],
        },
    }


def cohort_matrix(
    kind: Period, starts: Sequence[date], cells: Mapping[tuple[date, date], int], until: date
) -> list[dict[str, object]]:
    """Per cohort (customers whose first purchase falls in the period starting at `starts[i]`): its size
    and, for each period from its own up to the one holding `until`, the customers who bought then and
    their share of the cohort."""
    out: list[dict[str, object]] = []
    last = period_start(kind, until)
    for cohort in starts:
        size = cells.get((cohort, cohort), 0)
        active: list[int] = []
        current = cohort
        while current <= last:
            active.append(cells.get((cohort, current), 0))
            current = next_start(kind, current)
        out.append(
            {
                "cohort": cohort,
                "customers": size,
                "active": active,
                "retention": [percent(a, size) for a in active],
            }
        )
    return out
