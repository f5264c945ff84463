"""The pure core of the aggregates: no I/O, tested without a database.

A customer's purchase days decide everything the KPIs count about them (`footprint`): the days they are
active (a purchase in the W days up to and including the day, W the tenant's activity window), which
makes activity spells [first day of a spell, last purchase of the spell + W - 1], and the periods they are
active in at least one day of; the day of their first purchase; the days and periods they bought in, by
cohort (the period of their first purchase). The
service keeps per tenant and day the sums of every customer's footprint; when a customer's days change,
it adds the difference of their footprint after and before (`difference`). So the stored sums always
equal a recomputation from the customers' days, whatever order the purchases arrive in.

Money: an amount in another currency than the tenant's reporting currency is converted with the
tenant's factor for it (`convert`); a currency without a factor is refused (the event goes to the DLQ with
the reason, and is replayed from there once the factor is configured). A refund reduces its order's net
revenue, in the order's period, never below zero: an order's net is amount - min(refunded, amount).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Literal, TypeVar

from shared.events import LedgerEntryPosted, PurchaseCompleted, PurchaseRefunded

Period = Literal["day", "week", "month", "quarter", "year"]
PERIODS: tuple[Period, ...] = ("day", "week", "month", "quarter", "year")
# The period kinds kept as cohort cells (a day's buyers are kept per day).
CELL_PERIODS: tuple[Period, ...] = ("week", "month", "quarter", "year")

# Footprint keys: ("active", day), ("new", day), ("buyers", day) for the day's sums; ("period", kind, start)
# for the change in the periods a customer is active in; ("cell", kind, cohort, start) for the cohorts.
Key = tuple[str, date] | tuple[str, str, date] | tuple[str, str, date, date]
K = TypeVar("K")
N = TypeVar("N", int, Decimal)


def period_start(kind: Period, day: date) -> date:
    """The first day of the period of `kind` holding `day` (weeks start on Monday, ISO 8601)."""
    if kind == "day":
        return day
    if kind == "week":
        return day - timedelta(days=day.weekday())
    if kind == "month":
        return day.replace(day=1)
    if kind == "quarter":
        return date(day.year, 3 * ((day.month - 1) // 3) + 1, 1)
    return date(day.year, 1, 1)


def next_start(kind: Period, start: date) -> date:
    """The first day of the period after the one starting on `start`."""
    if kind == "day":
        return start + timedelta(days=1)
    if kind == "week":
        return start + timedelta(days=7)
    months = {"month": 1, "quarter": 3, "year": 12}[kind]
    index = start.year * 12 + start.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


def footprint(days: Sequence[date], window: int) -> dict[Key, int]:
    """What one customer adds to the tenant's sums, from their sorted distinct purchase days."""
    out: dict[Key, int] = {}
    if not days:
        return out
    first = days[0]
    out[("new", first)] = 1
    cohorts = {kind: period_start(kind, first) for kind in CELL_PERIODS}
    spells: list[tuple[date, date]] = []
    spell_start = first
    for i, day in enumerate(days):
        out[("buyers", day)] = 1
        for kind in CELL_PERIODS:
            out[("cell", kind, cohorts[kind], period_start(kind, day))] = 1
        # A spell ends W days after the last purchase before a gap of more than W days (a purchase exactly W
        # days after the previous one continues its spell: the coverage is adjacent).
        following = days[i + 1] if i + 1 < len(days) else None
        if following is None or (following - day).days > window:
            spells.append((spell_start, day + timedelta(days=window)))
            if following is not None:
                spell_start = following
    for start, end in spells:
        _bump(out, ("active", start), 1)
        _bump(out, ("active", end), -1)
    # The periods of each kind the customer is active in, as a run of changes: +1 at the first period of a
    # run of consecutive periods, -1 at the period after it (the count of a period is the running sum).
    for kind in CELL_PERIODS:
        runs: list[list[date]] = []
        for start, end in spells:
            low, high = period_start(kind, start), period_start(kind, end - timedelta(days=1))
            if runs and low <= next_start(kind, runs[-1][1]):
                runs[-1][1] = max(runs[-1][1], high)
            else:
                runs.append([low, high])
        for low, high in runs:
            _bump(out, ("period", kind, low), 1)
            _bump(out, ("period", kind, next_start(kind, high)), -1)
    return {k: v for k, v in out.items() if v}


def _bump(out: dict[Key, int], key: Key, value: int) -> None:
    out[key] = out.get(key, 0) + value


def periods_of(days: Iterable[date]) -> dict[tuple[Period, date], int]:
    """The periods of every kind (day to year) holding one of `days`: a customer counts once in each."""
    return {(kind, period_start(kind, day)): 1 for day in days for kind in PERIODS}


