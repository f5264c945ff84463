"""Pure rule evaluation: (event, ruleset version, customer state) -> awards with their arithmetic.

No I/O here. The consumer and `POST /v1/simulate` call the same `evaluate`, so a simulation equals
the award the pipeline produces for the same event and state. Evaluation is deterministic: the
inputs above fully decide the result (event time, never the wall clock).

Speed: CEL programs are compiled once per ruleset version. A condition is a pure function of the
fields it reads, so each condition memoizes its result on those fields' values, and on a miss it is
executed with a map holding only those fields (converting a whole event map costs ~15 µs; a few
scalars ~1 µs).
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal
from typing import Any

import cel

from rules.ruleset import PURCHASE, Period, Rule, RulesetDocument, Tiers
from shared.events import (
    CUSTOM_TYPE_PREFIX,
    CloudEvent,
    PurchaseCompleted,
    PurchaseLine,
    PurchaseRefunded,
    ReferralConverted,
    RuleAward,
)

ROUNDING = {"floor": ROUND_FLOOR, "half_up": ROUND_HALF_UP, "half_even": ROUND_HALF_EVEN, "ceil": ROUND_CEILING}
MEMO_LIMIT = 50_000
_MISSING = object()


def command_id(kind: str, *parts: object) -> str:
    """A deterministic id: the same inputs always name the same command, so a duplicate is recognised."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:32]
    return f"{kind}-{digest}"


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


def month_key(at: datetime) -> str:
    return f"{at.astimezone(UTC):%Y-%m}"


def _months_back(at: datetime, count: int) -> frozenset[str]:
    return _months_back_from(at.year, at.month, count)


@functools.lru_cache(maxsize=512)
def _months_back_from(year: int, month: int, count: int) -> frozenset[str]:
    out = set()
    for _ in range(count):
        out.add(f"{year:04d}-{month:02d}")
        month -= 1
        if month == 0:
            year, month = year - 1, 12
    return frozenset(out)


def event_time(event: CloudEvent[Any]) -> datetime:
    ordered_at = getattr(event.data, "ordered_at", None)
    return ordered_at if isinstance(ordered_at, datetime) else event.time


# --- customer state --------------------------------------------------------------------------------


@dataclass
class CustomerSnapshot:
    """The state the rules keep per customer; evaluation reads it, `apply_*` change it."""

    customer_id: str
    purchase_count: int = 0
    first_purchase_at: datetime | None = None
    last_purchase_at: datetime | None = None
    spend_by_month: dict[str, Decimal] = field(default_factory=dict)
    points_by_month: dict[str, int] = field(default_factory=dict)
    categories: set[str] = field(default_factory=set)
    tier: str | None = None
    tier_reviewed_at: datetime | None = None
    counters: dict[str, int] = field(default_factory=dict)

    def spend_12m(self, at: datetime) -> Decimal:
        months = _months_back(at, 12)
        return sum((v for k, v in self.spend_by_month.items() if k in months), Decimal(0))

    def points_12m(self, at: datetime) -> int:
        months = _months_back(at, 12)
        return sum(v for k, v in self.points_by_month.items() if k in months)

    def view(self, at: datetime) -> dict[str, Any]:
        last = self.last_purchase_at
        return {
            "id": self.customer_id,
            "purchase_count": self.purchase_count,
            "first_purchase_at": self.first_purchase_at,
            "last_purchase_at": last,
            "days_since_last_purchase": (at - last).days if last is not None else -1,
            "spend_12m": float(self.spend_12m(at)),
            "points_12m": self.points_12m(at),
            "categories": tuple(sorted(self.categories)),
            "tier": self.tier or "",
        }


# --- conditions ------------------------------------------------------------------------------------


