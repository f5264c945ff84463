"""Authentication, scopes and tenant isolation for every route of every service, driven by the OpenAPI documents.

`ROUTES` holds, for each operation a service documents, the scope it requires, a sample request that names
tenant A's objects and what tenant B's key gets for it. For every route: no key is a 401, a key of A lacking the
scope is a 403, B's key gets the status the table says (404 for A's objects) and nothing of A in its answer; at
the end A's data is unchanged. `test_every_route_is_covered` fails when a service documents a route the table
does not know, so a new endpoint cannot ship without these checks.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from fastapi import FastAPI
from sqlalchemy import text

from ledger.app import create_app as ledger_app
from metrics.app import create_app as metrics_app
from rules.app import create_app as rules_app
from shared.auth import SCOPES
from shared.db import create_engine
from shared.topics import POINTS_COMMANDS
from tests.conftest import create_api_key, database_url, eventually, running_app, service_settings, topic
from tests.factories import earn

APPS: dict[str, Callable[..., FastAPI]] = {"ledger": ledger_app, "rules": rules_app, "metrics": metrics_app}
# Operations that need no key (liveness, readiness); everything else is in ROUTES.
PUBLIC = {"GET /healthz", "GET /readyz"}
# The database serves every test run on the machine: few connections each.
SMALL_POOL: dict[str, Any] = {"database_pool_size": 3, "database_pool_warm": False}
# Another tenant's answer when the route acts on the caller's own tenant (it creates or reads B's own data).
OWN = 0

RULESET = {
    "document": {"currencies": {"EUR": {"points_per_unit": "1"}}, "rules": [{"id": "base", "kind": "points_per_unit"}]}
}


@dataclass(frozen=True)
class Route:
    """A sample request for one operation; `{placeholders}` name tenant A's objects (`Tenant.objects`)."""

    scope: str
    path: str
    other_tenant: int  # the status tenant B's key gets; OWN: any answer below 500 that is not 401/403
    query: dict[str, str] = field(default_factory=dict)
    body: Any = None
    idempotent: bool = False  # sends an Idempotency-Key


def _event(customer: str, **extra: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"ev-{uuid.uuid4().hex}",
        "source": "tests",
        "type": "purchase.completed",
        "time": datetime.now(UTC).isoformat(),
        "subject": customer,
        "data": {
            "order_id": f"SO-{uuid.uuid4().hex[:12]}",
            "customer_id": customer,
            "channel": "webshop",
            "currency": "EUR",
            "net_amount": "98765.43",
            "gross_amount": "119506.17",
        },
        **extra,
    }


