"""The Grafana dashboards of deploy/grafana/dashboards as the tests read them: every panel's queries, by data
source, with Grafana's variables and macros substituted as Grafana would substitute them.

Two data sources exist (deploy/grafana/provisioning/datasources): Prometheus (uid `prometheus`, PromQL in
`expr`) and the metrics database (uid `metrics-db`, SQL in `rawSql`). A panel or query on any other data
source, or a panel without a query, is an error (`problems`), so no panel escapes the tests.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_DIR = ROOT / "deploy/grafana/dashboards"
PROMETHEUS = "prometheus"
DATABASE = "metrics-db"


@dataclass(frozen=True)
class Query:
    dashboard: str
    panel: str
    datasource: str
    text: str
    format: str  # SQL: "time_series" (needs a `time` column) or "table"

    @property
    def name(self) -> str:
        return f"{self.dashboard} / {self.panel}"


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARD_DIR.glob("*.json"))}


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included; rows themselves are not panels."""

    def walk(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in items:
            if item.get("type") != "row":
                yield item
            yield from walk(item.get("panels", []))

    return walk(dashboard["panels"])


def _uid(source: Any) -> str:
    return source.get("uid", "") if isinstance(source, dict) else str(source or "")


def queries() -> list[Query]:
    """Every query of every panel and every query variable of every dashboard."""
    found = []
    for name, dashboard in dashboards().items():
        for panel in panels(dashboard):
            for target in panel.get("targets", []):
                source = _uid(target.get("datasource") or panel.get("datasource"))
                text = target.get("expr") if source == PROMETHEUS else target.get("rawSql")
                found.append(Query(name, panel["title"], source, text or "", target.get("format", "time_series")))
        for variable in dashboard.get("templating", {}).get("list", []):
            if variable.get("type") == "query":
                source, text = _uid(variable.get("datasource")), variable.get("query", "")
                found.append(Query(name, f"variable {variable['name']}", source, text, "table"))
    return found


def problems() -> list[str]:
    """Panels without a query, and queries on an unknown data source or without text."""
    out = [
        f"{name} / {panel['title']}: no query"
        for name, dashboard in dashboards().items()
        for panel in panels(dashboard)
        if not panel.get("targets")
    ]
    out += [f"{q.name}: data source {q.datasource!r}" for q in queries() if q.datasource not in (PROMETHEUS, DATABASE)]
    out += [f"{q.name}: empty query" for q in queries() if not q.text.strip()]
    return out


def variables(dashboard: Mapping[str, Any], **values: str) -> dict[str, str]:
    """The dashboard's template variables at their current value ("All" as a regex), or at `values`."""
    out = {}
    for variable in dashboard.get("templating", {}).get("list", []):
        current = variable.get("current", {}).get("value", ".*")
        if current in ("$__all", ["$__all"]):
            current = ".*"
        out[variable["name"]] = "|".join(current) if isinstance(current, list) else str(current)
    out.update((k, v) for k, v in values.items() if k in out)
    return out


def substitute(text: str, replacements: Mapping[str, str]) -> str:
    """Replaces `${name}` and `$name` not followed by a word character (so `$__interval` leaves
    `$__interval_ms` alone); a name with a format (`tenant:sqlstring`) only as `${...}`. Fails on a `$` left
    over."""
    for name in sorted(replacements, key=len, reverse=True):
        value = replacements[name]
        text = text.replace("${" + name + "}", value)
        if ":" not in name:
            text = re.sub(re.escape("$" + name) + r"(?![A-Za-z0-9_])", value.replace("\\", "\\\\"), text)
    assert "$" not in text, f"a Grafana variable or macro left unsubstituted in {text!r}"
    return text


def promql(query: Query, grafana: Mapping[str, str], values: Mapping[str, str]) -> str:
    """A PromQL query as Grafana sends it: built-in variables (`$__rate_interval`...) and template variables
    inserted raw (a single value)."""
    return substitute(query.text, {**{k.lstrip("$"): v for k, v in grafana.items()}, **values})


def sqlstring(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def sql(query: Query, values: Mapping[str, str], start: datetime, end: datetime) -> str:
    """An SQL query as Grafana's PostgreSQL data source runs it over [start, end]: `$__timeFilter(column)` is
    `column BETWEEN 'start' AND 'end'`, `$__timeFrom()` / `$__timeTo()` the quoted instants (RFC 3339, UTC),
    `${name:sqlstring}` the value quoted with its quotes doubled, `$name` / `${name}` the raw value."""
    moments = {k: f"'{t.strftime('%Y-%m-%dT%H:%M:%SZ')}'" for k, t in (("from", start), ("to", end))}
    between = f"BETWEEN {moments['from']} AND {moments['to']}"
    text = re.sub(r"\$__timeFilter\(([^)]+)\)", lambda m: f"{m.group(1).strip()} {between}", query.text)
    text = text.replace("$__timeFrom()", moments["from"]).replace("$__timeTo()", moments["to"])
    replacements = {f"{k}:sqlstring": sqlstring(v) for k, v in values.items()} | dict(values)
    return substitute(text, replacements)
