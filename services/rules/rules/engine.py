"""Pure rule evaluation: (event, ruleset version, customer state) -> awards with their arithmetic.

No I/O here. The consumer and `POST /v1/simulate` call the same `evaluate`, so a simulation equals
the award the pipeline produces for the same event and state. Evaluation is deterministic: the
inputs above fully decide the result (event time, never the wall clock).

Speed: CEL programs are compiled once per ruleset version. A condition is a pure function of the
fields it reads, so each condition memoizes its result on those fields' values, and on a miss it is
executed with a map holding only those fields (converting a whole event map costs ~15 µs; a few
scalars ~1 µs). A plain `var.field <op> literal` is answered in Python when the value has the
literal's type (what CEL answers too). The views hold only the fields some condition reads, and
everything that depends only on the version (rule order per event type, windows, line index, fixed
explanations) is computed once; docs/rules.md lists what the hot path avoids.

A condition never fails an evaluation: any error while running it (division by zero, overflow, an index
or key that is not there, a type error, a panic of the CEL library) counts as not met, with the reason
in the rule's outcome. The library has no cost limit, so a condition runs only on inputs within a budget
(INPUT_ITEMS list items and map entries, INPUT_CHARACTERS of text, over the values it reads); over it,
the condition counts as not met too. With the limits on its text (rules.ruleset), that bounds its cost.
"""

from __future__ import annotations

import functools
import hashlib
import math
import operator
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal
from typing import Any, Final

import cel

from rules.ruleset import PURCHASE, Period, Rule, RulesetDocument, Tiers, condition_limits
from shared.events import (
    CUSTOM_TYPE_PREFIX,
    MAX_POINTS,
    CloudEvent,
    Payload,
    PurchaseCompleted,
    PurchaseLine,
    PurchaseRefunded,
    ReferralConverted,
    RuleAward,
)

# Module constants are Final: compiled code reads them from C statics (or inlines them), not from the
# module's dict on every use.
ROUNDING: Final = {"floor": ROUND_FLOOR, "half_up": ROUND_HALF_UP, "half_even": ROUND_HALF_EVEN, "ceil": ROUND_CEILING}
MEMO_LIMIT: Final = 50_000
# The evaluation budget of one condition: what the values it reads may hold in all (docs/rules.md, Limits).
INPUT_ITEMS: Final = 250
INPUT_CHARACTERS: Final = 25_000
REASON_LENGTH: Final = 300
_MISSING: Final = object()


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


@functools.lru_cache(maxsize=4096)
def _cap_key(period: Period, at: date) -> str:
    """The per-customer cap's counter key; cached whole, so every event of a period shares one string
    (built and hashed once)."""
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


@dataclass(slots=True)
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
    # The stored row's version (0: never stored). Not the rules' business: the repository writes a state only
    # over the version it was read at, so a copy kept between batches cannot overwrite a newer one.
    version: int = field(default=0, compare=False)

    def __init__(
        self,
        customer_id: str,
        purchase_count: int = 0,
        first_purchase_at: datetime | None = None,
        last_purchase_at: datetime | None = None,
        spend_by_month: dict[str, Decimal] | None = None,
        points_by_month: dict[str, int] | None = None,
        categories: set[str] | None = None,
        tier: str | None = None,
        tier_reviewed_at: datetime | None = None,
        counters: dict[str, int] | None = None,
        version: int = 0,
    ) -> None:
        # Compiled by mypyc, unlike the generated one; None stands for the default factories (a new map/set).
        self.customer_id = customer_id
        self.purchase_count = purchase_count
        self.first_purchase_at = first_purchase_at
        self.last_purchase_at = last_purchase_at
        self.spend_by_month = {} if spend_by_month is None else spend_by_month
        self.points_by_month = {} if points_by_month is None else points_by_month
        self.categories = set() if categories is None else categories
        self.tier = tier
        self.tier_reviewed_at = tier_reviewed_at
        self.counters = {} if counters is None else counters
        self.version = version

    # Plain loops, in the order sum() adds: compiled, they iterate the typed maps natively.
    def spend_12m(self, at: datetime) -> Decimal:
        months = _months_back(at, 12)
        total = _ZERO
        for month, spend in self.spend_by_month.items():
            if month in months:
                total += spend
        return total

    def points_12m(self, at: datetime) -> int:
        months = _months_back(at, 12)
        total = 0
        for month, points in self.points_by_month.items():
            if month in months:
                total += points
        return total

    def view(self, at: datetime, fields: frozenset[str] | None = None) -> dict[str, Any]:
        """What `customer` means in a condition; with `fields`, only those keys (what the conditions read)."""
        view: dict[str, Any] = {}
        for name in CUSTOMER_FIELDS if fields is None else fields:
            if name == "id":
                view[name] = self.customer_id
            elif name == "purchase_count":
                view[name] = self.purchase_count
            elif name == "first_purchase_at":
                view[name] = self.first_purchase_at
            elif name == "last_purchase_at":
                view[name] = self.last_purchase_at
            elif name == "days_since_last_purchase":
                last = self.last_purchase_at
                view[name] = (at - last).days if last is not None else -1
            elif name == "spend_12m":
                view[name] = float(self.spend_12m(at))
            elif name == "points_12m":
                view[name] = self.points_12m(at)
            elif name == "categories":
                view[name] = tuple(sorted(self.categories))
            elif name == "tier":
                view[name] = self.tier or ""
        return view


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
)


# --- conditions ------------------------------------------------------------------------------------