ROUTES: dict[str, dict[str, Route]] = {
    "ledger": {
        "GET /v1/accounts": Route("points:read", "/v1/accounts", 200),
        "GET /v1/accounts/{account_id}": Route("points:read", "/v1/accounts/{account}", 404),
        "GET /v1/accounts/{account_id}/entries": Route("points:read", "/v1/accounts/{account}/entries", 404),
        "GET /v1/accounts/{account_id}/expiring": Route("points:read", "/v1/accounts/{account}/expiring", 404),
        "GET /v1/accounts/{account_id}/verify": Route("points:read", "/v1/accounts/{account}/verify", 404),
        "GET /v1/holds/{hold_id}": Route("points:read", "/v1/holds/{hold}", 404),
        "GET /v1/commands/{command_id}": Route("points:read", "/v1/commands/{command}", 404),
        "GET /v1/liability": Route("points:read", "/v1/liability", 200),
        "GET /v1/policy": Route("points:read", "/v1/policy", 200),
        "GET /v1/adjustments": Route("admin", "/v1/adjustments", 200, query={"account_id": "{account}"}),
        "POST /v1/accounts/{account_id}/redeem": Route(
            "points:write", "/v1/accounts/{account}/redeem", 404, body={"points": 1}, idempotent=True
        ),
        "POST /v1/accounts/{account_id}/holds": Route(
            "points:write", "/v1/accounts/{account}/holds", 404, body={"points": 1}, idempotent=True
        ),
        "POST /v1/holds/{hold_id}/capture": Route(
            "points:write", "/v1/holds/{hold}/capture", 404, body={"points": 1}, idempotent=True
        ),
        "POST /v1/holds/{hold_id}/void": Route("points:write", "/v1/holds/{hold}/void", 404, idempotent=True),
        # B earns on an account of the same name in its own tenant: A's account is another account.
        "POST /v1/accounts/{account_id}/earn": Route(
            "admin", "/v1/accounts/{account}/earn", OWN, body={"points": 3}, idempotent=True
        ),
        "POST /v1/accounts/{account_id}/clawback": Route(
            "admin",
            "/v1/accounts/{customer}/clawback",
            404,
            body={"original_earn": "{earn}", "points": 1},
            idempotent=True,
        ),
        "POST /v1/accounts/{account_id}/transfers": Route(
            "admin",
            "/v1/accounts/{customer}/transfers",
            404,
            body={"to_account_id": "{account}", "points": 1},
            idempotent=True,
        ),
        "POST /v1/accounts/{account_id}/adjustments": Route(
            "admin", "/v1/accounts/{customer}/adjustments", OWN, body={"points": 2, "reason": "probe"}, idempotent=True
        ),
        "PUT /v1/policy": Route("admin", "/v1/policy", OWN, body={"hold_timeout_seconds": 60}),
        "GET /v1/verify": Route("admin", "/v1/verify", 200),
        "GET /v1/reward-settings": Route("points:read", "/v1/reward-settings", 200),
        "PUT /v1/reward-settings": Route("admin", "/v1/reward-settings", OWN, body={"tiers": ["bronze"]}),
        "GET /v1/rewards": Route("points:read", "/v1/rewards", 200),
        "GET /v1/rewards/{reward_id}": Route("points:read", "/v1/rewards/{reward}", 404),
        "PUT /v1/rewards/{reward_id}": Route("admin", "/v1/rewards/{reward}", 404, body={"name": "b", "points": 1}),
        "DELETE /v1/rewards/{reward_id}": Route("admin", "/v1/rewards/{reward}", 404),
        "POST /v1/rewards/{reward_id}/coupons": Route(
            "admin", "/v1/rewards/{reward}/coupons", 404, body={"codes": ["B-CODE-0001"]}
        ),
        "GET /v1/customers/{customer_id}/rewards": Route("points:read", "/v1/customers/{shopper}/rewards", 404),
        # Entitlements and redeemers of a customer B does not know: its own empty answer, nothing of A's.
        "GET /v1/customers/{customer_id}/entitlements": Route(
            "points:read", "/v1/customers/{shopper}/entitlements", 200
        ),
        "GET /v1/customers/{customer_id}/redeemers": Route("points:read", "/v1/customers/{shopper}/redeemers", 200),
        "PUT /v1/customers/{customer_id}/redeemers": Route(
            "admin", "/v1/customers/{shopper}/redeemers", OWN, body={"all_members": True}
        ),
        "POST /v1/redemptions": Route(
            "points:write",
            "/v1/redemptions",
            404,
            body={"customer_id": "{shopper}", "reward_id": "{reward}"},
            idempotent=True,
        ),
        "GET /v1/redemptions/{order_id}": Route("points:read", "/v1/redemptions/{order}", 404),
        "POST /v1/redemptions/{order_id}/confirm": Route(
            "points:write", "/v1/redemptions/{order}/confirm", 404, idempotent=True
        ),
        "POST /v1/redemptions/{order_id}/cancel": Route(
            "points:write", "/v1/redemptions/{order}/cancel", 404, idempotent=True
        ),
        "POST /v1/coupons/validate": Route("points:read", "/v1/coupons/validate", 404, body={"code": "{coupon}"}),
        "POST /v1/coupons/consume": Route(
            "points:write",
            "/v1/coupons/consume",
            404,
            body={"code": "{coupon}", "purchase_order_id": "SO-b"},
            idempotent=True,
        ),
        # B's reward of the same id, after B's requests above that expect A's reward to be missing.
        "POST /v1/rewards": Route(
            "admin", "/v1/rewards", OWN, body={"reward_id": "{reward}", "kind": "gift", "name": "b", "points": 1}
        ),
    },
    "rules": {
        "GET /v1/customers/{customer_id}/state": Route("points:read", "/v1/customers/{customer}/state", 404),
        "GET /v1/customers/{customer_id}/tier": Route("points:read", "/v1/customers/{customer}/tier", 404),
        "GET /v1/customers/{customer_id}/awards": Route("points:read", "/v1/customers/{customer}/awards", 200),
        "POST /v1/rulesets/validate": Route("rules:admin", "/v1/rulesets/validate", 200, body=RULESET),
        # B's version 1 of a ruleset of the same id; A's ruleset is at version 2.
        "POST /v1/rulesets/{ruleset_id}/versions": Route(
            "rules:admin", "/v1/rulesets/{ruleset}/versions", OWN, body=RULESET
        ),
        "GET /v1/rulesets": Route("rules:admin", "/v1/rulesets", 200),
        "GET /v1/rulesets/{ruleset_id}/versions/{version}": Route(
            "rules:admin", "/v1/rulesets/{ruleset}/versions/{version}", 404
        ),
        "POST /v1/rulesets/{ruleset_id}/versions/{version}/activate": Route(
            "rules:admin", "/v1/rulesets/{ruleset}/versions/{version}/activate", 404, body={}
        ),
        "GET /v1/rulesets/active": Route("rules:admin", "/v1/rulesets/active", 409),
        "POST /v1/tiers/review": Route("rules:admin", "/v1/tiers/review", 409, body={}),
        "POST /v1/simulate": Route(
            "rules:admin",
            "/v1/simulate",
            404,
            body={"event": _event("{customer}"), "ruleset_id": "{ruleset}", "version": "{version}"},
        ),
        # An event naming A as its tenant is refused: B cannot write into A's programme.
        "POST /v1/events": Route("events:write", "/v1/events", 422, body=_event("{customer}", tenantid="{tenant}")),
        "POST /v1/events/batch": Route(
            "events:write", "/v1/events/batch", 422, body={"events": [_event("{customer}", tenantid="{tenant}")]}
        ),
    },
    "metrics": {
        "GET /v1/kpis": Route(
            "metrics:read", "/v1/kpis", 200, query={"from": "{today}", "to": "{tomorrow}", "period": "day"}
        ),
        "GET /v1/kpis/lifetime": Route("metrics:read", "/v1/kpis/lifetime", 200),
        "GET /v1/kpis/cohorts": Route("metrics:read", "/v1/kpis/cohorts", 200),
        # A's coupon redemption reached metrics through the ledger's rewards outbox; B's window is its own, empty.
        "GET /v1/kpis/redemptions": Route(
            "metrics:read", "/v1/kpis/redemptions", 200, query={"from": "{today}", "to": "{tomorrow}"}
        ),
        "GET /v1/config": Route("metrics:read", "/v1/config", 200),
        "PUT /v1/config": Route("admin", "/v1/config", OWN, body={"activity_window_days": 30}),
        "GET /v1/segments": Route("metrics:read", "/v1/segments", 200),
        "GET /v1/customers": Route("metrics:read", "/v1/customers", 200),
        "GET /v1/customers.csv": Route("metrics:read", "/v1/customers.csv", 200),
        # The shopper, whom B never books points for (B's ledger writes on A's names make B customers of those).
        "GET /v1/customers/{customer_id}/metrics": Route("metrics:read", "/v1/customers/{shopper}/metrics", 404),
        # A has a stored fit (the fit job itself is tests/metrics/test_clv_job.py); B was never fitted.
        "GET /v1/clv": Route("metrics:read", "/v1/clv", 404),
    },
}