class Condition:
    """A compiled CEL condition, memoized on the fields it reads."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.program = cel.compile(source)
        self.variables: tuple[str, ...] = tuple(sorted(self.program.variables()))
        self.fields: dict[str, tuple[str, ...] | None] = {v: _fields_read(source, v) for v in self.variables}
        self._plan = tuple((v, self.fields[v]) for v in self.variables)
        self._memo: dict[tuple[Any, ...], bool | str] = {}

    def __call__(self, scope: Mapping[str, Mapping[str, Any]], *, memo: bool = True) -> bool | str:
        """True/False, or the reason the condition could not be evaluated (which counts as not met).

        Memoize only where every field has one type (built-in events): the memo key compares values, and
        1, 1.0 and True are equal keys while CEL treats them differently.
        """
        if not memo:
            return self._execute(scope)
        parts: list[Any] = []
        for var, fields in self._plan:
            value = scope.get(var, _MISSING)
            if fields is None or not isinstance(value, dict):
                parts.append(tuple(sorted(value.items())) if isinstance(value, dict) else value)
            else:
                get = value.get
                parts.append(tuple([get(f, _MISSING) for f in fields]))
        key = tuple(parts)
        try:
            hit = self._memo.get(key)
        except TypeError:  # an unhashable value (a list or map in the data): evaluate without the memo
            return self._execute(scope)
        if hit is not None:
            return hit
        result = self._execute(scope)
        if len(self._memo) >= MEMO_LIMIT:
            self._memo.clear()
        self._memo[key] = result
        return result

    def _execute(self, scope: Mapping[str, Mapping[str, Any]]) -> bool | str:
        args: dict[str, Any] = {}
        for var in self.variables:
            if var not in scope:
                continue  # a comprehension variable; CEL binds it
            value = scope[var]
            fields = self.fields[var]
            args[var] = value if fields is None else {f: value[f] for f in fields if f in value}
        try:
            result = self.program.execute(args)
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            return f"condition {self.source!r} failed: {type(exc).__name__}: {exc}"
        if not isinstance(result, bool):
            return f"condition {self.source!r} returned {result!r}, not a bool"
        return result


def _fields_read(source: str, var: str) -> tuple[str, ...] | None:
    """The fields of `var` the expression selects (`var.field`), or None when it uses `var` otherwise.

    A conservative superset: a name inside a string literal only adds a field, and any use that is not
    a plain field selection (`var[...]`, `var` passed whole, a macro binding) falls back to the full
    map. CEL parses and evaluates the expression; this only decides what to hand it.
    """
    fields: set[str] = set()
    for match in re.finditer(rf"(?<![\w.]){re.escape(var)}\b", source):
        selected = re.match(r"\s*\.\s*([A-Za-z_]\w*)", source[match.end() :])
        if selected is None:
            return None
        fields.add(selected.group(1))
    return tuple(sorted(fields))


# --- compiled ruleset ------------------------------------------------------------------------------


@dataclass
class CompiledRule:
    rule: Rule
    when: Condition | None
    line_when: Condition | None
    skus: frozenset[str]
    categories: frozenset[str]
    windowed: bool  # has a validity window or a campaign: checked per event
    indexed: bool  # a line rule selecting by SKU/category only: matched through the ruleset's line index
    not_met: str = ""

    def matches_line(self, line: Mapping[str, Any], scope: dict[str, Mapping[str, Any]]) -> bool:
        if self.skus or self.categories:
            if line["sku"] not in self.skus and line["category"] not in self.categories:
                return False
        if self.line_when is not None:
            scope["line"] = line
            return self.line_when(scope) is True
        return True


@dataclass
class CompiledRuleset:
    ruleset_id: str
    version: int
    document: RulesetDocument
    rules: list[CompiledRule]
    # SKU / category -> positions of the indexed line rules that select it: one pass over an order's
    # lines finds every rule's matching amount instead of one pass per rule.
    sku_index: dict[str, frozenset[int]] = field(default_factory=dict)
    category_index: dict[str, frozenset[int]] = field(default_factory=dict)
    has_line_conditions: bool = False
    by_type: dict[str, list[tuple[int, CompiledRule]]] = field(default_factory=dict)

    @classmethod
    def compile(cls, ruleset_id: str, version: int, document: RulesetDocument) -> CompiledRuleset:
        rules = []
        skus: dict[str, set[int]] = {}
        categories: dict[str, set[int]] = {}
        for position, r in enumerate(document.ordered_rules()):
            line_rule = r.kind in ("points_per_unit", "line_multiplier")
            indexed = line_rule and r.line_when is None and bool(r.skus or r.categories)
            if indexed:
                for sku in r.skus:
                    skus.setdefault(sku, set()).add(position)
                for category in r.categories:
                    categories.setdefault(category, set()).add(position)
            rules.append(
                CompiledRule(
                    rule=r,
                    when=Condition(r.when) if r.when else None,
                    line_when=Condition(r.line_when) if r.line_when else None,
                    skus=frozenset(r.skus),
                    categories=frozenset(r.categories),
                    windowed=bool(r.valid_from or r.valid_until or r.campaign),
                    indexed=indexed,
                    not_met=f"condition not met: {r.when}",
                )
            )
        return cls(
            ruleset_id,
            version,
            document,
            rules,
            {k: frozenset(v) for k, v in skus.items()},
            {k: frozenset(v) for k, v in categories.items()},
            any(r.line_when for r in document.rules),
            _by_type(rules),
        )

    def rules_for(self, event_type: str) -> list[tuple[int, CompiledRule]]:
        return self.by_type.get(event_type, [])

    def declares(self, event_type: str) -> bool:
        return event_type.removeprefix(CUSTOM_TYPE_PREFIX) in self.document.custom_events

    def spend_factor(self, currency: str) -> Decimal:
        config = self.document.currencies.get(currency)
        return config.spend_factor if config is not None else Decimal(1)


def _by_type(rules: list[CompiledRule]) -> dict[str, list[tuple[int, CompiledRule]]]:
    out: dict[str, list[tuple[int, CompiledRule]]] = {}
    for position, compiled in enumerate(rules):
        out.setdefault(compiled.rule.event_type, []).append((position, compiled))
    return out


# --- evaluation result -----------------------------------------------------------------------------


@dataclass(slots=True)
class RuleOutcome:
    rule_id: str
    fired: bool
    points: int
    explanation: str
    customer_id: str | None = None
    pending_days: int = 0
    campaign: str | None = None


@dataclass(frozen=True)
class PlannedEarn:
    command_id: str
    customer_id: str
    member_id: str | None
    points: int
    matures_at: datetime | None
    breakdown: list[RuleAward]


@dataclass
class Evaluation:
    ruleset_id: str
    version: int
    event_id: str
    customer_id: str
    trace: list[RuleOutcome]
    commands: list[PlannedEarn]
    campaign_points: dict[str, int]
    counters: dict[str, dict[str, int]]  # customer -> counter key -> increment
    points_by_customer: dict[str, int]

    @property
    def total_points(self) -> int:
        return sum(c.points for c in self.commands)


class EventRefused(ValueError):
    """The event cannot be evaluated under this ruleset (unknown currency, undeclared type): DLQ."""


def _round(value: Decimal, rounding: str) -> int:
    return int(value.quantize(Decimal(1), rounding=ROUNDING[rounding]))


@functools.lru_cache(maxsize=4096)
def _fmt(value: Decimal) -> str:
    # Cached: rates, factors and multipliers repeat on every event; amounts often do too.
    text = format(value.normalize(), "f")
    return text


def _money(value: Decimal) -> float:
    return float(value)


def line_net(line: PurchaseLine) -> Decimal:
    return line.quantity * line.unit_price - line.discount


def _line_view(line: PurchaseLine, net: Decimal) -> dict[str, Any]:
    return {
        "sku": line.sku,
        "category": line.category,
        "quantity": float(line.quantity),
        "unit_price": _money(line.unit_price),
        "discount": _money(line.discount),
        "net": _money(net),
        "gift_card": line.gift_card,
        "shipping": line.shipping,
    }


def event_view(event: CloudEvent[Any], customer: CustomerSnapshot) -> dict[str, Any]:
    """What `event` means in a condition: the envelope, the payload (money as double) and derived fields."""
    data = event.data
    view: dict[str, Any] = {
        "id": event.id,
        "type": event.type,
        "source": event.source,
        "time": event_time(event),
    }
    for name, value in data:
        if name == "lines":
            continue
        view[name] = _money(value) if isinstance(value, Decimal) else value
    if data.model_extra:
        for name, value in data.model_extra.items():
            view[name] = value
    if isinstance(data, PurchaseCompleted):
        categories = tuple(sorted({line.category for line in data.lines}))
        view["categories"] = categories
        view["new_categories"] = tuple(c for c in categories if c not in customer.categories)
        view["line_count"] = len(data.lines)
        view["skus"] = tuple(sorted({line.sku for line in data.lines}))
    return view


def _in_window(rule: Rule, ruleset: RulesetDocument, at: datetime) -> str | None:
    starts, ends = rule.valid_from, rule.valid_until
    if rule.campaign is not None:
        campaign = ruleset.campaigns[rule.campaign]
        starts = max(filter(None, (starts, campaign.starts_at)), default=None)
        ends = min(filter(None, (ends, campaign.ends_at)), default=None)
    if starts is not None and at < starts:
        return f"not yet valid (from {starts.isoformat()})"
    if ends is not None and at >= ends:
        return f"no longer valid (until {ends.isoformat()})"
    return None


def evaluate(
    ruleset: CompiledRuleset,
    event: CloudEvent[Any],
    customer: CustomerSnapshot,
    *,
    referred: CustomerSnapshot | None = None,
    campaign_spent: Mapping[str, int] | None = None,
) -> Evaluation:
    """Evaluates one event; raises EventRefused when the ruleset cannot take it."""
    doc = ruleset.document
    at = event_time(event)
    spent = dict(campaign_spent or {})
    data = event.data
    tenant = event.tenantid
    customer_id = customer.customer_id
    if event.type.startswith(CUSTOM_TYPE_PREFIX) and not ruleset.declares(event.type):
        raise EventRefused(
            f"custom event type {event.type!r} is not declared in ruleset {ruleset.ruleset_id!r} v{ruleset.version}"
        )
    basket = _Basket.empty()
    if isinstance(data, PurchaseCompleted):
        config = doc.currencies.get(data.currency)
        if config is None:
            raise EventRefused(
                f"unknown currency {data.currency!r}: ruleset {ruleset.ruleset_id!r} v{ruleset.version} "
                f"configures {sorted(doc.currencies)}"
            )
        basket = _Basket.of(ruleset, data, config.points_per_unit)

    scope: dict[str, Mapping[str, Any]] = {"event": event_view(event, customer), "customer": customer.view(at)}
    trace: list[RuleOutcome] = []
    accumulated = 0  # points of earlier rules for the buyer, which a tier multiplier scales
    counters: dict[str, dict[str, int]] = {}

    memo = not event.type.startswith(CUSTOM_TYPE_PREFIX)
    for position, compiled in ruleset.rules_for(event.type):
        rule = compiled.rule
        if compiled.indexed and position not in basket.amounts:
            trace.append(RuleOutcome(rule.id, False, 0, "no eligible line"))
            continue
        outside = _in_window(rule, doc, at) if compiled.windowed else None
        if outside is not None:
            trace.append(RuleOutcome(rule.id, False, 0, outside))
            continue
        if compiled.when is not None:
            met = compiled.when(scope, memo=memo)
            if met is not True:
                trace.append(RuleOutcome(rule.id, False, 0, compiled.not_met if met is False else str(met)))
                continue
        outcomes = _apply_rule(compiled, position, doc, customer, referred, basket, accumulated, at, scope, data)
        if isinstance(outcomes, str):
            trace.append(RuleOutcome(rule.id, False, 0, outcomes))
            continue
        for outcome in outcomes:
            outcome.pending_days = rule.pending_days if rule.pending_days is not None else doc.pending_days
            outcome.campaign = rule.campaign
            if rule.max_points is not None and outcome.points > rule.max_points:
                outcome.explanation += f"; capped at the rule's max_points {rule.max_points}"
                outcome.points = rule.max_points
            if rule.campaign is not None:
                budget = doc.campaigns[rule.campaign].budget
                if budget is not None:
                    left = max(budget - spent.get(rule.campaign, 0), 0)
                    if outcome.points > left:
                        outcome.explanation += f"; campaign {rule.campaign!r} budget leaves {left}"
                        outcome.points = left
                    spent[rule.campaign] = spent.get(rule.campaign, 0) + outcome.points
            if outcome.customer_id == customer_id:
                accumulated += outcome.points
            trace.append(outcome)
        if rule.limit is not None:
            key = f"limit:{rule.id}:{period_key(rule.limit.period, at)}"
            counters.setdefault(customer_id, {})[key] = 1
        if rule.stop:
            trace[-1].explanation += "; stop: no lower-priority rule is evaluated"
            break

    _apply_caps(doc, trace, customer, referred, at, event.type == PURCHASE)
    points_by_customer: dict[str, int] = {}
    for outcome in trace:
        if outcome.fired and outcome.points and outcome.customer_id:
            points_by_customer[outcome.customer_id] = points_by_customer.get(outcome.customer_id, 0) + outcome.points
    if doc.caps.per_customer is not None:
        key = f"cap:{period_key(doc.caps.per_customer.period, at)}"
        for cid, pts in points_by_customer.items():
            counters.setdefault(cid, {})[key] = pts
    campaign_points: dict[str, int] = {}
    for outcome in trace:
        if outcome.campaign and outcome.points:
            campaign_points[outcome.campaign] = campaign_points.get(outcome.campaign, 0) + outcome.points
    commands = _plan_commands(ruleset, event, trace, tenant, at)
    return Evaluation(
        ruleset.ruleset_id,
        ruleset.version,
        event.id,
        customer_id,
        trace,
        commands,
        campaign_points,
        counters,
        points_by_customer,
    )


class _Basket:
    """An order's lines as the line rules see them, matched against the ruleset's line index once."""

    __slots__ = ("amounts", "currency", "lines", "rate", "skus", "total", "views")

    def __init__(self, currency: str, rate: Decimal) -> None:
        self.currency = currency
        self.rate = rate
        self.lines: list[tuple[PurchaseLine, Decimal]] = []  # eligible lines and their net amounts
        self.total = Decimal(0)
        self.amounts: dict[int, Decimal] = {}  # indexed rule position -> matching net amount
        self.skus: dict[int, set[str]] = {}
        self.views: list[dict[str, Any]] = []

    @classmethod
    def empty(cls) -> _Basket:
        return cls("", Decimal(0))

    @classmethod
    def of(cls, ruleset: CompiledRuleset, data: PurchaseCompleted, rate: Decimal) -> _Basket:
        basket = cls(data.currency, rate)
        ex = ruleset.document.exclusions
        source = data.lines or [PurchaseLine(sku="", category="", quantity=Decimal(1), unit_price=data.net_amount)]
        sku_index, category_index = ruleset.sku_index, ruleset.category_index
        for line in source:
            if (
                (ex.gift_cards and line.gift_card)
                or (ex.shipping and line.shipping)
                or (ex.discounted_lines and line.discount > 0)
                or line.sku in ex.skus
                or line.category in ex.categories
            ):
                continue
            net = line.quantity * line.unit_price - line.discount
            basket.lines.append((line, net))
            basket.total += net
            by_sku = sku_index.get(line.sku)
            by_category = category_index.get(line.category)
            if by_sku or by_category:
                for position in (by_sku or frozenset()) | (by_category or frozenset()):
                    basket.amounts[position] = basket.amounts.get(position, Decimal(0)) + net
                    basket.skus.setdefault(position, set()).add(line.sku)
        if ruleset.has_line_conditions:
            basket.views = [_line_view(line, net) for line, net in basket.lines]
        return basket

    def matching(
        self, compiled: CompiledRule, position: int, scope: dict[str, Mapping[str, Any]]
    ) -> tuple[Decimal, set[str]]:
        if compiled.indexed:
            return self.amounts.get(position, Decimal(0)), self.skus.get(position, set())
        if compiled.line_when is None and not (compiled.skus or compiled.categories):
            return self.total, {line.sku for line, _ in self.lines}
        amount = Decimal(0)
        skus: set[str] = set()
        for (line, net), view in zip(self.lines, self.views, strict=True):
            if compiled.matches_line(view, scope):
                amount += net
                skus.add(line.sku)
        scope.pop("line", None)
        return amount, skus


def _apply_rule(
    compiled: CompiledRule,
    position: int,
    doc: RulesetDocument,
    customer: CustomerSnapshot,
    referred: CustomerSnapshot | None,
    basket: _Basket,
    accumulated: int,
    at: datetime,
    scope: dict[str, Mapping[str, Any]],
    data: Any,
) -> list[RuleOutcome] | str:
    """The rule's outcomes, or why it did not apply."""
    rule = compiled.rule
    cid = customer.customer_id
    rounding = doc.rounding
    if rule.kind in ("points_per_unit", "line_multiplier"):
        amount, skus = basket.matching(compiled, position, scope)
        if not skus:
            return "no eligible line"
        rate, currency = basket.rate, basket.currency
        if rule.kind == "points_per_unit":
            raw = amount * rate * rule.factor
        else:
            assert rule.multiplier is not None
            raw = amount * rate * (rule.multiplier - 1)
        points = max(_round(raw, rounding), 0)
        if rule.kind == "points_per_unit":
            how = f"{_fmt(amount)} {currency} eligible * {_fmt(rate)} pt/{currency} * factor {_fmt(rule.factor)}"
        else:
            assert rule.multiplier is not None
            how = (
                f"lines {', '.join(sorted(skus))}: {_fmt(amount)} {currency} * {_fmt(rate)} pt/{currency} "
                f"* (multiplier {_fmt(rule.multiplier)} - 1)"
            )
        return [RuleOutcome(rule.id, True, points, f"{how} = {_fmt(raw)} → {points} ({rounding})", cid)]
    if rule.kind == "bonus":
        assert rule.points is not None
        return [RuleOutcome(rule.id, True, rule.points, f"fixed bonus {rule.points}", cid)]
    if rule.kind == "tier_multiplier":
        tier = customer.tier
        multiplier = _tier_multiplier(rule, doc.tiers, tier)
        raw = Decimal(accumulated) * (multiplier - 1)
        points = max(_round(raw, rounding), 0)
        how = f"tier {tier or 'none'}: {accumulated} pts of earlier rules * (multiplier {_fmt(multiplier)} - 1)"
        return [RuleOutcome(rule.id, True, points, f"{how} = {_fmt(raw)} → {points} ({rounding})", cid)]
    # engagement
    assert rule.points is not None
    if rule.limit is not None:
        key = f"limit:{rule.id}:{period_key(rule.limit.period, at)}"
        if customer.counters.get(key, 0) >= rule.limit.count:
            return f"limit of {rule.limit.count} per {rule.limit.period} reached"
    out = [RuleOutcome(rule.id, True, rule.points, f"{rule.on}: {rule.points}", cid)]
    if rule.referred_points and isinstance(data, ReferralConverted) and referred is not None:
        out.append(
            RuleOutcome(
                rule.id,
                True,
                rule.referred_points,
                f"{rule.on}, referred customer: {rule.referred_points}",
                referred.customer_id,
            )
        )
    return out