class Condition:
    """A compiled CEL condition, memoized on the fields it reads."""

    def __init__(self, source: str) -> None:
        self.source = source
        # A version stored before a limit existed may break it: such a condition is never run (not met).
        self.refused = condition_limits(source) or ""
        if not self.refused:
            try:
                self.program = cel.compile(source)
            except Exception as exc:  # validated at creation; kept safe for whatever is stored
                self.refused = f"CEL: {_shorten(str(exc))}"
        if self.refused:
            self.refused = f"condition {_shorten(source)!r} refused: {self.refused}"
            self.program = cel.compile("false")
        self.variables: tuple[str, ...] = tuple(sorted(self.program.variables()))
        self.fields: dict[str, tuple[str, ...] | None] = {v: _fields_read(source, v) for v in self.variables}
        self._plan = tuple((v, self.fields[v]) for v in self.variables)
        # The common case, every variable read by plain field selections: the memo key is the flat tuple
        # of those fields' values, taken with one subscript each (a missing one takes the general path).
        self._flat: tuple[tuple[str, str], ...] | None = (
            tuple((v, f) for v in self.variables for f in self.fields[v] or ())
            if all(self.fields[v] for v in self.variables)
            else None
        )
        # The first two (variable, field) pairs of the flat key, unpacked: the usual keys have one or two.
        padded = (*(self._flat or ()), ("", ""), ("", ""))
        self._v1, self._f1 = padded[0]
        self._v2, self._f2 = padded[1]
        self._memo: dict[tuple[Any, ...], bool | str] = {}
        self._flat_memo: dict[tuple[Any, ...], bool | str] = {}
        # `var.field <op> literal`, answered in `check` without CEL: its parts as typed attributes, so the
        # compiled comparison runs on a C double, a native int or a str.
        self._kind = _NOT_SIMPLE
        self._var = self._name = self._text = ""
        self._op = _EQ
        self._double = 0.0
        self._int = 0
        simple = _simple_comparison(source)
        if simple is not None:
            self._var, self._name, op, literal = simple
            self._op = _OPERATORS[op]
            if isinstance(literal, float):
                self._kind, self._double = _DOUBLE, literal
            elif isinstance(literal, int):
                self._kind, self._int = _INT, literal
            else:
                self._kind, self._text = _STRING, literal

    def __call__(self, scope: Mapping[str, Mapping[str, Any]], memo: bool = True) -> bool | str:
        """True/False, or the reason the condition could not be evaluated (which counts as not met).

        Memoize only where every field has one type (built-in events): the memo key compares values, and
        1, 1.0 and True are equal keys while CEL treats them differently.
        """
        return self.check(scope if isinstance(scope, dict) else dict(scope), memo)

    def check(self, scope: dict[str, Mapping[str, Any]], memo: bool = True) -> bool | str:
        """What the evaluation loop calls (see __call__)."""
        kind = self._kind
        if kind != _NOT_SIMPLE:
            # `var.field <op> literal` answered here when the value has the literal's exact type (a double
            # finite, an int within int64), where CEL's result is the same; otherwise (a missing field,
            # another type, which CEL may refuse) CEL decides through the memoized path.
            values = scope.get(self._var)
            if isinstance(values, dict):
                value = values.get(self._name, _MISSING)
                if kind == _DOUBLE:
                    if type(value) is float and not math.isinf(value) and not math.isnan(value):
                        return _compare_doubles(self._op, value, self._double)
                elif kind == _INT:
                    if type(value) is int and _INT64_MIN <= value <= _INT64_MAX:
                        return _compare_ints(self._op, value, self._int)
                elif type(value) is str:
                    equal = value == self._text
                    return equal if self._op == _EQ else not equal
        return self._memoized(scope, memo)

    def _memoized(self, scope: dict[str, Mapping[str, Any]], memo: bool) -> bool | str:
        flat = self._flat
        if flat is None:
            return self._general(scope, memo)
        if not memo:
            return self._execute(scope)
        # The memo key, the flat tuple of the fields' values, with one subscript each; a missing field or
        # an unhashable value takes the general path.
        key: tuple[Any, ...]
        try:
            if len(flat) == 1:
                key = (scope[self._v1][self._f1],)
            elif len(flat) == 2:
                key = (scope[self._v1][self._f1], scope[self._v2][self._f2])
            else:
                key = tuple([scope[v][f] for v, f in flat])
            hit = self._flat_memo.get(key)
        except (KeyError, TypeError):
            return self._general(scope, memo)
        if hit is not None:
            return hit
        result = self._execute(scope)
        if len(self._flat_memo) >= MEMO_LIMIT:
            self._flat_memo.clear()
        self._flat_memo[key] = result
        return result

    def _general(self, scope: Mapping[str, Mapping[str, Any]], memo: bool = True) -> bool | str:
        """The memo keyed on every variable's fields (or whole value), for any scope."""
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
        if self.refused:
            return self.refused
        args: dict[str, Any] = {}
        for var in self.variables:
            if var not in scope:
                continue  # a comprehension variable; CEL binds it
            value = scope[var]
            fields = self.fields[var]
            args[var] = value if fields is None else {f: value[f] for f in fields if f in value}
        over = _over_budget(args)
        if over:
            return f"condition {self.source!r} not evaluated (counts as not met): {over}"
        try:
            result = self.program.execute(args)
        except Exception as exc:
            return f"condition {self.source!r} failed (counts as not met): {type(exc).__name__}: {_shorten(str(exc))}"
        except BaseException as exc:
            # A panic inside the CEL library arrives as pyo3's PanicException, a BaseException; anything
            # else of that kind (cancellation, exit) is not the condition's.
            if type(exc).__name__ != "PanicException":
                raise
            return f"condition {self.source!r} failed (counts as not met): {type(exc).__name__}: {_shorten(str(exc))}"
        if not isinstance(result, bool):
            return f"condition {self.source!r} returned {result!r}, not a bool"
        return result


def _shorten(text: str) -> str:
    return text if len(text) <= REASON_LENGTH else text[:REASON_LENGTH] + "…"


def _over_budget(args: dict[str, Any]) -> str:
    """Why the values handed to a condition are over the evaluation budget, or "" (walks them once,
    stopping as soon as a bound is passed)."""
    items = 0
    characters = 0
    stack: list[Any] = list(args.values())
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            characters += len(value)
        elif isinstance(value, dict):
            items += len(value)
            if items > INPUT_ITEMS:
                break
            for key, item in value.items():
                if isinstance(key, str):
                    characters += len(key)
                stack.append(item)
        elif isinstance(value, (list, tuple)):
            items += len(value)
            if items > INPUT_ITEMS:
                break
            stack.extend(value)
        elif isinstance(value, (bytes, bytearray)):
            characters += len(value)
        if characters > INPUT_CHARACTERS:
            return f"the values it reads hold more than {INPUT_CHARACTERS} characters of text (the evaluation budget)"
    if items > INPUT_ITEMS:
        return f"the values it reads hold more than {INPUT_ITEMS} list items and map entries (the evaluation budget)"
    return ""


_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
# A simple comparison's literal type and operator, as codes (compared as C integers once compiled).
_NOT_SIMPLE: Final = 0
_DOUBLE: Final = 1
_INT: Final = 2
_STRING: Final = 3
_EQ: Final = 0
_NE: Final = 1
_LT: Final = 2
_LE: Final = 3
_GT: Final = 4
_GE: Final = 5
_OPERATORS: Final = {"==": _EQ, "!=": _NE, "<": _LT, "<=": _LE, ">": _GT, ">=": _GE}


