"""The ruleset document (YAML or JSON): its model, parsing and validation.

Validation reports every problem it finds, each naming the rule (when it is inside one), the path in
the document and, for YAML input, the line and column, so an author can fix a version in one go.
Conditions are CEL expressions; they are compiled here once to catch syntax errors and unknown
variables, and compiled again (once per version) by the engine.

Limits (docs/rules.md, "Limits"): a document is at most MAX_SOURCE_BYTES of text, MAX_NODES values and
MAX_DEPTH levels of nesting; YAML anchors and aliases are refused (a few hundred bytes of nested aliases
describe billions of nodes). A condition is at most MAX_CONDITION_LENGTH characters (all of a document's
conditions MAX_CONDITIONS_LENGTH) with at most MAX_COMPREHENSIONS comprehension macros (`all`, `exists`,
`exists_one`, one `filter`; not `map`), none nested in another, each over a field (`event.skus`, not a
computed list) and reading only its own variable, and at most one `matches` on a short literal pattern:
the CEL library has no cost limit, copies a comprehension's accumulator on every step and compiles a
pattern on every call, so these bound what one evaluation can cost (the engine's input budget bounds
the rest). Parsing is CPU work: the service
runs it off the event loop.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any, Literal

import cel
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.events import CUSTOM_TYPE_PREFIX, EVENT_TYPES, UtcDatetime

Period = Literal["day", "week", "month", "quarter", "year"]
Rounding = Literal["floor", "half_up", "half_even", "ceil"]
RuleKind = Literal["points_per_unit", "line_multiplier", "bonus", "tier_multiplier", "engagement"]

PURCHASE = "purchase.completed"
ENGAGEMENT_TYPES = frozenset({"review.posted", "referral.converted", "survey.answered", "event.attended"})
# What a condition may read; `line` only in a line condition.
EVENT_VARIABLES = frozenset({"event", "customer"})
LINE_VARIABLES = frozenset({"event", "customer", "line"})

MAX_SOURCE_BYTES = 256 * 1024
MAX_NODES = 50_000  # scalars, sequences and mappings
MAX_DEPTH = 16  # the deepest a valid ruleset needs is 5 (rules[i].multipliers.<tier>)
MAX_CONDITION_LENGTH = 500
MAX_CONDITIONS_LENGTH = 2_000  # all conditions of a document: what one event may have to run
MAX_COMPREHENSIONS = 2
COMPREHENSIONS = frozenset({"all", "exists", "exists_one", "filter"})
REFUSED_MACROS = frozenset({"map"})
# CEL compiles a regular expression on every call; Unicode classes and counted repetitions make that
# compilation cost up to ~75 ms (`\\w{1000}`), so a pattern is one short literal without them.
MAX_PATTERN_LENGTH = 100
_COSTLY_PATTERN = re.compile(r"\{|\\\\?[wWdDsSpPbBX]")

PositiveDecimal = Annotated[Decimal, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CurrencyConfig(_Doc):
    points_per_unit: PositiveDecimal
    # Converts an amount in this currency into the programme's reference currency for tier spend.
    spend_factor: PositiveDecimal = Decimal(1)


class Exclusions(_Doc):
    gift_cards: bool = True
    shipping: bool = True
    discounted_lines: bool = False
    skus: list[str] = Field(default_factory=list)
    categories: list[str] = Field(default_factory=list)


class PeriodCap(_Doc):
    points: Annotated[int, Field(gt=0)]
    period: Period


class Caps(_Doc):
    per_order: Annotated[int, Field(gt=0)] | None = None
    per_customer: PeriodCap | None = None


class Campaign(_Doc):
    starts_at: UtcDatetime | None = None
    ends_at: UtcDatetime | None = None
    budget: Annotated[int, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Campaign:
        if self.starts_at and self.ends_at and self.ends_at <= self.starts_at:
            raise ValueError("ends_at must be after starts_at")
        return self


class TierLevel(_Doc):
    name: Annotated[str, Field(min_length=1, max_length=40)]
    threshold: Annotated[Decimal, Field(ge=0)]
    multiplier: PositiveDecimal = Decimal(1)


class Tiers(_Doc):
    basis: Literal["spend_12m", "points_12m"] = "spend_12m"
    review_every_days: Annotated[int, Field(ge=1)] = 90
    downgrade: Literal["one_level", "to_qualified", "never"] = "one_level"
    levels: Annotated[list[TierLevel], Field(min_length=1)]

    @field_validator("levels")
    @classmethod
    def _ascending(cls, levels: list[TierLevel]) -> list[TierLevel]:
        names = [lv.name for lv in levels]
        if len(set(names)) != len(names):
            raise ValueError("tier names must be unique")
        thresholds = [lv.threshold for lv in levels]
        if thresholds != sorted(thresholds) or len(set(thresholds)) != len(thresholds):
            raise ValueError("tier thresholds must be strictly ascending, lowest level first")
        return levels


class Limit(_Doc):
    count: Annotated[int, Field(gt=0)]
    period: Period


class Rule(_Doc):
    id: Annotated[str, Field(min_length=1, max_length=80, pattern=r"^[A-Za-z0-9_.:-]+$")]
    kind: RuleKind
    description: str = ""
    priority: int = 0
    when: str | None = Field(default=None, description="CEL over event and customer; the rule applies when true")
    stop: bool = Field(default=False, description="When the rule fires, no lower-priority rule is evaluated")
    campaign: str | None = None
    valid_from: UtcDatetime | None = None
    valid_until: UtcDatetime | None = None
    max_points: Annotated[int, Field(gt=0)] | None = Field(default=None, description="Cap of this rule per event")
    pending_days: NonNegativeInt | None = None
    # points_per_unit / line_multiplier: which lines
    skus: list[str] = Field(default_factory=list)
    categories: list[str] = Field(default_factory=list)
    line_when: str | None = Field(default=None, description="CEL over event, customer and line")
    factor: PositiveDecimal = Decimal(1)
    multiplier: PositiveDecimal | None = None
    # bonus / engagement
    points: NonNegativeInt | None = None
    # engagement
    on: str | None = None
    referred_points: NonNegativeInt | None = None
    limit: Limit | None = None
    # tier_multiplier: overrides the tier levels' multipliers
    multipliers: dict[str, PositiveDecimal] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _kind_fields(self) -> Rule:
        if self.kind == "line_multiplier":
            if self.multiplier is None:
                raise ValueError("a line_multiplier rule needs 'multiplier'")
            if not (self.skus or self.categories or self.line_when):
                raise ValueError("a line_multiplier rule needs 'skus', 'categories' or 'line_when'")
        if self.kind == "bonus" and self.points is None:
            raise ValueError("a bonus rule needs 'points'")
        if self.kind == "engagement":
            if self.on is None or self.points is None:
                raise ValueError("an engagement rule needs 'on' (an event type) and 'points'")
        elif self.on is not None or self.referred_points is not None or self.limit is not None:
            raise ValueError("'on', 'referred_points' and 'limit' belong to engagement rules")
        if self.referred_points is not None and self.on != "referral.converted":
            raise ValueError("'referred_points' only applies to referral.converted")
        if self.valid_from and self.valid_until and self.valid_until <= self.valid_from:
            raise ValueError("valid_until must be after valid_from")
        return self

    @property
    def event_type(self) -> str:
        return self.on if self.kind == "engagement" and self.on else PURCHASE


class RulesetDocument(_Doc):
    name: Annotated[str, Field(min_length=1, max_length=200)] = "default"
    description: str = ""
    currencies: Annotated[dict[Annotated[str, Field(pattern=r"^[A-Z]{3}$")], CurrencyConfig], Field(min_length=1)]
    rounding: Rounding = "floor"
    pending_days: NonNegativeInt = 0
    exclusions: Exclusions = Field(default_factory=Exclusions)
    caps: Caps = Field(default_factory=Caps)
    campaigns: dict[str, Campaign] = Field(default_factory=dict)
    tiers: Tiers | None = None
    custom_events: list[Annotated[str, Field(pattern=r"^[a-z0-9_.-]+$")]] = Field(default_factory=list)
    rules: list[Rule] = Field(default_factory=list)

    def ordered_rules(self) -> list[Rule]:
        # Higher priority first; equal priorities keep document order (sorted() is stable).
        return sorted(self.rules, key=lambda r: -r.priority)


@dataclass(frozen=True)
class Problem:
    message: str
    path: str
    rule: str | None = None
    line: int | None = None
    column: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "path": self.path, "line": self.line, "column": self.column, "message": self.message}


class RulesetInvalid(ValueError):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(_describe(p) for p in problems))
        self.problems = problems


def _describe(p: Problem) -> str:
    where = f"rule {p.rule!r} at {p.path}" if p.rule else p.path or "document"
    if p.line is not None:
        where += f" (line {p.line}, column {p.column})"
    return f"{where}: {p.message}"


Path = tuple[str | int, ...]


def _format_path(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _positions(node: yaml.Node, path: Path = (), out: dict[Path, tuple[int, int]] | None = None) -> dict[Path, Any]:
    """Path in the document -> (line, column), 1-based, from the YAML node tree."""
    out = {} if out is None else out
    out[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            _positions(value, (*path, key.value), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _positions(item, (*path, i), out)
    return out


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 would read the key `on:` (engagement rules) as True."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_source(source: str | dict[str, Any]) -> tuple[dict[str, Any], dict[Path, Any]]:
    """The document as a dict plus positions (YAML text only); raises RulesetInvalid on a syntax error or
    a document over the limits."""
    if isinstance(source, dict):
        _check_tree(source)
        return source, {}
    if len(source) > MAX_SOURCE_BYTES or len(source.encode("utf-8", "surrogatepass")) > MAX_SOURCE_BYTES:
        raise RulesetInvalid([Problem(f"the document is larger than {MAX_SOURCE_BYTES} bytes", "")])
    try:
        _check_events(source)
        loader = _Loader(source)
        try:
            node = loader.get_single_node()
            # Unquoted YAML timestamps load as datetimes, which pydantic accepts like the JSON strings.
            doc = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except RulesetInvalid:
        raise
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line, column = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
        raise RulesetInvalid([Problem(f"not valid YAML/JSON: {exc}", "", None, line, column)]) from exc
    except Exception as exc:  # whatever turns text into objects fails on bad input, not on ours
        raise RulesetInvalid([Problem(f"not valid YAML/JSON: {type(exc).__name__}", "")]) from exc
    if not isinstance(doc, dict) or node is None:
        raise RulesetInvalid([Problem("the document must be a mapping (YAML) or an object (JSON)", "")])
    return doc, _positions(node)


def _check_events(source: str) -> None:
    """Refuses anchors, aliases and documents over the node or depth limit, streaming the parser's events
    (so nothing is built before the limits hold)."""
    nodes = depth = 0
    for event in yaml.parse(source, Loader=_Loader):
        mark = event.start_mark
        at = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            message = "YAML anchors and aliases (&name, *name, <<) are not accepted; write the values out"
            raise RulesetInvalid([Problem(message, "", None, *at)])
        if isinstance(event, yaml.ScalarEvent | yaml.CollectionStartEvent):
            nodes += 1
            if nodes > MAX_NODES:
                raise RulesetInvalid([Problem(f"the document has more than {MAX_NODES} values", "", None, *at)])
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                message = f"the document is nested deeper than {MAX_DEPTH} levels"
                raise RulesetInvalid([Problem(message, "", None, *at)])
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _check_tree(doc: dict[str, Any]) -> None:
    """The limits of a YAML document, for one given as JSON (already parsed): values, depth, and text
    that UTF-8 can encode (a lone surrogate passes JSON decoding and fails when stored)."""
    nodes = 0
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise RulesetInvalid([Problem(f"the document has more than {MAX_NODES} values", "")])
        if isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                raise RulesetInvalid([Problem(f"the document is nested deeper than {MAX_DEPTH} levels", "")])
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)
            if isinstance(value, dict):
                stack.extend((key, depth + 1) for key in value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise RulesetInvalid([Problem("the document holds text that is not valid Unicode", "")]) from exc


def parse(source: str | dict[str, Any]) -> RulesetDocument:
    """Parses and validates a ruleset document; raises RulesetInvalid listing every problem."""
    doc, positions = load_source(source)
    rule_ids = _rule_ids(doc)

    def problem(message: str, path: Path) -> Problem:
        rule = rule_ids.get(path[1]) if len(path) > 1 and path[0] == "rules" and isinstance(path[1], int) else None
        line, column = _nearest(positions, path)
        return Problem(message, _format_path(path), rule, line, column)

    try:
        document = RulesetDocument.model_validate(doc)
    except ValidationError as exc:
        raise RulesetInvalid([problem(e["msg"], tuple(e["loc"])) for e in exc.errors()]) from exc
    problems = [problem(msg, path) for msg, path in _semantic_problems(document)]
    if problems:
        raise RulesetInvalid(problems)
    return document


def _rule_ids(doc: dict[str, Any]) -> dict[int, str]:
    rules = doc.get("rules")
    if not isinstance(rules, list):
        return {}
    return {i: str(r["id"]) for i, r in enumerate(rules) if isinstance(r, dict) and "id" in r}


def _nearest(positions: dict[Path, Any], path: Path) -> tuple[int | None, int | None]:
    for end in range(len(path), -1, -1):
        hit = positions.get(path[:end])
        if hit is not None:
            return hit[0], hit[1]
    return None, None


def check_condition(source: str, allowed: frozenset[str]) -> str | None:
    """None when `source` compiles, reads only allowed variables and stays within the cost limits, else
    the reason."""
    limit = condition_limits(source)
    if limit is not None:
        return limit
    try:
        program = cel.compile(source)
    except Exception as exc:  # the parser's errors, whatever their class
        return f"CEL: {_shorten(str(exc))}"
    tokens = _tokens(source)
    unknown = sorted(set(program.variables()) - allowed - _bound_names(tokens))
    if unknown:
        return f"CEL: unknown variable(s) {unknown}; a condition can read {sorted(allowed)}"
    return _comprehension_problem(tokens, allowed) or _pattern_problem(tokens or [])


def condition_limits(source: str) -> str | None:
    """The limit a condition's text breaks before it is compiled (the engine refuses such a condition
    of a version stored before the limit existed), or None."""
    if len(source) > MAX_CONDITION_LENGTH:
        return f"CEL: the condition is longer than {MAX_CONDITION_LENGTH} characters"
    tokens = _tokens(source)
    if tokens is None:
        return None  # unterminated text: the compiler names the error
    return _comprehension_problem(tokens, None) or _pattern_problem(tokens)


def _pattern_problem(tokens: list[Token]) -> str | None:
    """matches(): once per condition, outside comprehensions (which would compile it per item), on a
    short literal pattern without Unicode classes or counted repetition."""
    calls = [i for i, token in enumerate(tokens) if token == ("name", "matches")]
    if len(calls) > 1:
        return "CEL: matches() at most once per condition"
    for i in calls:
        if tokens[i - 1 : i] != [("punct", ".")] or tokens[i + 1 : i + 2] != [("punct", "(")]:
            return "CEL: write matches() as text.matches('pattern')"
        pattern = tokens[i + 2] if i + 2 < len(tokens) else ("", "")
        if pattern[0] != "text" or tokens[i + 3 : i + 4] != [("punct", ")")]:
            return "CEL: the pattern of matches() must be a string literal"
        if len(pattern[1]) > MAX_PATTERN_LENGTH:
            return f"CEL: the pattern of matches() is longer than {MAX_PATTERN_LENGTH} characters"
        if _COSTLY_PATTERN.search(pattern[1]):
            return r"CEL: a pattern of matches() may not use repetition counts ({n}) or classes like \w, \d, \s, \p"
        for j in _macro_positions(tokens):
            if j < i < _closing(tokens, j + 1):
                return "CEL: matches() inside a comprehension (it would compile the pattern for every item)"
    return None


def _macro_positions(tokens: list[Token]) -> list[int]:
    return [i for i in range(len(tokens)) if _macro_at(tokens, i)]


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


Token = tuple[str, str]  # (kind: "name" | "text" | "number" | "punct", text)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"[0-9][A-Za-z0-9_.]*")
_STRING_START = re.compile(r"(?:[rR][bB]?|[bB][rR]?)?(\"\"\"|'''|\"|')")


def _tokens(source: str) -> list[Token] | None:
    """CEL's tokens as far as the limits need them (names, punctuation; literals as opaque), or None
    when a string literal is not closed."""
    out: list[Token] = []
    i, n = 0, len(source)
    while i < n:
        c = source[i]
        if c.isspace():
            i += 1
        elif source.startswith("//", i):
            end = source.find("\n", i)
            i = n if end < 0 else end + 1
        elif (quote := _STRING_START.match(source, i)) is not None:
            delimiter = quote.group(1)
            raw = quote.group(0)[: -len(delimiter)].lower().count("r") > 0
            j = quote.end()
            while True:
                if j >= n:
                    return None
                if not raw and source[j] == "\\":
                    j += 2
                elif source.startswith(delimiter, j):
                    j += len(delimiter)
                    break
                elif len(delimiter) == 1 and source[j] == "\n":
                    return None
                else:
                    j += 1
            out.append(("text", source[i:j]))
            i = j
        elif (name := _NAME.match(source, i)) is not None:
            out.append(("name", name.group(0)))
            i = name.end()
        elif (number := _NUMBER.match(source, i)) is not None:
            out.append(("number", number.group(0)))
            i = number.end()
        else:
            out.append(("punct", c))
            i += 1
    return out


def _macro_at(tokens: list[Token], i: int) -> bool:
    """Whether tokens[i] names a macro call `.<name>(`."""
    return (
        i > 0
        and tokens[i][0] == "name"
        and tokens[i - 1] == ("punct", ".")
        and i + 1 < len(tokens)
        and tokens[i + 1] == ("punct", "(")
        and tokens[i][1] in COMPREHENSIONS | REFUSED_MACROS
    )


def _bound_names(tokens: list[Token] | None) -> set[str]:
    # A macro's first argument is the name it binds; CEL reports it among the variables.
    if tokens is None:
        return set()
    return {tokens[i + 2][1] for i in range(len(tokens) - 2) if _macro_at(tokens, i) and tokens[i + 2][0] == "name"}


def _closing(tokens: list[Token], open_at: int) -> int:
    """The index of the bracket closing tokens[open_at] (len(tokens) when unbalanced)."""
    depth = 0
    for j in range(open_at, len(tokens)):
        kind, text = tokens[j]
        if kind == "punct" and text in "([{":
            depth += 1
        elif kind == "punct" and text in ")]}":
            depth -= 1
            if depth == 0:
                return j
    return len(tokens)


def _comprehension_problem(tokens: list[Token] | None, variables: frozenset[str] | None) -> str | None:
    """The comprehension limits: how many, not nested, over a field, reading only their own variable
    (when `variables` names the condition's inputs)."""
    if tokens is None:
        return None
    macros = _macro_positions(tokens)
    for i in macros:
        name = tokens[i][1]
        if name in REFUSED_MACROS:
            return f"CEL: {name}() is not available in a condition; use exists(), all() or filter()"
        end = _closing(tokens, i + 1)
        if any(i + 1 < j < end for j in macros):
            return f"CEL: a comprehension inside {name}() (nested comprehensions are not accepted)"
    if len(macros) > MAX_COMPREHENSIONS:
        return f"CEL: more than {MAX_COMPREHENSIONS} comprehensions (all, exists, exists_one, filter)"
    if sum(tokens[i][1] == "filter" for i in macros) > 1:
        # filter() copies its growing result on every step: quadratic in the list's length
        return "CEL: filter() at most once per condition"
    for i in macros:
        name = tokens[i][1]
        end = _closing(tokens, i + 1)
        # The receiver: a field path `var.field(.field)*`, so the comprehension walks an input, whose size
        # the engine's budget bounds, not a list computed (and grown) by the expression.
        j = i - 2
        while j >= 2 and tokens[j][0] == "name" and tokens[j - 1] == ("punct", "."):
            j -= 2
        if j < 0 or tokens[j][0] != "name" or (j > 0 and tokens[j - 1] == ("punct", ".")):
            return f"CEL: {name}() must be called on a field (like event.skus), not on a computed value"
        if variables is not None:
            bound = tokens[i + 2][1] if i + 2 < len(tokens) else ""
            for j in range(i + 2, end):
                kind, text = tokens[j]
                if kind == "name" and text in variables and text != bound and tokens[j - 1] != ("punct", "."):
                    return f"CEL: inside {name}() a condition reads only the comprehension's own variable, not {text!r}"
    return None


def _semantic_problems(doc: RulesetDocument) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    seen: dict[str, int] = {}
    known_tiers = {lv.name for lv in doc.tiers.levels} if doc.tiers else set()
    custom = {f"{CUSTOM_TYPE_PREFIX}{name}" for name in doc.custom_events}
    for i, rule in enumerate(doc.rules):
        at: Path = ("rules", i)
        if rule.id in seen:
            out.append((f"duplicate rule id {rule.id!r} (first at rules[{seen[rule.id]}])", (*at, "id")))
        seen.setdefault(rule.id, i)
        if rule.when is not None:
            reason = check_condition(rule.when, EVENT_VARIABLES)
            if reason:
                out.append((reason, (*at, "when")))
        if rule.line_when is not None:
            if rule.kind not in ("points_per_unit", "line_multiplier"):
                out.append(
                    ("'line_when' only applies to points_per_unit and line_multiplier rules", (*at, "line_when"))
                )
            reason = check_condition(rule.line_when, LINE_VARIABLES)
            if reason:
                out.append((reason, (*at, "line_when")))
        if rule.campaign is not None and rule.campaign not in doc.campaigns:
            out.append((f"unknown campaign {rule.campaign!r}; declared: {sorted(doc.campaigns)}", (*at, "campaign")))
        if rule.kind == "engagement" and rule.on is not None:
            if rule.on not in ENGAGEMENT_TYPES and rule.on not in custom:
                known = sorted(ENGAGEMENT_TYPES | custom)
                out.append((f"unknown engagement event type {rule.on!r}; known: {known}", (*at, "on")))
        if rule.kind == "tier_multiplier":
            if doc.tiers is None:
                out.append(("a tier_multiplier rule needs a 'tiers' section", (*at, "kind")))
            for name in rule.multipliers:
                if name not in known_tiers:
                    out.append((f"unknown tier {name!r}; defined: {sorted(known_tiers)}", (*at, "multipliers", name)))
    total = sum(len(rule.when or "") + len(rule.line_when or "") for rule in doc.rules)
    if total > MAX_CONDITIONS_LENGTH:
        out.append((f"the conditions add up to {total} characters; at most {MAX_CONDITIONS_LENGTH}", ("rules",)))
    for name in doc.custom_events:
        if f"{CUSTOM_TYPE_PREFIX}{name}" in EVENT_TYPES:
            out.append((f"custom event {name!r} clashes with a built-in type", ("custom_events",)))
    return out


def canonical_json(doc: RulesetDocument) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(doc.model_dump_json(exclude_defaults=False))
    return result