def _tier_multiplier(rule: Rule, tiers: Tiers | None, tier: str | None) -> Decimal:
    if tier is None:
        return Decimal(1)
    if tier in rule.multipliers:
        return rule.multipliers[tier]
    for level in tiers.levels if tiers else ():
        if level.name == tier:
            return level.multiplier
    return Decimal(1)


def _apply_caps(
    doc: RulesetDocument,
    trace: list[RuleOutcome],
    customer: CustomerSnapshot,
    referred: CustomerSnapshot | None,
    at: datetime,
    is_purchase: bool,
) -> None:
    # Caps trim the lowest-priority awards first, so the rules the programme ranks highest keep theirs.
    if is_purchase and doc.caps.per_order is not None:
        _trim(trace, customer.customer_id, doc.caps.per_order, lambda: f"per-order cap {doc.caps.per_order}")
    cap = doc.caps.per_customer
    if cap is not None:
        key = f"cap:{period_key(cap.period, at)}"
        for snapshot in (customer, referred):
            if snapshot is None:
                continue
            left = max(cap.points - snapshot.counters.get(key, 0), 0)
            _trim(
                trace,
                snapshot.customer_id,
                left,
                lambda: f"per-customer cap {cap.points} per {cap.period}, {left} left",  # noqa: B023 - called at once
            )