# One comparison function per native type (double, int): compiled, each compares unboxed values; a shared
# generic one would compare Python objects.
def _compare_doubles(op: int, value: float, literal: float) -> bool:
    if op == _EQ:
        return value == literal
    if op == _NE:
        return value != literal
    if op == _LT:
        return value < literal
    if op == _LE:
        return value <= literal
    if op == _GT:
        return value > literal
    return value >= literal


def _compare_ints(op: int, value: int, literal: int) -> bool:
    if op == _EQ:
        return value == literal
    if op == _NE:
        return value != literal
    if op == _LT:
        return value < literal
    if op == _LE:
        return value <= literal
    if op == _GT:
        return value > literal
    return value >= literal


_SIMPLE: Final = re.compile(
    r"\s*([A-Za-z_]\w*)\s*\.\s*([A-Za-z_]\w*)\s*(==|!=|<=|>=|<|>)\s*"
    r"(?:(-?\d+\.\d+)|(-?\d+)|'([A-Za-z0-9_ .:-]*)'|\"([A-Za-z0-9_ .:-]*)\")\s*"
)


def _simple_comparison(source: str) -> tuple[str, str, str, float | int | str] | None:
    """(var, field, operator, literal) for `var.field <op> literal` with a double, int or plain string
    literal (strings: only == and !=), else None."""
    match = _SIMPLE.fullmatch(source)
    if match is None:
        return None
    var, name, op, double, integer, single, double_quoted = match.groups()
    literal: float | int | str
    if double is not None:
        literal = float(double)
    elif integer is not None:
        literal = int(integer)
    else:
        if op not in ("==", "!="):
            return None
        literal = single if single is not None else double_quoted
    return var, name, op, literal


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
    # Per version, so the event loop does not recompute them: the effective window and its messages, the
    # pending period, the campaign budget, the fixed explanation of a bonus.
    starts: datetime | None = None
    ends: datetime | None = None
    not_yet: str = ""
    no_longer: str = ""
    pending_days: int = 0
    budget: int | None = None
    fixed: str = ""

    rule_id: str = ""
    kind: str = ""
    points: int = 0
    campaign: str | None = None
    max_points: int | None = None
    stop: bool = False
    line_rule: bool = False
    plain: bool = False  # no max_points, campaign, limit or stop: a fired outcome needs no adjustment
    whole_basket: bool = False  # a line rule over every eligible line
    basket_total: bool = False  # a points_per_unit rule over every eligible line: the basket's total
    scale: Decimal = Decimal(1)  # a line rule's factor, or its multiplier - 1
    # The fixed part of a line rule's explanation per currency: within a version the currency decides the
    # rate (its points_per_unit), so the currency alone keys it and the evaluation loop reads it directly.
    arithmetic_texts: dict[str, str] = field(default_factory=dict)
    _skipped: dict[str, RuleOutcome] = field(default_factory=dict)
    tiers: dict[str | None, tuple[Decimal, str]] = field(default_factory=dict)  # tier -> (multiplier - 1, text)
    # The outcomes of not firing for the fixed reasons, built once (plain attributes, not cached properties:
    # mypyc compiles a cached_property into a getter that recomputes it on every read).
    no_line: RuleOutcome = field(init=False, repr=False, compare=False)
    condition_not_met: RuleOutcome = field(init=False, repr=False, compare=False)
    not_yet_valid: RuleOutcome = field(init=False, repr=False, compare=False)
    no_longer_valid: RuleOutcome = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rule = self.rule
        self.line_rule = rule.kind in ("points_per_unit", "line_multiplier")
        self.plain = rule.max_points is None and rule.campaign is None and rule.limit is None and not rule.stop
        self.whole_basket = self.line_rule and not (rule.skus or rule.categories or rule.line_when)
        self.basket_total = self.whole_basket and rule.kind == "points_per_unit"
        if rule.kind == "points_per_unit":
            self.scale = rule.factor
        elif rule.kind == "line_multiplier" and rule.multiplier is not None:
            self.scale = rule.multiplier - 1
        self.rule_id, self.kind, self.points = rule.id, rule.kind, rule.points or 0
        self.campaign, self.max_points, self.stop = rule.campaign, rule.max_points, rule.stop
        self.starts, self.ends = self.rule.valid_from, self.rule.valid_until
        if self.starts is not None:
            self.not_yet = f"not yet valid (from {self.starts.isoformat()})"
        if self.ends is not None:
            self.no_longer = f"no longer valid (until {self.ends.isoformat()})"
        if self.rule.kind == "bonus":
            self.fixed = f"fixed bonus {self.rule.points}"
        elif self.rule.kind == "engagement":
            self.fixed = f"{self.rule.on}: {self.rule.points}"
        self.no_line = self.skipped("no eligible line")
        self.condition_not_met = self.skipped(self.not_met)
        self._window_outcomes()

    def _window_outcomes(self) -> None:
        # Again in bind: a campaign narrows the window, which rewrites its texts.
        self.not_yet_valid = self.skipped(self.not_yet)
        self.no_longer_valid = self.skipped(self.no_longer)

    def skipped(self, reason: str) -> RuleOutcome:
        """The outcome of this rule not firing for a fixed reason: one instance serves every evaluation,
        as nothing changes an outcome that did not fire (the caps and the plan read fired ones only)."""
        outcome = self._skipped.get(reason)
        if outcome is None:
            outcome = self._skipped[reason] = RuleOutcome(self.rule_id, False, 0, reason)
        return outcome

    def arithmetic(self, currency: str, rate: Decimal) -> str:
        """The fixed part of a line rule's explanation after the amount, for a currency and its rate."""
        text = self.arithmetic_texts.get(currency)
        if text is None:
            if self.kind == "points_per_unit":
                text = f" {currency} eligible * {_fmt(rate)} pt/{currency} * factor {_fmt(self.rule.factor)}"
            else:
                assert self.rule.multiplier is not None
                text = f" {currency} * {_fmt(rate)} pt/{currency} * (multiplier {_fmt(self.rule.multiplier)} - 1)"
            self.arithmetic_texts[currency] = text
        return text

    def bind(self, document: RulesetDocument) -> CompiledRule:
        rule = self.rule
        self.pending_days = rule.pending_days if rule.pending_days is not None else document.pending_days
        if rule.campaign is not None:
            campaign = document.campaigns[rule.campaign]
            self.budget = campaign.budget
            self.starts = max(filter(None, (self.starts, campaign.starts_at)), default=None)
            self.ends = min(filter(None, (self.ends, campaign.ends_at)), default=None)
            self.not_yet = f"not yet valid (from {self.starts.isoformat()})" if self.starts else ""
            self.no_longer = f"no longer valid (until {self.ends.isoformat()})" if self.ends else ""
            self._window_outcomes()
        return self

    def outside(self, at: datetime) -> str | None:
        """Why the rule does not apply at `at` (its validity window or campaign), or None."""
        if self.starts is not None and at < self.starts:
            return self.not_yet
        if self.ends is not None and at >= self.ends:
            return self.no_longer
        return None