# What tenant A's key reads before and after B's requests: equal, or B changed A's data.
SNAPSHOT = {
    "ledger": [
        "/v1/accounts",
        "/v1/accounts/{account}",
        "/v1/accounts/{customer}",
        "/v1/accounts/{shopper}",
        "/v1/policy",
        "/v1/liability",
        "/v1/reward-settings",
        "/v1/rewards",
        "/v1/redemptions/{order}",
        "/v1/customers/{shopper}/redeemers",
    ],
    "rules": ["/v1/rulesets", "/v1/customers/{customer}/state"],
    # Purchase figures and A's redemption (both awaited by `_programme_of_a`): the ledger's entries reach metrics'
    # point figures in their own time.
    "metrics": ["/v1/config", "/v1/kpis/cohorts", "/v1/kpis/redemptions?from={today}&to={tomorrow}"],
}


def operations(service: str) -> set[str]:
    paths: dict[str, dict[str, Any]] = APPS[service]().openapi()["paths"]
    return {f"{method.upper()} {path}" for path, methods in paths.items() for method in methods}


@pytest.mark.parametrize("service", sorted(APPS))
def test_every_route_is_covered(service: str) -> None:
    documented = operations(service) - PUBLIC
    missing = sorted(documented - set(ROUTES[service]))
    assert not missing, (
        f"{service} documents routes without access checks: {missing}. Add each to ROUTES['{service}'] in "
        "tests/e2e/test_access.py: the scope it requires, a sample request naming tenant A's objects and the "
        "status tenant B's key gets."
    )
    assert not set(ROUTES[service]) - documented, "ROUTES names routes the service no longer has"
    for name, route in ROUTES[service].items():
        assert route.scope in SCOPES, name