def _trim(trace: list[RuleOutcome], customer_id: str, allowed: int, why: Callable[[], str]) -> None:
    total = sum(o.points for o in trace if o.fired and o.customer_id == customer_id)
    excess = total - allowed
    if excess <= 0:
        return
    reason = why()
    for outcome in reversed(trace):
        if excess <= 0:
            return
        if not outcome.fired or outcome.customer_id != customer_id or outcome.points == 0:
            continue
        cut = min(outcome.points, excess)
        outcome.points -= cut
        outcome.explanation += f"; -{cut} by the {reason}"
        excess -= cut


def _plan_commands(
    ruleset: CompiledRuleset, event: CloudEvent[Any], trace: list[RuleOutcome], tenant: str, at: datetime
) -> list[PlannedEarn]:
    # One EarnPoints per (customer, pending period): awards that mature together travel together.
    groups: dict[tuple[str, int], list[RuleOutcome]] = {}
    for outcome in trace:
        if outcome.fired and outcome.points > 0 and outcome.customer_id:
            groups.setdefault((outcome.customer_id, outcome.pending_days), []).append(outcome)
    member = getattr(event.data, "member_id", None)
    buyer = getattr(event.data, "customer_id", None)
    out = []
    for (cid, pending), outcomes in groups.items():
        out.append(
            PlannedEarn(
                command_id=command_id("earn", tenant, event.id, ruleset.ruleset_id, ruleset.version, cid, pending),
                customer_id=cid,
                member_id=member if cid == buyer else None,
                points=sum(o.points for o in outcomes),
                matures_at=at + timedelta(days=pending) if pending else None,
                breakdown=[RuleAward(rule_id=o.rule_id, points=o.points, explanation=o.explanation) for o in outcomes],
            )
        )
    return out