# (position, rule, indexed, windowed, condition, bonus, line rule): one rule as the evaluation loop reads it.
Step = tuple[int, CompiledRule, bool, bool, Condition | None, bool, bool]


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
    # The fields of `event`, `customer` and `line` that any condition reads (None: the whole map): the
    # views built per event hold only those, with the values the full views would give them.
    event_fields: frozenset[str] | None = None
    customer_fields: frozenset[str] | None = None
    line_fields: frozenset[str] | None = None
    excluded_skus: frozenset[str] = frozenset()
    excluded_categories: frozenset[str] = frozenset()
    _positions: dict[tuple[str, str], tuple[int, ...]] = field(default_factory=dict)

    fixed_explanations: frozenset[str] = frozenset()
    # The length of the longest fixed explanation: a longer one is not looked up (not hashed) among them.
    fixed_longest: int = field(init=False, repr=False, compare=False)
    # Plain attributes, not cached properties: mypyc compiles a cached_property into a getter that
    # recomputes it on every read.
    steps: dict[str, list[Step]] = field(init=False, repr=False, compare=False)  # see _steps
    # The version's part of the text an earn command's id hashes, after the tenant and the event id.
    command_id_part: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.fixed_explanations = frozenset(r.fixed for r in self.rules if r.fixed)
        self.fixed_longest = max(map(len, self.fixed_explanations), default=0)
        self.excluded_skus = frozenset(self.document.exclusions.skus)
        self.excluded_categories = frozenset(self.document.exclusions.categories)
        self.steps = self._steps()
        self.command_id_part = f"|{self.ruleset_id}|{self.version}|"

    def positions_of(self, sku: str, category: str) -> tuple[int, ...]:
        """The indexed line rules a line of this SKU and category matches (cached per pair)."""
        key = (sku, category)
        hit = self._positions.get(key)
        if hit is None:
            found = self.sku_index.get(sku, frozenset()) | self.category_index.get(category, frozenset())
            hit = tuple(sorted(found))
            if len(self._positions) >= MEMO_LIMIT:
                self._positions.clear()
            self._positions[key] = hit
        return hit

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
                ).bind(document)
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
            _fields_of(rules, "event"),
            _fields_of(rules, "customer"),
            _fields_of(rules, "line"),
        )

    def _steps(self) -> dict[str, list[Step]]:
        """Per event type, what the evaluation loop reads of each rule, unpacked once per version."""
        return {
            event_type: [(p, c, c.indexed, c.windowed, c.when, c.kind == "bonus", c.line_rule) for p, c in rules]
            for event_type, rules in self.by_type.items()
        }

    def rules_for(self, event_type: str) -> list[tuple[int, CompiledRule]]:
        return self.by_type.get(event_type, [])

    def declares(self, event_type: str) -> bool:
        return event_type.removeprefix(CUSTOM_TYPE_PREFIX) in self.document.custom_events

    def spend_factor(self, currency: str) -> Decimal:
        config = self.document.currencies.get(currency)
        return config.spend_factor if config is not None else Decimal(1)


def _fields_of(rules: list[CompiledRule], var: str) -> frozenset[str] | None:
    out: set[str] = set()
    for compiled in rules:
        for condition in (compiled.when, compiled.line_when):
            if condition is None or var not in condition.fields:
                continue
            fields = condition.fields[var]
            if fields is None:
                return None
            out.update(fields)
    return frozenset(out)


def _by_type(rules: list[CompiledRule]) -> dict[str, list[tuple[int, CompiledRule]]]:
    out: dict[str, list[tuple[int, CompiledRule]]] = {}
    for position, compiled in enumerate(rules):
        out.setdefault(compiled.rule.event_type, []).append((position, compiled))
    return out


# --- evaluation result -----------------------------------------------------------------------------


# The classes built per event define their own __init__: mypyc compiles it, while the one the dataclass
# decorator would generate runs interpreted and is called with its arguments packed in a tuple and a dict.


@dataclass(slots=True)
class RuleOutcome:
    rule_id: str
    fired: bool
    points: int
    explanation: str
    customer_id: str | None = None
    pending_days: int = 0
    campaign: str | None = None

    def __init__(
        self,
        rule_id: str,
        fired: bool,
        points: int,
        explanation: str,
        customer_id: str | None = None,
        pending_days: int = 0,
        campaign: str | None = None,
    ) -> None:
        self.rule_id = rule_id
        self.fired = fired
        self.points = points
        self.explanation = explanation
        self.customer_id = customer_id
        self.pending_days = pending_days
        self.campaign = campaign


_setattr: Final = object.__setattr__


@dataclass(frozen=True)
class PlannedEarn:
    command_id: str
    customer_id: str
    member_id: str | None
    points: int
    matures_at: datetime | None
    breakdown: list[RuleAward]

    def __init__(
        self,
        command_id: str,
        customer_id: str,
        member_id: str | None,
        points: int,
        matures_at: datetime | None,
        breakdown: list[RuleAward],
    ) -> None:
        # Frozen: set through object.__setattr__, as the generated __init__ does (read once, as _setattr).
        _setattr(self, "command_id", command_id)
        _setattr(self, "customer_id", customer_id)
        _setattr(self, "member_id", member_id)
        _setattr(self, "points", points)
        _setattr(self, "matures_at", matures_at)
        _setattr(self, "breakdown", breakdown)


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

    def __init__(
        self,
        ruleset_id: str,
        version: int,
        event_id: str,
        customer_id: str,
        trace: list[RuleOutcome],
        commands: list[PlannedEarn],
        campaign_points: dict[str, int],
        counters: dict[str, dict[str, int]],
        points_by_customer: dict[str, int],
    ) -> None:
        self.ruleset_id = ruleset_id
        self.version = version
        self.event_id = event_id
        self.customer_id = customer_id
        self.trace = trace
        self.commands = commands
        self.campaign_points = campaign_points
        self.counters = counters
        self.points_by_customer = points_by_customer

    @property
    def total_points(self) -> int:
        return sum(c.points for c in self.commands)


