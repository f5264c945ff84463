"""What every part of the engine shares: command ids, periods and months, rounding and the text of numbers,
the time an event counts at, and the error that refuses an event."""

from __future__ import annotations

import functools
import hashlib
import math
import operator
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal
from typing import Any, Final

from rules.ruleset import Period
from shared.events import CloudEvent

# Module constants are Final: compiled code reads them from C statics (or inlines them), not from the
# module's dict on every use.
ROUNDING: Final = {"floor": ROUND_FLOOR, "half_up": ROUND_HALF_UP, "half_even": ROUND_HALF_EVEN, "ceil": ROUND_CEILING}
# The most entries any of the engine's caches (condition memos, line positions, awards) keeps.
MEMO_LIMIT: Final = 50_000
ONE: Final = Decimal(1)
ZERO: Final = Decimal(0)

# Attribute getters run in C, without the frame of a comprehension over an order's few lines.
category_of: Final = operator.attrgetter("category")
sku_of: Final = operator.attrgetter("sku")


class EventRefused(ValueError):
    """The event cannot be evaluated under this ruleset (unknown currency, undeclared type), or cannot be
    taken at all (a self-referral, a refund naming another customer than the order's): DLQ."""


def command_id(kind: str, *parts: object) -> str:
    """A deterministic id: the same inputs always name the same command, so a duplicate is recognised."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:32]
    return f"{kind}-{digest}"


def event_time(event: CloudEvent[Any]) -> datetime:
    ordered_at = getattr(event.data, "ordered_at", None)
    return ordered_at if isinstance(ordered_at, datetime) else event.time


def period_key(period: Period, at: datetime) -> str:
    return _period_key(period, at.astimezone(UTC).date())


@functools.lru_cache(maxsize=4096)
def _period_key(period: Period, at: date) -> str:
    if period == "day":
        return f"day:{at:%Y-%m-%d}"
    if period == "week":
        year, week, _ = at.isocalendar()
        return f"week:{year}-W{week:02d}"
    if period == "month":
        return f"month:{at:%Y-%m}"
    if period == "quarter":
        return f"quarter:{at.year}-Q{(at.month - 1) // 3 + 1}"
    return f"year:{at.year}"


def cap_key(period: Period, at: datetime) -> str:
    """The per-customer cap's counter key."""
    return _cap_key(period, at.astimezone(UTC).date())


@functools.lru_cache(maxsize=4096)
def _cap_key(period: Period, at: date) -> str:
    # Cached whole, so every event of a period shares one string (built and hashed once).
    return f"cap:{_period_key(period, at)}"


def month_key(at: datetime) -> str:
    utc = at.astimezone(UTC)
    if utc.year < 1000:  # strftime's %Y does not pad on every platform: keep its text
        return f"{utc:%Y-%m}"
    return _month_text(utc.year, utc.month)


@functools.lru_cache(maxsize=4096)
def _month_text(year: int, month: int) -> str:
    # Cached: a lookup on two ints costs less than formatting the month on every event.
    return f"{year}-{month:02d}"


def months_back(at: datetime, count: int) -> frozenset[str]:
    return months_back_from(at.year, at.month, count)


@functools.lru_cache(maxsize=512)
def months_back_from(year: int, month: int, count: int) -> frozenset[str]:
    out = set()
    for _ in range(count):
        out.add(f"{year:04d}-{month:02d}")
        month -= 1
        if month == 0:
            year, month = year - 1, 12
    return frozenset(out)


@functools.lru_cache(maxsize=64)
def days(count: int) -> timedelta:
    return timedelta(days=count)


def round_points(value: Decimal, rounding: str) -> int:
    """`value` rounded to whole points as the ruleset's rounding says."""
    # Below 10**20, math.floor equals quantize to units (which refuses results past 28 digits), and is faster.
    if rounding == "floor" and value.adjusted() < 20:
        return math.floor(value)
    return int(value.quantize(ONE, rounding=ROUNDING[rounding]))


def fmt(value: Decimal) -> str:
    """The normalized value in fixed-point notation, as format(value.normalize(), "f") writes it."""
    # Not cached: a cache miss (hashing a Decimal, evicting) costs several times the formatting itself.
    # str() writes the same text, faster, unless it chooses an exponent (a positive exponent, or a value
    # below 1E-6): then it contains an "E" and "f" formatting decides.
    normalized = value.normalize()
    text = str(normalized)
    return text if "E" not in text else format(normalized, "f")