# --- state changes ---------------------------------------------------------------------------------


def apply_event(
    state: CustomerSnapshot, event: CloudEvent[Any], *, spend_factor: Decimal, points: int, counters: Mapping[str, int]
) -> None:
    """Folds an evaluated event into the customer's state (after evaluation: rules see the state before)."""
    at = event_time(event)
    data = event.data
    if isinstance(data, PurchaseCompleted):
        state.purchase_count += 1
        state.first_purchase_at = min(filter(None, (state.first_purchase_at, at)))
        state.last_purchase_at = max(filter(None, (state.last_purchase_at, at)))
        month = month_key(at)
        state.spend_by_month[month] = state.spend_by_month.get(month, Decimal(0)) + data.net_amount * spend_factor
        state.categories.update(line.category for line in data.lines)
    if points:
        month = month_key(at)
        state.points_by_month[month] = state.points_by_month.get(month, 0) + points
    for key, increment in counters.items():
        state.counters[key] = state.counters.get(key, 0) + increment
    _prune(state, at)


def _prune(state: CustomerSnapshot, at: datetime) -> None:
    # Only the last 13 months matter for rolling figures; counters of past periods are never read again.
    keep = _months_back(at, 13)
    oldest = min(keep)
    state.spend_by_month = {k: v for k, v in state.spend_by_month.items() if k >= oldest}
    state.points_by_month = {k: v for k, v in state.points_by_month.items() if k >= oldest}
    year = str(at.year - 1)
    state.counters = {k: v for k, v in state.counters.items() if k.split(":")[-1][:4] >= year}


