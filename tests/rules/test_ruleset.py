"""Ruleset documents: YAML and JSON accepted; every problem names the rule and the position."""

from __future__ import annotations

from pathlib import Path

import pytest

from rules import ruleset as rs
from tests.rules.samples import BASE, doc

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
