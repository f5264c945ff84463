"""Ruleset documents: YAML and JSON accepted; every problem names the rule and the position."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rules import ruleset as rs
from rules.engine import Condition
from tests.rules.samples import ALIAS_BOMB, BASE, NESTED_COMPREHENSIONS, doc

YAML = """\
name: spring
currencies:
  EUR: {points_per_unit: 1}
rules:
  - id: base
    kind: points_per_unit
  - id: big-spender
    kind: bonus
    points: 50
    when: "event.net_amount >"
  - id: unknown-var
    kind: bonus
    points: 5
    when: "cart.total > 5.0"
"""


def problems(source: object) -> list[rs.Problem]:
    with pytest.raises(rs.RulesetInvalid) as info:
        rs.parse(source)  # type: ignore[arg-type]
    return info.value.problems


class TestParse:
    def test_yaml_and_json_give_the_same_document(self) -> None:
        text = "currencies:\n  EUR: {points_per_unit: 2}\nrules:\n  - {id: base, kind: points_per_unit}\n"
        as_json = {"currencies": {"EUR": {"points_per_unit": 2}}, "rules": [{"id": "base", "kind": "points_per_unit"}]}
        assert rs.parse(text) == rs.parse(as_json)

    def test_rules_are_ordered_by_priority_then_document_order(self) -> None:
        document = rs.parse(
            doc(
                {"id": "a", "kind": "bonus", "points": 1},
                {**BASE, "priority": 5},
                {"id": "c", "kind": "bonus", "points": 1},
            )
        )
        assert [r.id for r in document.ordered_rules()] == ["base", "a", "c"]


class TestDocumentation:
    def test_the_documented_example_is_valid(self) -> None:
        text = (Path(__file__).resolve().parents[2] / "docs" / "rules.md").read_text()
        example = text.split("```yaml\n", 1)[1].split("```", 1)[0]
        document = rs.parse(example)
        assert len(document.rules) == 16
        assert {r.kind for r in document.rules} == {
            "points_per_unit",
            "line_multiplier",
            "bonus",
            "tier_multiplier",
            "engagement",
        }


class TestProblems:
    def test_cel_errors_name_the_rule_path_and_line(self) -> None:
        found = problems(YAML)
        by_rule = {p.rule: p for p in found}
        syntax = by_rule["big-spender"]
        assert syntax.path == "rules[1].when"
        assert syntax.line == 10
        assert "CEL" in syntax.message
        unknown = by_rule["unknown-var"]
        assert unknown.path == "rules[2].when"
        assert unknown.line == 14
        assert "unknown variable(s) ['cart']" in unknown.message

    def test_schema_errors_name_the_rule(self) -> None:
        found = problems(doc({"id": "no-points", "kind": "bonus"}, {"id": "x", "kind": "teleport"}))
        assert {p.rule for p in found} == {"no-points", "x"}
        assert any("needs 'points'" in p.message for p in found)
        assert any(p.path == "rules[1].kind" for p in found)

    def test_semantic_errors(self) -> None:
        found = problems(
            doc(
                {"id": "a", "kind": "bonus", "points": 1, "campaign": "nope"},
                {"id": "a", "kind": "engagement", "on": "custom.podcast", "points": 1},
                {"id": "t", "kind": "tier_multiplier"},
            )
        )
        messages = [(p.rule, p.path, p.message) for p in found]
        assert any(r == "a" and "unknown campaign 'nope'" in m for r, _, m in messages)
        assert any(path == "rules[1].id" and "duplicate rule id" in m for _, path, m in messages)
        assert any(path == "rules[1].on" and "unknown engagement event type" in m for _, path, m in messages)
        assert any(r == "t" and "needs a 'tiers' section" in m for r, _, m in messages)

    def test_yaml_syntax_error_has_a_line(self) -> None:
        found = problems("currencies: {EUR: [\nrules: -")
        assert found[0].line is not None
        assert "not valid YAML" in found[0].message

    def test_line_variable_only_in_line_conditions(self) -> None:
        found = problems(doc({"id": "b", "kind": "bonus", "points": 1, "when": "line.sku == 'x'"}))
        assert found[0].rule == "b"
        assert "unknown variable(s) ['line']" in found[0].message

    def test_tiers_must_ascend(self) -> None:
        found = problems(doc(tiers={"levels": [{"name": "Gold", "threshold": 5}, {"name": "Bronze", "threshold": 0}]}))
        assert found[0].path == "tiers.levels"
        assert "ascending" in found[0].message


class TestDocumentLimits:
    def test_the_alias_bomb_is_refused_before_anything_is_expanded(self) -> None:
        [problem] = problems(ALIAS_BOMB)
        assert "anchors and aliases" in problem.message
        assert (problem.line, problem.column) == (1, 4)  # the first anchor

    @pytest.mark.parametrize(
        "text",
        [
            "base: &b {points_per_unit: 1}\ncurrencies: {EUR: *b}\n",
            "base: &b {points_per_unit: 1}\ncurrencies:\n  EUR: {<<: *b}\n",  # a merge key needs an alias
            "currencies: &c {EUR: {points_per_unit: 1}}\n",  # an anchor alone
        ],
    )
    def test_any_anchor_or_alias_is_refused(self, text: str) -> None:
        assert "anchors and aliases" in problems(text)[0].message

    def test_a_document_over_the_size_limit_is_refused(self) -> None:
        padding = "# " + "x" * rs.MAX_SOURCE_BYTES + "\n"
        [problem] = problems("currencies: {EUR: {points_per_unit: 1}}\n" + padding)
        assert f"larger than {rs.MAX_SOURCE_BYTES} bytes" in problem.message
        # the limit counts bytes: multi-byte characters count as what they weigh in UTF-8
        [problem] = problems("description: " + "é" * (rs.MAX_SOURCE_BYTES // 2 + 1))
        assert "larger than" in problem.message

    def test_too_many_values_are_refused_in_yaml_and_json(self) -> None:
        skus = [f"S{i}" for i in range(rs.MAX_NODES)]
        document = doc(BASE, exclusions={"skus": skus})
        assert f"more than {rs.MAX_NODES} values" in problems(document)[0].message
        text = "currencies: {EUR: {points_per_unit: 1}}\nexclusions: {skus: [" + "s," * rs.MAX_NODES + "]}\n"
        assert len(text) < rs.MAX_SOURCE_BYTES
        assert f"more than {rs.MAX_NODES} values" in problems(text)[0].message

    def test_too_deep_documents_are_refused_in_yaml_and_json(self) -> None:
        deep: Any = "x"
        for _ in range(rs.MAX_DEPTH + 1):
            deep = [deep]
        document = doc(BASE, description=deep)
        assert f"deeper than {rs.MAX_DEPTH} levels" in problems(document)[0].message
        assert f"deeper than {rs.MAX_DEPTH} levels" in problems(json.dumps(document))[0].message
        # far deeper than Python's recursion limit: refused while streaming, not a RecursionError
        text = "description: " + "[" * 100_000 + "]" * 100_000 + "\n"
        assert f"deeper than {rs.MAX_DEPTH} levels" in problems(text)[0].message

    def test_a_document_at_the_limits_is_valid(self) -> None:
        # the documented example is 5 levels deep; a long SKU list within the value limit is fine
        document = doc(BASE, exclusions={"skus": [f"S{i}" for i in range(rs.MAX_NODES - 100)]})
        assert len(rs.parse(document).exclusions.skus) == rs.MAX_NODES - 100

    def test_text_that_utf8_cannot_encode_is_refused(self) -> None:
        [problem] = problems(doc(BASE, description="\udc80"))
        assert "not valid Unicode" in problem.message
        assert "not valid YAML" in problems("description: \udc80\n")[0].message


def when(source: str) -> list[rs.Problem]:
    return problems(doc(BASE, {"id": "c", "kind": "bonus", "points": 5, "when": source}))


class TestConditionLimits:
    def test_nested_comprehensions_are_refused(self) -> None:
        [problem] = when(NESTED_COMPREHENSIONS)
        assert problem.path == "rules[1].when"
        assert "nested comprehensions are not accepted" in problem.message
        [problem] = when("event.skus.exists(a, event.skus.exists(b, a == b))")
        assert "nested" in problem.message or "own variable" in problem.message

    @pytest.mark.parametrize(
        ("source", "message"),
        [
            ("event.net_amount > 1.0 || " * 20 + "true", f"longer than {rs.MAX_CONDITION_LENGTH} characters"),
            ("event.skus.map(s, s).size() > 0", "map() is not available"),
            (
                "event.skus.exists(s, s == 'a') && event.skus.all(s, s != 'b') && event.categories.exists(c, true)",
                f"more than {rs.MAX_COMPREHENSIONS} comprehensions",
            ),
            ("(event.skus + event.skus).exists(s, s == 'a')", "must be called on a field"),
            ("[1, 2, 3].all(x, x > 0)", "must be called on a field"),
            ("event.skus.exists(s, s in customer.categories)", "only the comprehension's own variable"),
            ("event.skus.filter(s, true).size() > event.categories.filter(c, true).size()", "filter() at most once"),
            ("event.skus.exists(s, s.matches('^A'))", "matches() inside a comprehension"),
            ("event.channel.matches('\\\\w{1000}')", "repetition counts"),
            ("event.channel.matches(r'\\pL+')", "classes like"),
            ("event.channel.matches(event.channel)", "must be a string literal"),
            ("event.channel.matches('a') || event.channel.matches('b')", "at most once"),
            ("event.channel.matches('" + "a" * 101 + "')", "longer than"),
        ],
    )
    def test_costly_shapes_are_refused(self, source: str, message: str) -> None:
        [problem] = when(source)
        assert message in problem.message, problem.message

    def test_all_conditions_of_a_document_are_bounded_together(self) -> None:
        condition = "event.net_amount > 1.0 && " * 17 + "true"
        rules = [{"id": f"b{i}", "kind": "bonus", "points": 1, "when": condition} for i in range(10)]
        [problem] = problems(doc(BASE, *rules))
        assert (problem.path, problem.rule) == ("rules", None)
        assert f"at most {rs.MAX_CONDITIONS_LENGTH}" in problem.message
        rs.parse(doc(BASE, *rules[:4]))

    @pytest.mark.parametrize(
        "source",
        [
            "event.skus.exists(s, s.startsWith('DRILL-'))",
            "customer.categories.exists_one(c, c == 'paint') && event.categories.all(c, c != 'gift')",
            "event.categories.filter(c, c in ['paint', 'tools']).size() >= 2",
            "event.skus.exists(s, s == 'event.map(x, x)')",  # names inside text are text
            "size(event.new_categories) > 0 && has(event.member_id)",
            "event.channel.matches('^(web|erp)[a-z]*$')",
        ],
    )
    def test_ordinary_comprehensions_are_accepted(self, source: str) -> None:
        rs.parse(doc(BASE, {"id": "c", "kind": "bonus", "points": 5, "when": source}))


# Pieces of CEL, valid and not, that random conditions are made of.
_PIECES = [
    "event", "customer", ".", "net_amount", "line_count", "skus", "categories", "nps", "tier", "purchase_count",
    "(", ")", "[", "]", "{", "}", ",", ":", "?", "0", "1", "-1", "2.5", "9223372036854775807", "18446744073709551615u",
    "'a'", '"["', "b'x'", "true", "null", "+", "-", "*", "/", "%", "==", "!=", "<", ">=", "&&", "||", "!", " in ",
    "size", "int", "uint", "double", "string", "timestamp", "duration", "matches", "startsWith", "exists", "all",
    "filter", "map", "exists_one", "has", "x", " ",
]  # fmt: skip
_ATOMS = st.sampled_from(
    [
        "0", "1", "-1", "2.5", "0.0", "9223372036854775807", "-9223372036854775808", "1u", "'a'", "'['", "true",
        "null", "[1, 2]", "{'k': 1}", "event.net_amount", "event.line_count", "event.skus", "event.nps", "event.id",
        "customer.purchase_count", "customer.tier", "customer.categories", "customer.spend_12m",
    ]
)  # fmt: skip


def _combine(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    binary = st.sampled_from(["+", "-", "*", "/", "%", "==", "!=", "<", ">=", "&&", "||", "in"])
    calls = st.sampled_from(["size", "int", "uint", "double", "string", "timestamp", "duration", "!", "-"])
    return st.one_of(
        st.tuples(inner, binary, inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(calls, inner).map(lambda t: f"{t[0]}({t[1]})"),
        st.tuples(inner, inner).map(lambda t: f"{t[0]}[{t[1]}]"),
        st.tuples(inner, inner).map(lambda t: f"({t[0]}).matches({t[1]})"),
        st.tuples(inner, inner, inner).map(lambda t: f"({t[0]} ? {t[1]} : {t[2]})"),
        st.tuples(st.sampled_from(["all", "exists", "exists_one", "filter"]), inner).map(
            lambda t: f"event.skus.{t[0]}(x, {t[1].replace('event.id', 'x')})"
        ),
    )


# Well-formed expressions (of any type, with runtime errors of every kind) and random text.
_CONDITIONS = st.one_of(
    st.recursive(_ATOMS, _combine, max_leaves=12),
    st.lists(st.sampled_from(_PIECES), max_size=25).map("".join),
    st.text(max_size=60),
)
_SCOPE: dict[str, Any] = {
    "event": {"net_amount": 25.0, "line_count": 2, "skus": ("A", "B"), "categories": ("x",), "id": "e1"},
    "customer": {"purchase_count": 0, "tier": "", "categories": ("x", "y"), "spend_12m": 0.0},
}


class TestRandomConditions:
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_CONDITIONS)
    def test_a_condition_is_refused_or_evaluates_to_met_or_not(self, source: str) -> None:
        if rs.check_condition(source, rs.EVENT_VARIABLES) is not None:
            return  # refused at validation, with its reason
        for memo in (True, False):
            result = Condition(source)(_SCOPE, memo)
            assert isinstance(result, bool) or result.startswith("condition ")
