"""The rules REST API: rulesets (create, validate, activate, list, get), simulate, ingest, problems."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from rules.app import create_app
from tests.conftest import create_api_key, running_app, service_settings
from tests.rules.samples import BASE, doc, line, order

pytestmark = [pytest.mark.kafka, pytest.mark.db]

INVALID_YAML = """\
currencies:
  EUR: {points_per_unit: 1}
rules:
  - id: base
    kind: points_per_unit
  - id: broken
    kind: bonus
    points: 5
    when: "customer.purchase_count =="
"""


@pytest.fixture(scope="module")
async def client(kafka_topics: list[str]) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(create_app(service_settings("rules", consumers_enabled=False))) as c:
        yield c


@pytest.fixture
async def admin(tenant: str) -> dict[str, str]:
    return {"X-API-Key": await create_api_key("rules", tenant, ["rules:admin", "events:write", "points:read"])}


class TestRulesets:
    async def test_versions_activation_and_listing(self, client: httpx.AsyncClient, admin: dict[str, str]) -> None:
        v1 = await client.post("/v1/rulesets/main/versions", json={"document": doc(BASE)}, headers=admin)
        assert v1.status_code == 201
        assert v1.json()["version"] == 1
        yaml_text = "currencies:\n  EUR: {points_per_unit: 2}\nrules:\n  - {id: base, kind: points_per_unit}\n"
        v2 = await client.post("/v1/rulesets/main/versions", json={"yaml": yaml_text}, headers=admin)
        assert v2.json()["version"] == 2
        assert v2.json()["source"] == yaml_text
        for version, start in ((1, "2026-01-01T00:00:00Z"), (2, "2026-06-01T00:00:00Z")):
            response = await client.post(
                f"/v1/rulesets/main/versions/{version}/activate", json={"effective_from": start}, headers=admin
            )
            assert response.status_code == 201
        listing = (await client.get("/v1/rulesets", headers=admin)).json()
        assert [(v["ruleset_id"], v["version"]) for v in listing["versions"]] == [("main", 1), ("main", 2)]
        assert listing["active_now"] == {"ruleset_id": "main", "version": 2}
        in_march = await client.get("/v1/rulesets/active", params={"at": "2026-03-01T00:00:00Z"}, headers=admin)
        assert in_march.json() == {"ruleset_id": "main", "version": 1}
        old = await client.get("/v1/rulesets/main/versions/1", headers=admin)
        assert old.status_code == 200
        assert old.json()["document"]["currencies"]["EUR"]["points_per_unit"] == "1"

    async def test_invalid_document_is_a_problem_naming_rule_and_position(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        response = await client.post("/v1/rulesets/main/versions", json={"yaml": INVALID_YAML}, headers=admin)
        assert response.status_code == 422
        assert response.headers["content-type"] == "application/problem+json"
        body = response.json()
        assert body["error"] == "RulesetValidationFailed"
        assert "rule 'broken' at rules[1].when" in body["detail"]
        [problem] = body["errors"]
        assert (problem["rule"], problem["path"], problem["line"]) == ("broken", "rules[1].when", 9)

    async def test_validate_reports_without_storing(self, client: httpx.AsyncClient, admin: dict[str, str]) -> None:
        bad = await client.post("/v1/rulesets/validate", json={"yaml": INVALID_YAML}, headers=admin)
        assert bad.status_code == 200
        assert bad.json()["valid"] is False
        assert bad.json()["errors"][0]["rule"] == "broken"
        good = await client.post("/v1/rulesets/validate", json={"document": doc(BASE)}, headers=admin)
        assert good.json() == {"valid": True, "errors": []}
        listing = (await client.get("/v1/rulesets", headers=admin)).json()
        assert listing["versions"] == []

    async def test_unknown_version_and_no_active_ruleset(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        missing = await client.post("/v1/rulesets/main/versions/7/activate", json={}, headers=admin)
        assert missing.status_code == 404
        assert missing.json()["error"] == "RulesetNotFound"
        none = await client.get("/v1/rulesets/active", headers=admin)
        assert none.status_code == 409
        assert none.json()["error"] == "NoActiveRuleset"

    async def test_ruleset_admin_needs_its_scope(self, client: httpx.AsyncClient, tenant: str) -> None:
        reader = {"X-API-Key": await create_api_key("rules", tenant, ["points:read"])}
        response = await client.post("/v1/rulesets/main/versions", json={"document": doc(BASE)}, headers=reader)
        assert response.status_code == 403
        assert response.json()["required_scope"] == "rules:admin"


class TestSimulate:
    async def test_simulate_breakdown_without_state(
        self, client: httpx.AsyncClient, admin: dict[str, str], tenant: str
    ) -> None:
        document = doc(BASE, {"id": "first", "kind": "bonus", "points": 100, "when": "customer.purchase_count == 0"})
        await client.post("/v1/rulesets/main/versions", json={"document": document}, headers=admin)
        await client.post(
            "/v1/rulesets/main/versions/1/activate", json={"effective_from": "2026-01-01T00:00:00Z"}, headers=admin
        )
        event = json.loads(order(tenant, "nobody", [line("A", "x", "3", "9.99")]).to_bytes())
        response = await client.post("/v1/simulate", json={"event": event}, headers=admin)
        assert response.status_code == 200, response.text
        body = response.json()
        # 3 x 9.99 = 29.97 -> 29, + first purchase 100
        assert body["total_points"] == 129
        assert [(r["rule_id"], r["fired"], r["points"]) for r in body["rules"]] == [
            ("base", True, 29),
            ("first", True, 100),
        ]
        assert "29.97 EUR eligible" in body["rules"][0]["explanation"]
        state = await client.get("/v1/customers/nobody/state", headers=admin)
        assert state.status_code == 404, "simulate stores nothing"

    async def test_simulate_unknown_currency_is_a_problem(
        self, client: httpx.AsyncClient, admin: dict[str, str], tenant: str
    ) -> None:
        await client.post("/v1/rulesets/main/versions", json={"document": doc(BASE)}, headers=admin)
        await client.post(
            "/v1/rulesets/main/versions/1/activate", json={"effective_from": "2026-01-01T00:00:00Z"}, headers=admin
        )
        event = json.loads(order(tenant, "c", [line("A", "x", "1", "1")], currency="CHF").to_bytes())
        response = await client.post("/v1/simulate", json={"event": event}, headers=admin)
        assert response.status_code == 422
        assert "unknown currency 'CHF'" in response.json()["detail"]


class TestIngest:
    async def test_invalid_events_are_refused_with_their_index(
        self, client: httpx.AsyncClient, admin: dict[str, str], tenant: str
    ) -> None:
        good = json.loads(order(tenant, "c", [line("A", "x", "1", "1")]).to_bytes())
        bad = dict(good, data={**good["data"], "currency": "euro"})
        response = await client.post("/v1/events/batch", json={"events": [good, bad]}, headers=admin)
        assert response.status_code == 422
        assert response.json()["detail"].startswith("event [1]: invalid purchase.completed v1: data.currency")
        foreign = dict(good, tenantid="someone-else")
        response = await client.post("/v1/events", json=foreign, headers=admin)
        assert response.status_code == 422
        assert "not the API key's tenant" in response.json()["detail"]
        wrong_type = dict(good, type="points.earn")
        response = await client.post("/v1/events", json=wrong_type, headers=admin)
        assert response.status_code == 422