class EventRefused(ValueError):
    """The event cannot be evaluated under this ruleset (unknown currency, undeclared type), or cannot be
    taken at all (a self-referral, a refund naming another customer than the order's): DLQ."""


def check_referral(referral: ReferralConverted) -> None:
    """A customer cannot refer itself: both sides' rewards would go to one customer."""
    if referral.referred_customer_id == referral.customer_id:
        raise EventRefused(f"self-referral: customer {referral.customer_id!r} cannot refer itself")


def check_refund(refund: PurchaseRefunded, *, order_id: str, customer_id: str, currency: str) -> Decimal:
    """The amount a refund of this order (its id, customer and currency) asks back; raises EventRefused for a
    refund the order cannot take."""
    if refund.customer_id != customer_id:
        raise EventRefused(
            f"refund customer does not match the order's customer: refund {refund.refund_id!r} names "
            f"customer {refund.customer_id!r}, not the customer of order {order_id!r}"
        )
    if refund.currency != currency:
        raise EventRefused(f"refund in {refund.currency} of order {order_id!r} paid in {currency}")
    amount = refund_amount(refund)
    if amount <= 0:
        raise EventRefused("a refund needs a positive amount or returned lines")
    return amount


_ONE: Final = Decimal(1)
_ZERO: Final = Decimal(0)
_NO_SKUS: Final[frozenset[str]] = frozenset()


# Below 10**20, math.floor equals quantize to units (which refuses results past 28 digits).


def _round(value: Decimal, rounding: str) -> int:
    if rounding == "floor" and value.adjusted() < 20:  # |value| < 10**20
        return math.floor(value)
    return int(value.quantize(_ONE, rounding=ROUNDING[rounding]))


def _fmt(value: Decimal) -> str:
    """The normalized value in fixed-point notation, as format(value.normalize(), "f") writes it."""
    # Not cached: a cache miss (hashing a Decimal, evicting) costs several times the formatting itself.
    # str() writes the same text, faster, unless it chooses an exponent (a positive exponent, or a value
    # below 1E-6): then it contains an "E" and "f" formatting decides.
    normalized = value.normalize()
    text = str(normalized)
    return text if "E" not in text else format(normalized, "f")


def _money(value: Decimal) -> float:
    return float(value)


def line_net(line: PurchaseLine) -> Decimal:
    return line.quantity * line.unit_price - line.discount


LINE_FIELDS: Final = ("sku", "category", "quantity", "unit_price", "discount", "net", "gift_card", "shipping")


def _line_view(line: PurchaseLine, net: Decimal, fields: Collection[str] = LINE_FIELDS) -> dict[str, Any]:
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


_ENVELOPE_FIELDS: Final = frozenset({"id", "type", "source", "time"})
_PURCHASE_DERIVED: Final = frozenset({"categories", "new_categories", "line_count", "skus"})


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
            view[name] = _money(value) if isinstance(value, Decimal) else value
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
            view[name] = float(value) if isinstance(value, Decimal) else value  # _money, inlined
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
            view[name] = _money(value) if isinstance(value, Decimal) else value
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
        present = set(map(_category, data.lines))
        if "categories" in names:
            out["categories"] = tuple(sorted(present))
        if "new_categories" in names:
            # The sorted categories not yet bought, filtered as a set before sorting (fewer to sort).
            out["new_categories"] = tuple(sorted(present.difference(customer.categories)))
    if "line_count" in names:
        out["line_count"] = len(data.lines)
    if "skus" in names:
        out["skus"] = tuple(sorted(set(map(_sku, data.lines))))