# --- tenant A's programme, and the keys --------------------------------------------------------------


def fill(value: Any, objects: dict[str, str]) -> Any:
    """`value` with every `{placeholder}` replaced by A's object; a placeholder that is the whole string of an
    integer becomes the integer (a version in a body)."""
    if isinstance(value, str):
        filled = value.format(**objects)
        return int(filled) if value.startswith("{") and filled.isdigit() else filled
    if isinstance(value, dict):
        return {k: fill(v, objects) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, objects) for v in value]
    return value


@dataclass
class World:
    clients: dict[str, httpx.AsyncClient]
    tenant_a: str
    tenant_b: str
    objects: dict[str, str]
    keys: dict[tuple[str, str, str], str] = field(default_factory=dict)

    async def key(self, service: str, tenant: str, without: str | None = None) -> str:
        """A key of `tenant`: every scope (admin), or every scope but `without` (and never admin)."""
        cache = (service, tenant, without or "")
        if cache not in self.keys:
            scopes = ["admin"] if without is None else sorted(set(SCOPES) - {without, "admin"})
            self.keys[cache] = await create_api_key(service, tenant, scopes)
        return self.keys[cache]

    async def call(self, service: str, route: Route, key: str | None) -> httpx.Response:
        headers = {"Idempotency-Key": f"idem-{uuid.uuid4().hex}"} if route.idempotent else {}
        if key is not None:
            headers["X-API-Key"] = key
        method = next(n for n, r in ROUTES[service].items() if r is route).split()[0]
        return await self.clients[service].request(
            method,
            fill(route.path, self.objects),
            params=fill(route.query, self.objects),
            json=fill(route.body, self.objects),
            headers=headers,
        )

    async def snapshot(self) -> dict[str, str]:
        taken = {}
        for service, paths in SNAPSHOT.items():
            key = await self.key(service, self.tenant_a)
            for path in paths:
                response = await self.clients[service].get(fill(path, self.objects), headers={"X-API-Key": key})
                assert response.status_code == 200, (path, response.text)
                taken[f"{service} {path}"] = response.text
        return taken


@pytest.fixture(scope="module")
async def world(kafka_topics: list[str], raw_producer: AIOKafkaProducer) -> AsyncIterator[World]:
    tenant_a, tenant_b = f"t-{uuid.uuid4().hex[:12]}", f"t-{uuid.uuid4().hex[:12]}"
    async with AsyncExitStack() as stack:
        clients = {
            name: await stack.enter_async_context(
                running_app(create(service_settings(name, consumer_group_suffix=f"-{tenant_a}", **SMALL_POOL)))
            )
            for name, create in APPS.items()
        }
        marker = uuid.uuid4().hex[:10]
        today = datetime.now(UTC).date()
        objects = {
            "tenant": tenant_a,
            "account": f"acct-{marker}",
            "customer": f"cust-{marker}",
            "ruleset": f"rs-{marker}",
            "command": f"cmd-{marker}",
            "shopper": f"shop-{marker}",
            "reward": f"rw-{marker}",
            "today": today.isoformat(),
            "tomorrow": (today + timedelta(days=1)).isoformat(),
        }
        world = World(clients, tenant_a, tenant_b, objects)
        await _programme_of_a(world, raw_producer)
        yield world


