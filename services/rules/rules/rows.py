"""Customer states to and from their table's columns. Compiled by mypyc (`make native`), like the engine:
a batch writes thousands of states, each with a dozen array elements to format, and reads as many back."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

from rules.engine import CustomerSnapshot

STATE_COLUMNS: Final = (
    "tenant_id",
    "customer_id",
    "purchase_count",
    "first_purchase_at",
    "last_purchase_at",
    "spend_months",
    "spend_amounts",
    "points_months",
    "points_earned",
    "categories",
    "tier",
    "tier_reviewed_at",
    "counter_keys",
    "counter_values",
    "version",
)

_PLAIN: Final = re.compile(r"[A-Za-z0-9_.:+-]+(?:,[A-Za-z0-9_.:+-]+)*")


def array_literal(values: list[str]) -> str:
    """A PostgreSQL array literal of any texts (categories, counter keys). Plain words need no quoting (the
    common case, and the fast one); anything else, or a word PostgreSQL reads as NULL, has every element
    quoted."""
    joined = ",".join(values)
    if not values or (_PLAIN.fullmatch(joined) is not None and "null" not in joined.lower()):
        return "{" + joined + "}"
    quoted = ['"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values]
    return "{" + ",".join(quoted) + "}"


def _numbers(values: list[str]) -> str:
    # Months ("2026-11") and numbers never need quoting in an array literal: joined as they are.
    return "{" + ",".join(values) + "}"


def _sorted_items(values: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """A map's keys in order and its values as text, for two parallel array columns."""
    keys = sorted(values)
    return keys, [str(values[k]) for k in keys]


def _zipped(keys: list[Any], values: list[Any]) -> dict[str, Any]:
    """A map from two parallel array columns."""
    out: dict[str, Any] = {}
    for key, value in zip(keys, values, strict=True):
        out[key] = value
    return out


def state_columns(states: Iterable[tuple[str, CustomerSnapshot]]) -> list[list[Any]]:
    """The states as one list per column of STATE_COLUMNS (for `unnest`); the array columns of each state as
    array literals, since unnest cannot take arrays of arrays. The version column is the one each state
    is written at: one above the version it was read at."""
    tenants: list[Any] = []
    customers: list[Any] = []
    counts: list[Any] = []
    firsts: list[Any] = []
    lasts: list[Any] = []
    spend_months: list[Any] = []
    spend_amounts: list[Any] = []
    points_months: list[Any] = []
    points_earned: list[Any] = []
    categories: list[Any] = []
    tiers: list[Any] = []
    reviewed: list[Any] = []
    counter_keys: list[Any] = []
    counter_values: list[Any] = []
    versions: list[Any] = []
    for tenant, s in states:
        tenants.append(tenant)
        customers.append(s.customer_id)
        counts.append(s.purchase_count)
        firsts.append(s.first_purchase_at)
        lasts.append(s.last_purchase_at)
        months, amounts = _sorted_items(s.spend_by_month)
        spend_months.append(_numbers(months))
        spend_amounts.append(_numbers(amounts))
        months, earned = _sorted_items(s.points_by_month)
        points_months.append(_numbers(months))
        points_earned.append(_numbers(earned))
        categories.append(array_literal(sorted(s.categories)))
        tiers.append(s.tier)
        reviewed.append(s.tier_reviewed_at)
        keys, counts_by_key = _sorted_items(s.counters)
        counter_keys.append(array_literal(keys))
        counter_values.append(_numbers(counts_by_key))
        versions.append(s.version + 1)
    return [
        tenants,
        customers,
        counts,
        firsts,
        lasts,
        spend_months,
        spend_amounts,
        points_months,
        points_earned,
        categories,
        tiers,
        reviewed,
        counter_keys,
        counter_values,
        versions,
    ]


def snapshot(row: Mapping[str, Any]) -> CustomerSnapshot:
    """A state as read from its row (an asyncpg record)."""
    return CustomerSnapshot(
        row["customer_id"],
        row["purchase_count"],
        row["first_purchase_at"],
        row["last_purchase_at"],
        _zipped(row["spend_months"], row["spend_amounts"]),
        _zipped(row["points_months"], row["points_earned"]),
        set(row["categories"]),
        row["tier"],
        row["tier_reviewed_at"],
        _zipped(row["counter_keys"], row["counter_values"]),
        row["version"],
        row["segment"],
    )
