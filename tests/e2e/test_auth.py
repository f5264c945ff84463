"""API-key authentication and tenant isolation, through every service's app."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from fastapi import FastAPI

from ledger.app import create_app as ledger_app
from metrics.app import create_app as metrics_app
from rules.app import create_app as rules_app
from shared.topics import PURCHASES
from tests.conftest import create_api_key, eventually, running_app, service_settings, topic
from tests.factories import purchase

pytestmark = [pytest.mark.kafka, pytest.mark.db]

PROTECTED: dict[str, tuple[str, str, Callable[..., FastAPI]]] = {
    "ledger": ("/v1/commands/cmd-1", "points:read", ledger_app),
    "rules": ("/v1/customers/c-1/state", "points:read", rules_app),
    "metrics": ("/v1/kpis?from=2026-01-01&to=2026-02-01", "metrics:read", metrics_app),
}


@pytest.mark.parametrize("service", sorted(PROTECTED))
class TestAuthentication:
    async def test_no_key_is_401_problem_json(self, service: str) -> None:
        path, _, factory = PROTECTED[service]
        async with running_app(factory(service_settings(service, consumers_enabled=False))) as client:
            response = await client.get(path)
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["status"] == 401
        assert "X-API-Key" in response.json()["detail"]

    async def test_unknown_key_is_401(self, service: str) -> None:
        path, _, factory = PROTECTED[service]
        async with running_app(factory(service_settings(service, consumers_enabled=False))) as client:
            response = await client.get(path, headers={"X-API-Key": "lk_0000000000000000_nope"})
        assert response.status_code == 401
        assert response.json()["detail"] == "the API key is unknown or revoked"

    async def test_wrong_secret_for_a_real_key_id_is_401(self, service: str, tenant: str) -> None:
        path, scope, factory = PROTECTED[service]
        key = await create_api_key(service, tenant, [scope])
        forged = key.rsplit("_", 1)[0] + "_forged"
        async with running_app(factory(service_settings(service, consumers_enabled=False))) as client:
            response = await client.get(path, headers={"X-API-Key": forged})
        assert response.status_code == 401

    async def test_wrong_scope_is_403(self, service: str, tenant: str) -> None:
        path, scope, factory = PROTECTED[service]
        other = "rules:admin" if scope != "rules:admin" else "points:read"
        key = await create_api_key(service, tenant, [other])
        async with running_app(factory(service_settings(service, consumers_enabled=False))) as client:
            response = await client.get(path, headers={"X-API-Key": key})
        assert response.status_code == 403
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["required_scope"] == scope

    async def test_right_scope_passes_auth(self, service: str, tenant: str) -> None:
        path, scope, factory = PROTECTED[service]
        key = await create_api_key(service, tenant, [scope])
        async with running_app(factory(service_settings(service, consumers_enabled=False))) as client:
            response = await client.get(path, headers={"Authorization": f"Bearer {key}"})
        assert response.status_code in (200, 404)
        assert response.status_code not in (401, 403)

    async def test_health_metrics_and_docs_need_no_key(self, service: str) -> None:
        _, _, factory = PROTECTED[service]
        async with running_app(factory(service_settings(service, consumers_enabled=False))) as client:
            for path in ("/healthz", "/metrics", "/docs", "/openapi.json"):
                assert (await client.get(path)).status_code == 200, path


class TestTenantIsolation:
    async def test_another_tenants_customer_is_invisible(self, raw_producer: AIOKafkaProducer, tenant: str) -> None:
        other = f"{tenant}-other"
        mine = await create_api_key("rules", tenant, ["points:read"])
        theirs = await create_api_key("rules", other, ["admin"])
        async with running_app(rules_app(service_settings("rules", consumer_group_suffix=f"-{tenant}"))) as client:
            event = purchase(tenant, "shared-name")
            await raw_producer.send_and_wait(topic(PURCHASES), event.to_bytes(), key=event.key)
            path = "/v1/customers/shared-name/state"
            await eventually(lambda: _status(client, path, mine, 200))
            response = await client.get(path, headers={"X-API-Key": theirs})
        assert response.status_code == 404, "another tenant's admin key must not see this customer"


async def _status(client: httpx.AsyncClient, path: str, key: str, expected: int) -> bool:
    response = await client.get(path, headers={"X-API-Key": key})
    return bool(response.status_code == expected)


class TestObservability:
    async def test_requests_are_counted_per_route_template(self, tenant: str) -> None:
        key = await create_api_key("rules", tenant, ["points:read"])
        async with running_app(rules_app(service_settings("rules", consumers_enabled=False))) as client:
            await client.get("/v1/customers/some-customer/state", headers={"X-API-Key": key})
            text = (await client.get("/metrics")).text
        assert 'route="/v1/customers/{customer_id}/state"' in text
        assert "some-customer" not in text, "raw paths would explode label cardinality"