def apply_refund(state: CustomerSnapshot, ordered_at: datetime, amount: Decimal, spend_factor: Decimal) -> None:
    month = month_key(ordered_at)
    if month in state.spend_by_month:
        state.spend_by_month[month] -= amount * spend_factor


@dataclass(frozen=True)
class TierChange:
    previous: str | None
    tier: str
    reason: str


def review_tier(state: CustomerSnapshot, tiers: Tiers, at: datetime) -> TierChange | None:
    """Upgrades at once; downgrades only when a review is due, as far as the downgrade policy allows."""
    value = Decimal(state.points_12m(at)) if tiers.basis == "points_12m" else state.spend_12m(at)
    names = [lv.name for lv in tiers.levels]
    qualified = max((i for i, lv in enumerate(tiers.levels) if value >= lv.threshold), default=0)
    current = names.index(state.tier) if state.tier in names else None
    basis = f"{tiers.basis} {_fmt(value)}"
    if current is None:
        change = TierChange(state.tier, names[qualified], f"initial tier: {basis} qualifies for {names[qualified]}")
    elif qualified > current:
        change = TierChange(
            state.tier, names[qualified], f"upgrade: {basis} ≥ {_fmt(tiers.levels[qualified].threshold)}"
        )
    elif qualified < current:
        due = state.tier_reviewed_at is None or at >= state.tier_reviewed_at + timedelta(days=tiers.review_every_days)
        if not due or tiers.downgrade == "never":
            return None
        target = current - 1 if tiers.downgrade == "one_level" else qualified
        change = TierChange(
            state.tier,
            names[target],
            f"review ({tiers.review_every_days}-day schedule): {basis} qualifies for {names[qualified]}; "
            f"downgrade policy {tiers.downgrade}",
        )
    else:
        if state.tier_reviewed_at is None or at >= state.tier_reviewed_at + timedelta(days=tiers.review_every_days):
            state.tier_reviewed_at = at  # a review that keeps the tier restarts the schedule
        return None
    state.tier = change.tier
    state.tier_reviewed_at = at
    return change