# Attribute getters run in C, without the frame of a comprehension over an order's few lines.
_category: Final = operator.attrgetter("category")
_sku: Final = operator.attrgetter("sku")


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
    spent = dict(campaign_spent) if campaign_spent else {}
    data = event.data
    tenant = event.tenantid
    customer_id = customer.customer_id
    event_type = event.type
    custom = event_type.startswith(CUSTOM_TYPE_PREFIX)
    if custom and not ruleset.declares(event_type):
        raise EventRefused(
            f"custom event type {event_type!r} is not declared in ruleset {ruleset.ruleset_id!r} v{ruleset.version}"
        )
    if isinstance(data, PurchaseCompleted):
        config = doc.currencies.get(data.currency)
        if config is None:
            raise EventRefused(
                f"unknown currency {data.currency!r}: ruleset {ruleset.ruleset_id!r} v{ruleset.version} "
                f"configures {sorted(doc.currencies)}"
            )
        basket = _Basket.of(ruleset, data, config.points_per_unit)
    else:
        basket = _Basket.empty()

    scope: dict[str, Mapping[str, Any]] = {
        "event": event_view(event, customer, ruleset.event_fields),
        "customer": customer.view(at, ruleset.customer_fields),
    }
    trace: list[RuleOutcome] = []
    fired: list[RuleOutcome] = []
    append = trace.append
    accumulated = 0  # points of earlier rules for the buyer, which a tier multiplier scales
    counters: dict[str, dict[str, int]] = {}
    amounts = basket.amounts
    rate, currency, rounding = basket.rate, basket.currency, doc.rounding
    floor = rounding == "floor"
    rounded = f"({rounding})"  # how every computed explanation ends
    memo = not custom
    skus: Collection[str]
    for position, compiled, indexed, windowed, when, bonus, line in ruleset.steps.get(event_type, ()):
        if indexed and position not in amounts:
            append(compiled.no_line)
            continue
        if windowed:
            if compiled.starts is not None and at < compiled.starts:
                append(compiled.not_yet_valid)
                continue
            if compiled.ends is not None and at >= compiled.ends:
                append(compiled.no_longer_valid)
                continue
        if when is not None:
            met = when.check(scope, memo)
            if met is not True:
                append(
                    compiled.condition_not_met if met is False else RuleOutcome(compiled.rule_id, False, 0, str(met))
                )
                continue
        if bonus or line:
            failed = ""  # a line condition's error on some line (that line counted as not matching)
            if bonus:
                outcome = RuleOutcome(
                    compiled.rule_id, True, compiled.points, compiled.fixed, customer_id, compiled.pending_days, None
                )
            else:
                # A line rule: its eligible amount, then the arithmetic. An indexed rule found in the
                # basket has its amount and (non-empty) SKUs there.
                if indexed:
                    amount, skus = amounts[position], basket.skus[position]
                elif compiled.basket_total:
                    # Every eligible line, and the SKUs do not appear in the explanation: no set to build.
                    if not basket.lines:
                        append(compiled.no_line)
                        continue
                    amount, skus = basket.total, _NO_SKUS
                else:
                    amount, skus, failed = basket.matching(compiled, position, scope)
                    if not skus:
                        append(
                            compiled.no_line
                            if not failed
                            else RuleOutcome(compiled.rule_id, False, 0, f"no eligible line; {failed}")
                        )
                        continue
                raw = amount * rate * compiled.scale
                # _round, inlined: floor below 10**20 is math.floor.
                points = math.floor(raw) if floor and raw.adjusted() < 20 else _round(raw, rounding)
                if points < 0:
                    points = 0
                amount_text = _fmt(amount)
                # Equal non-zero values format alike (the text is of the normalized value): skip a second format.
                raw_text = amount_text if amount and raw == amount else _fmt(raw)
                arithmetic = compiled.arithmetic_texts.get(currency) or compiled.arithmetic(currency, rate)
                if compiled.kind == "line_multiplier":
                    explanation = (
                        f"lines {', '.join(sorted(skus))}: {amount_text}{arithmetic} = {raw_text} → {points} {rounded}"
                    )
                else:
                    explanation = f"{amount_text}{arithmetic} = {raw_text} → {points} {rounded}"
                if failed:
                    explanation += f"; {failed}"
                outcome = RuleOutcome(
                    compiled.rule_id, True, points, explanation, customer_id, compiled.pending_days, None
                )
            if compiled.plain:  # no max_points, campaign, limit or stop: what the general path does, in short
                accumulated += outcome.points
                append(outcome)
                fired.append(outcome)
                continue
            outcomes: list[RuleOutcome] = [outcome]
        elif compiled.kind == "tier_multiplier" and compiled.plain:
            # _apply_rule's tier branch, inlined: it runs on every purchase.
            tier = customer.tier
            cached = compiled.tiers.get(tier)
            if cached is None:
                cached = compiled.tiers[tier] = _tier_factor(compiled.rule, doc.tiers, tier)
            excess, multiplier_text = cached
            raw = Decimal(accumulated) * excess
            points = math.floor(raw) if floor and raw.adjusted() < 20 else _round(raw, rounding)
            if points < 0:
                points = 0
            explanation = (
                f"tier {tier or 'none'}: {accumulated} pts of earlier rules * (multiplier {multiplier_text} - 1)"
                f" = {_fmt(raw)} → {points} {rounded}"
            )
            outcome = RuleOutcome(
                compiled.rule_id,
                True,
                points,
                explanation,
                customer_id,
                compiled.pending_days,
                None,
            )
            accumulated += points
            append(outcome)
            fired.append(outcome)
            continue
        else:
            applied = _apply_rule(compiled, doc, customer, referred, accumulated, at, data)
            if isinstance(applied, str):
                append(RuleOutcome(compiled.rule_id, False, 0, applied))
                continue
            outcomes = applied
        campaign = compiled.campaign
        max_points = compiled.max_points
        for outcome in outcomes:
            outcome.pending_days = compiled.pending_days
            outcome.campaign = campaign
            if max_points is not None and outcome.points > max_points:
                outcome.explanation += f"; capped at the rule's max_points {max_points}"
                outcome.points = max_points
            if campaign is not None:
                budget = compiled.budget
                if budget is not None:
                    left = max(budget - spent.get(campaign, 0), 0)
                    if outcome.points > left:
                        outcome.explanation += f"; campaign {campaign!r} budget leaves {left}"
                        outcome.points = left
                    spent[campaign] = spent.get(campaign, 0) + outcome.points
            if outcome.customer_id == customer_id:
                accumulated += outcome.points
            append(outcome)
            fired.append(outcome)
        limit = compiled.rule.limit
        if limit is not None:
            key = f"limit:{compiled.rule_id}:{period_key(limit.period, at)}"
            counters.setdefault(customer_id, {})[key] = 1
        if compiled.stop:
            trace[-1].explanation += "; stop: no lower-priority rule is evaluated"
            break

    caps = doc.caps
    cap_key = _cap_key(caps.per_customer.period, at.astimezone(UTC).date()) if caps.per_customer is not None else ""
    if caps.per_order is not None or caps.per_customer is not None:
        # `accumulated` is the buyer's fired total already; the trace is summed only for a referred customer.
        totals: dict[str | None, int] = _fired_totals(fired) if referred is not None else {customer_id: accumulated}
        # The fired outcomes, in trace order, are all a trim can cut: no need to walk the skipped ones.
        _apply_caps(doc, fired, customer, referred, at, event_type == PURCHASE, totals, cap_key)
    points_by_customer: dict[str, int] = {}
    campaign_points: dict[str, int] = {}
    # One EarnPoints per (customer, pending period): awards that mature together travel together. The
    # awards and each group's total are built in this pass over the fired outcomes (final after the caps).
    groups: dict[tuple[str, int], list[RuleAward]] = {}
    group_points: dict[tuple[str, int], int] = {}
    fixed, fixed_longest = ruleset.fixed_explanations, ruleset.fixed_longest
    for outcome in fired:  # the fired outcomes, in trace order
        points = outcome.points
        if points:
            cid = outcome.customer_id
            if cid:
                points_by_customer[cid] = points_by_customer.get(cid, 0) + points
                if points > 0:
                    if points > MAX_POINTS:
                        raise EventRefused(f"an award of {points} points exceeds the maximum of {MAX_POINTS}")
                    explanation = outcome.explanation
                    award = (
                        _award(outcome.rule_id, points, explanation)
                        if len(explanation) <= fixed_longest and explanation in fixed
                        # What RuleAward(**fields) runs, without the __init__ call around it.
                        else _validate_award({"rule_id": outcome.rule_id, "points": points, "explanation": explanation})
                    )
                    group = (cid, outcome.pending_days)
                    awards = groups.get(group)
                    if awards is None:
                        groups[group] = [award]
                        group_points[group] = points
                    else:
                        awards.append(award)
                        group_points[group] += points
            if outcome.campaign:
                campaign_points[outcome.campaign] = campaign_points.get(outcome.campaign, 0) + points
    if caps.per_customer is not None:
        for cid, pts in points_by_customer.items():
            counters.setdefault(cid, {})[cap_key] = pts
    commands = _plan_commands(ruleset, event, groups, group_points, tenant, at)
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
        self.total = _ZERO
        self.amounts: dict[int, Decimal] = {}  # indexed rule position -> matching net amount
        self.skus: dict[int, set[str]] = {}
        self.views: list[dict[str, Any]] = []

    @classmethod
    def empty(cls) -> _Basket:
        return cls("", _ZERO)

    @classmethod
    def of(cls, ruleset: CompiledRuleset, data: PurchaseCompleted, rate: Decimal) -> _Basket:
        basket = cls(data.currency, rate)
        ex = ruleset.document.exclusions
        gift_cards, shipping, discounted = ex.gift_cards, ex.shipping, ex.discounted_lines
        excluded_skus, excluded_categories = ruleset.excluded_skus, ruleset.excluded_categories
        # An order sent with its totals only is one anonymous line of its net amount. Built unvalidated:
        # the empty SKU and category are this placeholder's, which an incoming line may not have.
        source = data.lines or [
            PurchaseLine.model_construct(sku="", category="", quantity=Decimal(1), unit_price=data.net_amount)
        ]
        positions_of, positions_cache = ruleset.positions_of, ruleset._positions
        lines, views = basket.lines, basket.views
        amounts, skus = basket.amounts, basket.skus
        total = basket.total
        # The line views (for line conditions), built in the same pass.
        view_fields: Collection[str] | None = None
        if ruleset.has_line_conditions:
            view_fields = LINE_FIELDS if ruleset.line_fields is None else ruleset.line_fields
        for line in source:
            sku, category = line.sku, line.category
            if (
                (gift_cards and line.gift_card)
                or (shipping and line.shipping)
                or (discounted and line.discount > 0)
                or sku in excluded_skus
                or category in excluded_categories
            ):
                continue
            net = line.quantity * line.unit_price - line.discount
            lines.append((line, net))
            if view_fields is not None:
                views.append(_line_view(line, net, view_fields))
            total += net
            positions = positions_cache.get((sku, category))
            if positions is None:
                positions = positions_of(sku, category)
            for position in positions:
                amounts[position] = amounts.get(position, _ZERO) + net
                if position in skus:
                    skus[position].add(sku)
                else:
                    skus[position] = {sku}
        basket.total = total
        return basket

    def matching(
        self, compiled: CompiledRule, position: int, scope: dict[str, Mapping[str, Any]]
    ) -> tuple[Decimal, set[str], str]:
        """The matching amount and SKUs, and why the line condition failed on the first line it failed on
        ("" when it did not): such a line counts as not matching."""
        if compiled.indexed:
            if position in self.amounts:
                return self.amounts[position], self.skus[position], ""
            return Decimal(0), set(), ""
        if compiled.line_when is None and not (compiled.skus or compiled.categories):
            return self.total, {line.sku for line, _ in self.lines}, ""
        amount = _ZERO
        skus: set[str] = set()
        selected_skus, selected_categories = compiled.skus, compiled.categories
        selecting = bool(selected_skus or selected_categories)
        condition = compiled.line_when
        views = self.views  # one per line wherever a rule has a line condition (has_line_conditions)
        failed = ""
        # enumerate, not zip(..., strict=True): compiled, it runs as a native loop over the list.
        for i, (line, net) in enumerate(self.lines):
            # SKU/category from the line itself: the view holds only the fields conditions read.
            if selecting and line.sku not in selected_skus and line.category not in selected_categories:
                continue
            if condition is not None:
                scope["line"] = views[i]
                met = condition.check(scope, True)
                if met is not True:
                    if met is not False and not failed:
                        failed = f"line {line.sku!r} not matched: {met}"
                    continue
            amount += net
            skus.add(line.sku)
        scope.pop("line", None)
        return amount, skus, failed


