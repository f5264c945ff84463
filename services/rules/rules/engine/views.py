"""What `event`, `customer` and `line` mean in a condition: plain maps (money as double) of the fields the
ruleset's conditions read (with `fields`), each with the value the full view gives it."""

from __future__ import annotations

import functools
from collections.abc import Collection
from datetime import datetime
from decimal import Decimal
from typing import Any, Final

from rules.engine.basics import category_of, event_time, sku_of
from rules.engine.state import CustomerSnapshot
from shared.events import CloudEvent, Payload, PurchaseCompleted, PurchaseLine

CUSTOMER_FIELDS: Final = (
    "id",
    "purchase_count",
    "first_purchase_at",
    "last_purchase_at",
    "days_since_last_purchase",
    "spend_12m",
    "points_12m",
    "categories",
    "tier",
    "segment",
)
LINE_FIELDS: Final = ("sku", "category", "quantity", "unit_price", "discount", "net", "gift_card", "shipping")
_ENVELOPE_FIELDS: Final = frozenset({"id", "type", "source", "time"})
_PURCHASE_DERIVED: Final = frozenset({"categories", "new_categories", "line_count", "skus"})


def customer_view(customer: CustomerSnapshot, at: datetime, fields: Collection[str] | None = None) -> dict[str, Any]:
    """What `customer` means in a condition; with `fields`, only those keys (what the conditions read)."""
    view: dict[str, Any] = {}
    for name in CUSTOMER_FIELDS if fields is None else fields:
        if name == "id":
            view[name] = customer.customer_id
        elif name == "purchase_count":
            view[name] = customer.purchase_count
        elif name == "first_purchase_at":
            view[name] = customer.first_purchase_at
        elif name == "last_purchase_at":
            view[name] = customer.last_purchase_at
        elif name == "days_since_last_purchase":
            last = customer.last_purchase_at
            view[name] = (at - last).days if last is not None else -1
        elif name == "spend_12m":
            view[name] = float(customer.spend_12m(at))
        elif name == "points_12m":
            view[name] = customer.points_12m(at)
        elif name == "categories":
            view[name] = tuple(sorted(customer.categories))
        elif name == "tier":
            view[name] = customer.tier or ""
        elif name == "segment":
            view[name] = customer.segment or ""
    return view


def line_view(line: PurchaseLine, net: Decimal, fields: Collection[str] = LINE_FIELDS) -> dict[str, Any]:
    view: dict[str, Any] = {}
    for name in fields:
        if name == "quantity":
            view[name] = float(line.quantity)
        elif name == "net":
            view[name] = float(net)
        elif name in ("unit_price", "discount"):
            view[name] = float(getattr(line, name))
        elif name in ("sku", "category", "gift_card", "shipping"):
            view[name] = getattr(line, name)
    return view


def event_view(
    event: CloudEvent[Any], customer: CustomerSnapshot, fields: Collection[str] | None = None
) -> dict[str, Any]:
    """What `event` means in a condition: the envelope, the payload (money as double) and derived fields.

    With `fields`, only those keys are built (what the ruleset's conditions read); each has the value
    the full view gives it.
    """
    data = event.data
    if fields is None:
        view: dict[str, Any] = {
            "id": event.id,
            "type": event.type,
            "source": event.source,
            "time": event_time(event),
        }
        for name, value in data:
            if name == "lines":
                continue
            view[name] = float(value) if isinstance(value, Decimal) else value
        if data.model_extra:
            for name, value in data.model_extra.items():
                view[name] = value
        if isinstance(data, PurchaseCompleted):
            _purchase_derived(data, customer, _PURCHASE_DERIVED, view)
        return view
    view = {}
    model: type[Payload] = type(data)
    if not getattr(data, "__pydantic_extra__", None) and isinstance(fields, frozenset):
        envelope, payload, derived_names = _view_plan(model, fields)
        for name in envelope:
            view[name] = event_time(event) if name == "time" else getattr(event, name)
        for name in payload:
            value = getattr(data, name)
            view[name] = float(value) if isinstance(value, Decimal) else value
        if derived_names:
            _purchase_derived(data, customer, derived_names, view)
        return view
    # The same precedence as the full view: derived over extra fields over payload over envelope.
    purchase = isinstance(data, PurchaseCompleted)
    extra = data.model_extra or {}
    model_fields = _model_fields(model)
    derived = []
    for name in fields:
        if purchase and name in _PURCHASE_DERIVED:
            derived.append(name)
        elif name in extra:
            view[name] = extra[name]
        elif name in model_fields and name != "lines":
            value = getattr(data, name)
            view[name] = float(value) if isinstance(value, Decimal) else value
        elif name in _ENVELOPE_FIELDS:
            view[name] = event_time(event) if name == "time" else getattr(event, name)
    if derived:
        _purchase_derived(data, customer, derived, view)
    return view


@functools.lru_cache(maxsize=1024)
def _view_plan(
    model: type[Payload], fields: frozenset[str]
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Which of `fields` come from the envelope, the payload and the derived purchase fields (a payload
    without extra fields), with the full view's precedence."""
    envelope, payload, derived = [], [], []
    purchase = issubclass(model, PurchaseCompleted)
    model_fields = _model_fields(model)
    for name in sorted(fields):
        if purchase and name in _PURCHASE_DERIVED:
            derived.append(name)
        elif name in model_fields and name != "lines":
            payload.append(name)
        elif name in _ENVELOPE_FIELDS:
            envelope.append(name)
    return tuple(envelope), tuple(payload), tuple(derived)


@functools.cache
def _model_fields(model: type[Payload]) -> frozenset[str]:
    return frozenset(model.model_fields)


def _purchase_derived(
    data: PurchaseCompleted, customer: CustomerSnapshot, names: Collection[str], out: dict[str, Any]
) -> None:
    """Writes the derived purchase fields among `names` into the view `out`."""
    if "categories" in names or "new_categories" in names:
        present = set(map(category_of, data.lines))
        if "categories" in names:
            out["categories"] = tuple(sorted(present))
        if "new_categories" in names:
            # The sorted categories not yet bought, filtered as a set before sorting (fewer to sort).
            out["new_categories"] = tuple(sorted(present.difference(customer.categories)))
    if "line_count" in names:
        out["line_count"] = len(data.lines)
    if "skus" in names:
        out["skus"] = tuple(sorted(set(map(sku_of, data.lines))))