# --- refunds ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AwardRecord:
    command_id: str
    customer_id: str
    points: int
    clawed_back: int


@dataclass(frozen=True)
class PlannedClawback:
    command_id: str
    original_command_id: str
    customer_id: str
    points: int


def refund_amount(refund: PurchaseRefunded) -> Decimal:
    if refund.amount is not None:
        return refund.amount
    return sum((line.amount for line in refund.lines), Decimal(0))


def plan_clawbacks(
    tenant: str,
    refund_event_id: str,
    awards: Sequence[AwardRecord],
    *,
    order_net: Decimal,
    refunded_before: Decimal,
    refunded_now: Decimal,
) -> list[PlannedClawback]:
    """Claws back the stored awards in proportion to the refunded share of the order's net amount.

    Computed on the cumulative refunded share, so several partial refunds add up to exactly the
    award and a full refund returns every point; never re-evaluated with today's rules.
    """
    total = refunded_before + refunded_now
    share = Decimal(1) if order_net <= 0 else min(total / order_net, Decimal(1))
    out = []
    for award in awards:
        target = _round(Decimal(award.points) * share, "half_up")
        claw = min(target, award.points) - award.clawed_back
        if claw > 0:
            out.append(
                PlannedClawback(
                    command_id=command_id("claw", tenant, refund_event_id, award.command_id),
                    original_command_id=award.command_id,
                    customer_id=award.customer_id,
                    points=claw,
                )
            )
    return out