def _apply_rule(
    compiled: CompiledRule,
    doc: RulesetDocument,
    customer: CustomerSnapshot,
    referred: CustomerSnapshot | None,
    accumulated: int,
    at: datetime,
    data: Any,
) -> list[RuleOutcome] | str:
    """The outcomes of a rule the evaluation loop does not compute itself (not a line rule), or why it
    did not apply."""
    rule = compiled.rule
    cid = customer.customer_id
    rounding = doc.rounding
    if rule.kind == "bonus":
        assert rule.points is not None
        return [RuleOutcome(rule.id, True, rule.points, compiled.fixed, cid)]
    if rule.kind == "tier_multiplier":
        tier = customer.tier
        cached = compiled.tiers.get(tier)
        if cached is None:
            cached = compiled.tiers[tier] = _tier_factor(rule, doc.tiers, tier)
        excess, multiplier_text = cached
        raw = Decimal(accumulated) * excess
        points = max(_round(raw, rounding), 0)
        how = f"tier {tier or 'none'}: {accumulated} pts of earlier rules * (multiplier {multiplier_text} - 1)"
        return [RuleOutcome(rule.id, True, points, f"{how} = {_fmt(raw)} → {points} ({rounding})", cid)]
    # engagement
    assert rule.points is not None
    if rule.limit is not None:
        key = f"limit:{rule.id}:{period_key(rule.limit.period, at)}"
        if customer.counters.get(key, 0) >= rule.limit.count:
            return f"limit of {rule.limit.count} per {rule.limit.period} reached"
    out = [RuleOutcome(rule.id, True, rule.points, compiled.fixed, cid)]
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


def _tier_factor(rule: Rule, tiers: Tiers | None, tier: str | None) -> tuple[Decimal, str]:
    """(multiplier - 1, the multiplier as the explanation writes it)."""
    multiplier = _tier_multiplier(rule, tiers, tier)
    return multiplier - 1, _fmt(multiplier)


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
    totals: dict[str | None, int] | None = None,
    key: str = "",
) -> None:
    # Caps trim the lowest-priority awards first, so the rules the programme ranks highest keep theirs.
    # The totals (fired points per customer) are summed once; the trace is walked again only to trim.
    # A cap's text is written only where it trims (its total is over the cap), so _trim takes it ready-made.
    if totals is None:
        totals = _fired_totals(trace)
    caps = doc.caps
    per_order = caps.per_order
    if is_purchase and per_order is not None:
        total = totals.get(customer.customer_id, 0)
        if total > per_order:
            _trim(trace, customer.customer_id, per_order, f"per-order cap {per_order}", total)
            totals[customer.customer_id] = per_order
    cap = caps.per_customer
    if cap is not None:
        key = key or f"cap:{period_key(cap.period, at)}"
        for snapshot in (customer, referred):
            if snapshot is None:
                continue
            left = max(cap.points - snapshot.counters.get(key, 0), 0)
            total = totals.get(snapshot.customer_id, 0)
            if total <= left:
                continue
            _trim(
                trace, snapshot.customer_id, left, f"per-customer cap {cap.points} per {cap.period}, {left} left", total
            )
            totals[snapshot.customer_id] = left