async def _programme_of_a(world: World, raw_producer: AIOKafkaProducer) -> None:
    """Tenant A: an account with points, a hold and an adjustment, a Kafka command applied, a policy, two ruleset
    versions (the second active), a customer whose purchase reached rules, the ledger and metrics, and a reward
    with a redemption (`_rewards_of_a`)."""
    o, c = world.objects, world.clients
    ledger = {"X-API-Key": await world.key("ledger", world.tenant_a)}
    rules = {"X-API-Key": await world.key("rules", world.tenant_a)}
    metrics = {"X-API-Key": await world.key("metrics", world.tenant_a)}

    def idem() -> dict[str, str]:
        return {"Idempotency-Key": f"idem-{uuid.uuid4().hex}"}

    policy = await c["ledger"].put("/v1/policy", json={"hold_timeout_seconds": 777_777}, headers=ledger)
    assert policy.status_code == 200, policy.text
    earned = await c["ledger"].post(
        f"/v1/accounts/{o['account']}/earn", json={"points": 7_654_321}, headers={**ledger, **idem()}
    )
    assert earned.status_code == 201, earned.text
    hold = await c["ledger"].post(
        f"/v1/accounts/{o['account']}/holds", json={"points": 5}, headers={**ledger, **idem()}
    )
    assert hold.status_code == 201, hold.text
    o["hold"] = hold.json()["hold"]["hold_id"]
    adjusted = await c["ledger"].post(
        f"/v1/accounts/{o['account']}/adjustments",
        json={"points": 11, "reason": f"reason-{o['account']}"},
        headers={**ledger, **idem()},
    )
    assert adjusted.status_code == 201, adjusted.text
    await _rewards_of_a(world, ledger)
    command = earn(world.tenant_a, o["account"], points=9, command_id=o["command"])
    await raw_producer.send_and_wait(topic(POINTS_COMMANDS), command.to_bytes(), key=command.key)

    for _ in range(2):
        created = await c["rules"].post(f"/v1/rulesets/{o['ruleset']}/versions", json=RULESET, headers=rules)
        assert created.status_code == 201, created.text
    o["version"] = str(created.json()["version"])
    activated = await c["rules"].post(
        f"/v1/rulesets/{o['ruleset']}/versions/{o['version']}/activate",
        json={"effective_from": "2000-01-01T00:00:00Z"},
        headers=rules,
    )
    assert activated.status_code == 201, activated.text
    ingested = await c["rules"].post("/v1/events", json=_event(o["customer"]), headers=rules)
    assert ingested.status_code == 202, ingested.text

    async def arrived() -> bool:
        state = await c["rules"].get(f"/v1/customers/{o['customer']}/state", headers=rules)
        account = await c["ledger"].get(f"/v1/accounts/{o['customer']}/entries", headers=ledger)
        applied = await c["ledger"].get(f"/v1/commands/{o['command']}", headers=ledger)
        day = {"from": o["today"], "to": o["tomorrow"], "period": "day"}
        kpis = await c["metrics"].get("/v1/kpis", params=day, headers=metrics)
        summary = await c["metrics"].get(f"/v1/customers/{o['customer']}/metrics", headers=metrics)
        shopper = await c["metrics"].get(f"/v1/customers/{o['shopper']}/metrics", headers=metrics)
        window = {"from": o["today"], "to": o["tomorrow"]}
        redeemed = await c["metrics"].get("/v1/kpis/redemptions", params=window, headers=metrics)
        return (
            state.status_code == account.status_code == applied.status_code == kpis.status_code == 200
            # The purchase's segment comes back from metrics (segment.changed) to rules: the snapshot's last change.
            and state.json()["segment"] is not None
            and kpis.json()["items"][0]["orders"] == 1
            and summary.status_code == shopper.status_code == 200
            and summary.json()["orders"] == 1
            and [(i["reward_id"], i["reserved"]) for i in redeemed.json()["items"]] == [(o["reward"], 1)]
        )

    await eventually(arrived, timeout_s=60)
    entries = await c["ledger"].get(f"/v1/accounts/{o['customer']}/entries", headers=ledger)
    o["earn"] = entries.json()["items"][0]["transaction_id"]
    await _clv_fit_of_a(world)


async def _clv_fit_of_a(world: World) -> None:
    """A stored CLV fit of A's, as the fit job leaves it (running the model is the CLV tests' business)."""
    engine = create_engine(database_url("metrics"), pool_size=1)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    """insert into metrics.clv_fits (tenant_id, fitted_at, as_of, method, parameters, customers,
                       repeat_customers, duration_seconds, currency, discount_rate, horizon_months)
                       values (:t, now(), current_date, 'map', '{"bg_nbd": {"r": 0.24}}', 1, 0, 1.5, 'EUR', 0.1, 12)"""
                ),
                {"t": world.tenant_a},
            )
    finally:
        await engine.dispose()


