"""A ruleset version compiled for evaluation: its rules in evaluation order per event type, their conditions
compiled, and everything that depends only on the version computed once (windows and their messages, the
line index, the fields the conditions read, fixed explanations and outcomes). Versions never change, so
a compiled one is kept (rules.batch.RulesetCache)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from rules.engine.basics import MEMO_LIMIT, fmt, period_key
from rules.engine.conditions import Condition
from rules.engine.outcomes import RuleOutcome
from rules.ruleset import Limit, Rule, RulesetDocument, Tiers
from shared.events import CUSTOM_TYPE_PREFIX


@dataclass
class CompiledRule:
    """One rule as the evaluation loop reads it: plain attributes (compiled, each read is a C field), copied
    from the rule or computed from it and the document once per version."""

    rule: Rule
    position: int  # in the version's evaluation order (the line index names rules by it)
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
    limit: Limit | None = None
    # The rule's kind as flags, for the loop's dispatch (engagement: none of them).
    bonus: bool = False
    line_rule: bool = False
    tier: bool = False
    plain: bool = False  # no max_points, campaign, limit or stop: a fired outcome needs no adjustment
    whole_basket: bool = False  # a line rule over every eligible line
    basket_total: bool = False  # a points_per_unit rule over every eligible line: the basket's total
    scale: Decimal = Decimal(1)  # a line rule's factor, or its multiplier - 1
    # The fixed part of a line rule's explanation per currency: within a version the currency decides the
    # rate (its points_per_unit), so the currency alone keys it and the evaluation loop reads it directly.
    arithmetic_texts: dict[str, str] = field(default_factory=dict)
    _skipped: dict[str, RuleOutcome] = field(default_factory=dict)
    tier_factors: dict[str | None, tuple[Decimal, str]] = field(default_factory=dict)  # tier -> (multiplier - 1, text)
    # The outcomes of not firing for the fixed reasons, built once (plain attributes, not cached properties:
    # mypyc compiles a cached_property into a getter that recomputes it on every read).
    no_line: RuleOutcome = field(init=False, repr=False, compare=False)
    condition_not_met: RuleOutcome = field(init=False, repr=False, compare=False)
    not_yet_valid: RuleOutcome = field(init=False, repr=False, compare=False)
    no_longer_valid: RuleOutcome = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rule = self.rule
        self.bonus = rule.kind == "bonus"
        self.line_rule = rule.kind in ("points_per_unit", "line_multiplier")
        self.tier = rule.kind == "tier_multiplier"
        self.plain = rule.max_points is None and rule.campaign is None and rule.limit is None and not rule.stop
        self.whole_basket = self.line_rule and not (rule.skus or rule.categories or rule.line_when)
        self.basket_total = self.whole_basket and rule.kind == "points_per_unit"
        if rule.kind == "points_per_unit":
            self.scale = rule.factor
        elif rule.kind == "line_multiplier" and rule.multiplier is not None:
            self.scale = rule.multiplier - 1
        self.rule_id, self.kind, self.points = rule.id, rule.kind, rule.points or 0
        self.campaign, self.max_points, self.stop, self.limit = rule.campaign, rule.max_points, rule.stop, rule.limit
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
                text = f" {currency} eligible * {fmt(rate)} pt/{currency} * factor {fmt(self.rule.factor)}"
            else:
                assert self.rule.multiplier is not None
                text = f" {currency} * {fmt(rate)} pt/{currency} * (multiplier {fmt(self.rule.multiplier)} - 1)"
            self.arithmetic_texts[currency] = text
        return text

    def limit_key(self, at: datetime) -> str:
        """The counter of the rule's limit for the period of `at`."""
        assert self.limit is not None
        return f"limit:{self.rule_id}:{period_key(self.limit.period, at)}"

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
    by_type: dict[str, list[CompiledRule]] = field(default_factory=dict)  # in evaluation order
    # The fields of `event`, `customer` and `line` that any condition reads (None: the whole map): the
    # views built per event hold only those, with the values the full views would give them.
    event_fields: frozenset[str] | None = None
    customer_fields: frozenset[str] | None = None
    line_fields: frozenset[str] | None = None
    excluded_skus: frozenset[str] = frozenset()
    excluded_categories: frozenset[str] = frozenset()
    # (SKU, category) -> positions_of(SKU, category): what a line of an order matches.
    line_positions: dict[tuple[str, str], tuple[int, ...]] = field(default_factory=dict)

    fixed_explanations: frozenset[str] = frozenset()
    # The length of the longest fixed explanation: a longer one is not looked up (not hashed) among them.
    fixed_longest: int = field(init=False, repr=False, compare=False)
    # The version's part of the text an earn command's id hashes, after the tenant and the event id.
    command_id_part: str = field(init=False, repr=False, compare=False)
    # The document's rounding and tiers, read by the rules that compute points (a C field each, compiled).
    rounding: str = field(init=False, repr=False, compare=False)
    tiers: Tiers | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.fixed_explanations = frozenset(r.fixed for r in self.rules if r.fixed)
        self.fixed_longest = max(map(len, self.fixed_explanations), default=0)
        self.excluded_skus = frozenset(self.document.exclusions.skus)
        self.excluded_categories = frozenset(self.document.exclusions.categories)
        self.command_id_part = f"|{self.ruleset_id}|{self.version}|"
        self.rounding = self.document.rounding
        self.tiers = self.document.tiers

    def positions_of(self, sku: str, category: str) -> tuple[int, ...]:
        """The indexed line rules a line of this SKU and category matches (cached per pair)."""
        key = (sku, category)
        hit = self.line_positions.get(key)
        if hit is None:
            found = self.sku_index.get(sku, frozenset()) | self.category_index.get(category, frozenset())
            hit = tuple(sorted(found))
            if len(self.line_positions) >= MEMO_LIMIT:
                self.line_positions.clear()
            self.line_positions[key] = hit
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
                    position=position,
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


def _by_type(rules: list[CompiledRule]) -> dict[str, list[CompiledRule]]:
    out: dict[str, list[CompiledRule]] = {}
    for compiled in rules:
        out.setdefault(compiled.rule.event_type, []).append(compiled)
    return out