def _fired_totals(trace: list[RuleOutcome]) -> dict[str | None, int]:
    totals: dict[str | None, int] = {}
    for outcome in trace:
        if outcome.fired:
            totals[outcome.customer_id] = totals.get(outcome.customer_id, 0) + outcome.points
    return totals


def _trim(trace: list[RuleOutcome], customer_id: str, allowed: int, why: str, total: int | None = None) -> None:
    """Cuts the customer's fired points down to `allowed` (their `total` when the caller has it); `why`
    names the cap in the explanation of each award it cuts."""
    if total is None:
        total = sum(o.points for o in trace if o.fired and o.customer_id == customer_id)
    excess = total - allowed
    if excess <= 0:
        return
    suffix = f" by the {why}"
    for outcome in reversed(trace):
        if excess <= 0:
            return
        points = outcome.points
        if points == 0 or not outcome.fired or outcome.customer_id != customer_id:
            continue
        cut = excess if excess < points else points  # min(points, excess)
        outcome.points = points - cut
        outcome.explanation += f"; -{cut}{suffix}"
        excess -= cut


def _plan_commands(
    ruleset: CompiledRuleset,
    event: CloudEvent[Any],
    groups: dict[tuple[str, int], list[RuleAward]],
    group_points: dict[tuple[str, int], int],
    tenant: str,
    at: datetime,
) -> list[PlannedEarn]:
    """One EarnPoints per (customer, pending period) group: its awards and total points."""
    member = getattr(event.data, "member_id", None)
    buyer = getattr(event.data, "customer_id", None)
    prefix = f"{tenant}|{event.id}{ruleset.command_id_part}"
    out = []
    for group, breakdown in groups.items():
        cid, pending = group
        if group_points[group] > MAX_POINTS:
            # More than a points command may carry (the ledger's bound): the event is refused, not cut.
            raise EventRefused(f"an award of {group_points[group]} points exceeds the maximum of {MAX_POINTS}")
        out.append(
            PlannedEarn(
                # command_id("earn", ...) inlined: the same text, hashed.
                "earn-" + hashlib.sha256(f"{prefix}{cid}|{pending}".encode()).hexdigest()[:32],
                cid,
                member if cid == buyer else None,
                group_points[group],
                at + _days(pending) if pending else None,
                breakdown,
            )
        )
    return out


@functools.lru_cache(maxsize=64)
def _days(days: int) -> timedelta:
    return timedelta(days=days)


_AWARDS: Final[dict[tuple[str, int, str], RuleAward]] = {}
_validate_award: Final[Callable[[dict[str, Any]], RuleAward]] = RuleAward.__pydantic_validator__.validate_python


def _award(rule_id: str, points: int, explanation: str) -> RuleAward:
    """A RuleAward with a fixed explanation (a bonus: the same on every event); frozen, so shared."""
    key = (rule_id, points, explanation)
    award = _AWARDS.get(key)
    if award is None:
        award = RuleAward(rule_id=rule_id, points=points, explanation=explanation)
        if len(_AWARDS) >= MEMO_LIMIT:
            _AWARDS.clear()
        _AWARDS[key] = award
    return award


# --- state changes ---------------------------------------------------------------------------------


def apply_event(
    state: CustomerSnapshot, event: CloudEvent[Any], *, spend_factor: Decimal, points: int, counters: Mapping[str, int]
) -> None:
    """Folds an evaluated event into the customer's state (after evaluation: rules see the state before)."""
    at = event_time(event)
    data = event.data
    month = month_key(at) if points or isinstance(data, PurchaseCompleted) else ""
    if isinstance(data, PurchaseCompleted):
        state.purchase_count += 1
        first, last = state.first_purchase_at, state.last_purchase_at
        state.first_purchase_at = at if first is None or at < first else first
        state.last_purchase_at = at if last is None or at > last else last
        state.spend_by_month[month] = state.spend_by_month.get(month, _ZERO) + data.net_amount * spend_factor
        state.categories.update(map(_category, data.lines))
    if points:
        state.points_by_month[month] = state.points_by_month.get(month, 0) + points
    for key, increment in counters.items():
        state.counters[key] = state.counters.get(key, 0) + increment
    _prune(state, at)


def _prune(state: CustomerSnapshot, at: datetime) -> None:
    # Only the last 13 months matter for rolling figures; counters of past periods are never read again.
    # The maps are rebuilt only when they hold something to drop (most events drop nothing).
    # A month key below the oldest kept one exists when the smallest key is below it.
    oldest, year = _kept_from(at.year, at.month)
    if state.spend_by_month and min(state.spend_by_month) < oldest:
        state.spend_by_month = {k: v for k, v in state.spend_by_month.items() if k >= oldest}
    if state.points_by_month and min(state.points_by_month) < oldest:
        state.points_by_month = {k: v for k, v in state.points_by_month.items() if k >= oldest}
    for key in state.counters:
        if _period_year(key) < year:
            state.counters = {k: v for k, v in state.counters.items() if _period_year(k) >= year}
            break


def _period_year(counter_key: str) -> str:
    """The year a counter's period starts with: the period follows the key's last colon."""
    # What key.rpartition(":")[2][:4] gives, with one small string built instead of a tuple of three.
    start = counter_key.rfind(":") + 1
    return counter_key[start : start + 4]


@functools.lru_cache(maxsize=512)
def _kept_from(year: int, month: int) -> tuple[str, str]:
    """The oldest month key kept and the oldest year a counter's period may start with."""
    return min(_months_back_from(year, month, 13)), str(year - 1)


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
    # One pass: the highest level whose threshold the value reaches, and the first level named as the
    # customer's tier (None: not a level of these tiers).
    qualified = 0
    current = None
    tier = state.tier
    for i, level in enumerate(tiers.levels):
        if value >= level.threshold:
            qualified = i
        if current is None and level.name == tier:
            current = i
    if current is not None and qualified == current:
        if state.tier_reviewed_at is None or at >= state.tier_reviewed_at + _days(tiers.review_every_days):
            state.tier_reviewed_at = at  # a review that keeps the tier restarts the schedule
        return None
    names = [lv.name for lv in tiers.levels]
    basis = f"{tiers.basis} {_fmt(value)}"  # only for a change: formatting is most of an unchanged review
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
    else:  # qualified == current, handled above
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