async def _rewards_of_a(world: World, ledger: dict[str, str]) -> None:
    """A coupon reward, a shopper's reserved redemption of it (its coupon issued) and the shopper's redeemers."""
    o, c = world.objects, world.clients["ledger"]

    def idem() -> dict[str, str]:
        return {"Idempotency-Key": f"idem-{uuid.uuid4().hex}"}

    settings = await c.put("/v1/reward-settings", json={"tiers": ["tier-a1", "tier-a2"]}, headers=ledger)
    assert settings.status_code == 200, settings.text
    reward = {"reward_id": o["reward"], "kind": "coupon", "name": f"name-{o['reward']}", "points": 3_456_789}
    created = await c.post("/v1/rewards", json=reward, headers=ledger)
    assert created.status_code == 201, created.text
    earned = await c.post(f"/v1/accounts/{o['shopper']}/earn", json={"points": 6_913_578}, headers={**ledger, **idem()})
    assert earned.status_code == 201, earned.text
    redeemed = await c.post(
        "/v1/redemptions", json={"customer_id": o["shopper"], "reward_id": o["reward"]}, headers={**ledger, **idem()}
    )
    assert redeemed.status_code == 201, redeemed.text
    o["order"], o["coupon"] = redeemed.json()["order_id"], redeemed.json()["coupon_code"]
    members = {"all_members": False, "members": [{"member_id": f"member-{o['shopper']}", "max_points": 5_000}]}
    redeemers = await c.put(f"/v1/customers/{o['shopper']}/redeemers", json=members, headers=ledger)
    assert redeemers.status_code == 200, redeemers.text


def markers(world: World, request: str) -> list[str]:
    """Tenant A's identifiers and figures that B must never see, but those B's own requests named."""
    figures = ["7654321", "777777", "98765.43", "3456789", "6913578", f"reason-{world.objects['account']}", "tier-a1"]
    names = ("tenant", "account", "customer", "ruleset", "command", "hold", "earn", "shopper", "reward", "order")
    own = [world.objects[k] for k in (*names, "coupon")]
    return [m for m in own + figures if m not in request]


def _cases(*, reads: bool = False) -> list[tuple[str, str]]:
    return [(s, name) for s in sorted(ROUTES) for name in ROUTES[s] if not reads or name.startswith("GET ")]


@pytest.mark.kafka
@pytest.mark.db
class TestEveryRoute:
    @pytest.mark.parametrize(("service", "name"), _cases())
    async def test_no_key_is_401(self, world: World, service: str, name: str) -> None:
        response = await world.call(service, ROUTES[service][name], None)
        assert response.status_code == 401, response.text
        assert response.headers["content-type"] == "application/problem+json"

    @pytest.mark.parametrize(("service", "name"), _cases())
    async def test_a_key_without_the_scope_is_403(self, world: World, service: str, name: str) -> None:
        route = ROUTES[service][name]
        key = await world.key(service, world.tenant_a, without=route.scope)
        response = await world.call(service, route, key)
        assert response.status_code == 403, response.text
        assert response.json()["required_scope"] == route.scope

    @pytest.mark.parametrize(("service", "name"), _cases(reads=True))
    async def test_the_scope_alone_reads_the_tenants_own_data(self, world: World, service: str, name: str) -> None:
        # Writes are not sent: they would change A's data, which the isolation test compares.
        route = ROUTES[service][name]
        cache = (service, world.tenant_a, f"only {route.scope}")
        if cache not in world.keys:
            world.keys[cache] = await create_api_key(service, world.tenant_a, [route.scope])
        response = await world.call(service, route, world.keys[cache])
        assert response.status_code == 200, response.text


@pytest.mark.kafka
@pytest.mark.db
async def test_another_tenant_never_sees_or_changes_data(world: World) -> None:
    before = await world.snapshot()
    failures = []
    sent = ""
    for service, name in _cases():
        route = ROUTES[service][name]
        response = await world.call(service, route, await world.key(service, world.tenant_b))
        # Names B itself used (in this or an earlier request: B may create its own account or ruleset of
        # that name) may come back; nothing else of A's may.
        sent += json.dumps(
            [fill(route.path, world.objects), fill(route.query, world.objects), fill(route.body, world.objects)]
        )
        if route.other_tenant == OWN:
            if response.status_code >= 500 or response.status_code in (401, 403):
                failures.append(f"{name}: {response.status_code} {response.text[:200]}")
        elif response.status_code != route.other_tenant:
            failures.append(f"{name}: expected {route.other_tenant}, got {response.status_code} {response.text[:200]}")
        leaked = [m for m in markers(world, sent) if m in response.text]
        if leaked:
            failures.append(f"{name}: tenant B's answer shows tenant A's {leaked}: {response.text[:300]}")
    assert not failures, "\n".join(failures)
    assert await world.snapshot() == before, "tenant B's requests changed tenant A's data"