def difference(after: Mapping[K, N], before: Mapping[K, N]) -> dict[K, N]:
    """after - before, without the keys that did not change."""
    out = {k: v - before.get(k, 0) for k, v in after.items()}
    for k, v in before.items():
        if k not in after:
            out[k] = -v
    return {k: v for k, v in out.items() if v}


class UnknownCurrency(ValueError):
    def __init__(self, currency: str, reporting: str) -> None:
        super().__init__(
            f"currency {currency} has no conversion factor to the reporting currency {reporting}: "
            "add it to conversion_factors (PUT /v1/config), then replay this event from the DLQ"
        )


def convert(amount: Decimal, currency: str, reporting: str, factors: Mapping[str, str]) -> Decimal:
    """`amount` in the reporting currency; raises UnknownCurrency when there is no factor."""
    if currency == reporting:
        return amount
    factor = factors.get(currency)
    if factor is None:
        raise UnknownCurrency(currency, reporting)
    return amount * Decimal(factor)


def discount_share(purchase: PurchaseCompleted) -> Decimal | None:
    """Discounted value / gross line value (quantity x unit price), 0..1; None without lines or value."""
    gross = sum((line.quantity * line.unit_price for line in purchase.lines), Decimal(0))
    if not gross:
        return None
    return min(sum((line.discount for line in purchase.lines), Decimal(0)) / gross, Decimal(1))


def refund_amount(refund: PurchaseRefunded) -> Decimal:
    """The refunded net amount: `amount`, else the sum of the refunded lines."""
    if refund.amount is not None:
        return refund.amount
    return sum((line.amount for line in refund.lines), Decimal(0))


def applied(amount: Decimal, refunded: Decimal) -> Decimal:
    """What refunds take off an order's net revenue: never more than the order's amount."""
    return min(refunded, amount)


@dataclass(frozen=True)
class PointsFact:
    """What one ledger entry adds to a tenant's day: customer postings move the programme's counters and
    the customer's balances; a clawback counts on its issuance posting (the whole amount taken back, also
    the part the customer had spent, which goes to a receivable or a negative balance)."""

    day: date
    customer_id: str | None
    issued: int = 0
    redeemed: int = 0
    expired: int = 0
    clawed_back: int = 0
    available: int = 0
    pending: int = 0
    held: int = 0
    member: bool = False


ISSUANCE_PREFIX = "system:issuance"
REDEEMING_KINDS = frozenset({"redeem", "capture"})


def points_fact(entry: LedgerEntryPosted) -> PointsFact | None:
    """The entry's contribution, or None when it changes no KPI (other system postings)."""
    day = entry.created_at.date()
    customer = entry.customer_id
    if customer is None:
        if entry.kind == "clawback" and entry.account_id.startswith(ISSUANCE_PREFIX) and entry.points > 0:
            return PointsFact(day, None, clawed_back=entry.points)
        return None
    kind, points = entry.kind, entry.points
    buckets = {"available": 0, "pending": 0, "held": 0}
    buckets[entry.bucket or "available"] = points
    issued = points if kind == "earn" and points > 0 else 0
    redeemed = -points if kind in REDEEMING_KINDS and points < 0 else 0
    expired = -points if kind == "expire" and points < 0 else 0
    return PointsFact(
        day,
        customer,
        issued=issued,
        redeemed=redeemed,
        expired=expired,
        available=buckets["available"],
        pending=buckets["pending"],
        held=buckets["held"],
        member=bool(issued or redeemed),
    )


def merge_days(days: Iterable[date], new: Iterable[date]) -> list[date]:
    return sorted(set(days) | set(new))


# A survey answer with an NPS: (time, event id, nps); the later (time, then event id) is the latest.
Answer = tuple[datetime, str, int]
# Counts of a period's survey facts: responses, promoters, detractors, effort sum, efforts.
SURVEY_COUNTS = 5


def nps_counts(nps: int, sign: int) -> list[int]:
    return [sign, sign if nps >= 9 else 0, sign if nps <= 6 else 0, 0, 0]


def latest_answers(
    stored: Mapping[K, Answer], answers: Iterable[tuple[K, Answer]]
) -> tuple[dict[K, Answer], dict[K, list[int]]]:
    """Folds answers into each key's latest (key: a customer in a period): the rows that change and, per
    key, the change of the period's counts (the old latest answer out, the new one in)."""
    latest: dict[K, Answer] = {}
    for key, answer in answers:
        current = latest.get(key, stored.get(key))
        if current is None or answer[:2] > current[:2]:
            latest[key] = answer
    changes: dict[K, list[int]] = {}
    for key, answer in latest.items():
        old = stored.get(key)
        delta = nps_counts(answer[2], 1)
        if old is not None:
            delta = [a + b for a, b in zip(delta, nps_counts(old[2], -1), strict=True)]
        changes[key] = delta
    return latest, changes
