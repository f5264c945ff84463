"""An order's lines as the line rules see them: the eligible lines (after the ruleset's exclusions), their
net amounts, and per indexed line rule its matching amount and SKUs, found in one pass over the lines."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from decimal import Decimal
from typing import Any

from rules.engine.basics import ZERO
from rules.engine.compiled import CompiledRule, CompiledRuleset
from rules.engine.views import LINE_FIELDS, line_view
from shared.events import PurchaseCompleted, PurchaseLine


class Basket:
    """An order's lines as the line rules see them, matched against the ruleset's line index once."""

    __slots__ = ("amounts", "currency", "lines", "rate", "skus", "total", "views")

    def __init__(self, currency: str, rate: Decimal) -> None:
        self.currency = currency
        self.rate = rate
        self.lines: list[tuple[PurchaseLine, Decimal]] = []  # eligible lines and their net amounts
        self.total = ZERO
        self.amounts: dict[int, Decimal] = {}  # indexed rule position -> matching net amount
        self.skus: dict[int, set[str]] = {}
        self.views: list[dict[str, Any]] = []

    @classmethod
    def empty(cls) -> Basket:
        return cls("", ZERO)

    @classmethod
    def of(cls, ruleset: CompiledRuleset, data: PurchaseCompleted, rate: Decimal) -> Basket:
        basket = cls(data.currency, rate)
        ex = ruleset.document.exclusions
        gift_cards, shipping, discounted = ex.gift_cards, ex.shipping, ex.discounted_lines
        excluded_skus, excluded_categories = ruleset.excluded_skus, ruleset.excluded_categories
        # An order sent with its totals only is one anonymous line of its net amount. Built unvalidated:
        # the empty SKU and category are this placeholder's, which an incoming line may not have.
        source = data.lines or [
            PurchaseLine.model_construct(sku="", category="", quantity=Decimal(1), unit_price=data.net_amount)
        ]
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
                views.append(line_view(line, net, view_fields))
            total += net
            for position in ruleset.positions_of(sku, category):
                amounts[position] = amounts.get(position, ZERO) + net
                if position in skus:
                    skus[position].add(sku)
                else:
                    skus[position] = {sku}
        basket.total = total
        return basket

    def matching(self, compiled: CompiledRule, scope: dict[str, Mapping[str, Any]]) -> tuple[Decimal, set[str], str]:
        """The matching amount and SKUs, and why the line condition failed on the first line it failed on
        ("" when it did not): such a line counts as not matching."""
        if compiled.indexed:
            position = compiled.position
            if position in self.amounts:
                return self.amounts[position], self.skus[position], ""
            return ZERO, set(), ""
        if compiled.line_when is None and not (compiled.skus or compiled.categories):
            return self.total, {line.sku for line, _ in self.lines}, ""
        amount = ZERO
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
