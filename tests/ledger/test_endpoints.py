"""The ledger's REST API through the real app (lifespan, auth, problem+json) on the real database."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from ledger.app import create_app
from ledger.domain import shard as shard_of
from tests.conftest import create_api_key, running_app, service_settings

pytestmark = [pytest.mark.db, pytest.mark.kafka]


@pytest.fixture(scope="module")
async def client() -> AsyncIterator[httpx.AsyncClient]:
    settings = service_settings("ledger", consumers_enabled=False, tasks_enabled=False)
    async with running_app(create_app(settings)) as c:
        yield c


class Keys:
    def __init__(self, tenant: str, admin: str, write: str, read: str) -> None:
        self.tenant, self.admin, self.write, self.read = tenant, admin, write, read


@pytest.fixture
async def keys(tenant: str) -> Keys:
    return Keys(
        tenant,
        await create_api_key("ledger", tenant, ["admin"]),
        await create_api_key("ledger", tenant, ["points:read", "points:write"]),
        await create_api_key("ledger", tenant, ["points:read"]),
    )


def h(key: str, idempotency_key: str | None = None) -> dict[str, str]:
    headers = {"X-API-Key": key}
    headers["Idempotency-Key"] = idempotency_key or str(uuid.uuid4())
    return headers


async def post(client: httpx.AsyncClient, path: str, key: str, body: dict[str, Any] | None = None, **kw: Any) -> Any:
    response = await client.post(path, json=body or {}, headers=h(key, kw.get("idem")))
    assert response.status_code == kw.get("status", 201), response.text
    return response.json()


async def earn(client: httpx.AsyncClient, keys: Keys, account: str, points: int, **body: Any) -> Any:
    return await post(client, f"/v1/accounts/{account}/earn", keys.admin, {"points": points, **body})


async def balance(client: httpx.AsyncClient, keys: Keys, account: str, **params: Any) -> Any:
    response = await client.get(f"/v1/accounts/{account}", headers={"X-API-Key": keys.read}, params=params)
    assert response.status_code == 200, response.text
    return response.json()


class TestRedeem:
    async def test_redeem_and_409_problem_when_short(self, client: httpx.AsyncClient, keys: Keys) -> None:
        await earn(client, keys, "acme", 100)
        posted = await post(client, "/v1/accounts/acme/redeem", keys.write, {"points": 60, "member_id": "m-1"})
        assert posted["balance"]["available"] == 40
        customer, system = posted["entries"]
        assert (customer["account_id"], customer["points"]) == ("acme", -60)
        assert system["account_id"].startswith("system:redemption/")  # one of the account's shards
        assert system["points"] == 60
        assert (await balance(client, keys, "system:redemption"))["available"] == 60
        response = await client.post("/v1/accounts/acme/redeem", json={"points": 41}, headers=h(keys.write))
        assert response.status_code == 409
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["error"] == "InsufficientPoints"
        assert (problem["available"], problem["requested"]) == (40, 41)
        assert (await balance(client, keys, "acme"))["available"] == 40

    async def test_fifty_concurrent_redeems_of_ten_against_hundred(self, client: httpx.AsyncClient, keys: Keys) -> None:
        await earn(client, keys, "acme", 100)
        responses = await asyncio.gather(
            *(client.post("/v1/accounts/acme/redeem", json={"points": 10}, headers=h(keys.write)) for _ in range(50))
        )
        codes = sorted(r.status_code for r in responses)
        assert codes.count(201) == 10
        assert codes.count(409) == 40
        after = await balance(client, keys, "acme")
        assert (after["available"], after["redeemed"]) == (0, 100)

    async def test_idempotency_key_replays_and_refuses_a_different_body(
        self, client: httpx.AsyncClient, keys: Keys
    ) -> None:
        await earn(client, keys, "acme", 100)
        idem = str(uuid.uuid4())
        first = await post(client, "/v1/accounts/acme/redeem", keys.write, {"points": 10}, idem=idem)
        again = await post(client, "/v1/accounts/acme/redeem", keys.write, {"points": 10}, idem=idem)
        assert again == first
        assert (await balance(client, keys, "acme"))["available"] == 90
        other = await client.post("/v1/accounts/acme/redeem", json={"points": 11}, headers=h(keys.write, idem))
        assert other.status_code == 422
        assert other.json()["error"] == "IdempotencyKeyReused"
        missing = await client.post("/v1/accounts/acme/redeem", json={"points": 1}, headers={"X-API-Key": keys.write})
        assert missing.status_code == 422
        assert missing.headers["content-type"] == "application/problem+json"

    async def test_two_partner_apps_using_the_same_idempotency_key_each_get_their_own_write(
        self, client: httpx.AsyncClient, keys: Keys
    ) -> None:
        # The finding: a second app sending the same key (an order number) got the first app's transaction.
        portal = await create_api_key("ledger", keys.tenant, ["points:read", "points:write"])
        await earn(client, keys, "acme", 100)
        order = f"SO-{uuid.uuid4().hex[:8]}"
        checkout = await post(client, "/v1/accounts/acme/redeem", keys.write, {"points": 10}, idem=order)
        mine = await post(client, "/v1/accounts/acme/redeem", portal, {"points": 10}, idem=order)
        assert mine["transaction_id"] != checkout["transaction_id"]
        assert mine["balance"]["available"] == 80
        # Each app's retry gets its own stored response, and a different body under its key is still refused.
        assert await post(client, "/v1/accounts/acme/redeem", keys.write, {"points": 10}, idem=order) == checkout
        assert await post(client, "/v1/accounts/acme/redeem", portal, {"points": 10}, idem=order) == mine
        other = await client.post("/v1/accounts/acme/redeem", json={"points": 3}, headers=h(portal, order))
        assert (other.status_code, other.json()["error"]) == (422, "IdempotencyKeyReused")
        assert (await balance(client, keys, "acme"))["available"] == 80

    async def test_invalid_body_is_problem_json(self, client: httpx.AsyncClient, keys: Keys) -> None:
        response = await client.post("/v1/accounts/acme/redeem", json={"points": 0}, headers=h(keys.write))
        assert response.status_code == 422
        assert response.json()["error"] == "ValidationError"


class TestScopes:
    async def test_partner_keys_cannot_adjust_or_transfer(self, client: httpx.AsyncClient, keys: Keys) -> None:
        await earn(client, keys, "acme", 10)
        for path, body in (
            ("/v1/accounts/acme/adjustments", {"points": 5, "reason": "goodwill"}),
            ("/v1/accounts/acme/transfers", {"to_account_id": "acme-sub", "points": 5}),
        ):
            response = await client.post(path, json=body, headers=h(keys.write))
            assert response.status_code == 403, path
        read_only = await client.post("/v1/accounts/acme/redeem", json={"points": 1}, headers=h(keys.read))
        assert read_only.status_code == 403

    async def test_a_key_sees_only_its_own_tenant(self, client: httpx.AsyncClient, keys: Keys) -> None:
        await earn(client, keys, "acme", 10)
        stranger = await create_api_key("ledger", f"other-{uuid.uuid4().hex[:8]}", ["admin"])
        response = await client.get("/v1/accounts/acme", headers={"X-API-Key": stranger})
        assert response.status_code == 404
        assert response.json()["error"] == "AccountNotFound"
        redeem = await client.post("/v1/accounts/acme/redeem", json={"points": 1}, headers=h(stranger))
        assert redeem.status_code == 404
        assert (await balance(client, keys, "acme"))["available"] == 10


class TestHolds:
    async def test_reserve_capture_partially_then_capture_again_is_409(
        self, client: httpx.AsyncClient, keys: Keys
    ) -> None:
        await earn(client, keys, "acme", 100)
        hold = await post(client, "/v1/accounts/acme/holds", keys.write, {"points": 50, "reference": "cart-1"})
        assert (hold["balance"]["available"], hold["balance"]["held"]) == (50, 50)
        hold_id = hold["hold"]["hold_id"]
        captured = await post(client, f"/v1/holds/{hold_id}/capture", keys.write, {"points": 30})
        assert captured["hold"]["status"] == "captured"
        assert (captured["balance"]["available"], captured["balance"]["held"]) == (70, 0)
        assert captured["balance"]["redeemed"] == 30
        again = await client.post(f"/v1/holds/{hold_id}/void", headers=h(keys.write))
        assert again.status_code == 409
        assert again.json()["error"] == "HoldNotActive"

    async def test_void_releases_and_capture_more_than_held_is_refused(
        self, client: httpx.AsyncClient, keys: Keys
    ) -> None:
        await earn(client, keys, "acme", 20)
        hold = await post(client, "/v1/accounts/acme/holds", keys.write, {"points": 20})
        hold_id = hold["hold"]["hold_id"]
        too_much = await client.post(f"/v1/holds/{hold_id}/capture", json={"points": 21}, headers=h(keys.write))
        assert too_much.status_code == 409
        voided = await post(client, f"/v1/holds/{hold_id}/void", keys.write)
        assert voided["hold"]["status"] == "voided"
        assert (voided["balance"]["available"], voided["balance"]["held"]) == (20, 0)
        shown = await client.get(f"/v1/holds/{hold_id}", headers={"X-API-Key": keys.read})
        assert shown.json()["status"] == "voided"
        unknown = await client.get(f"/v1/holds/{uuid.uuid4()}", headers={"X-API-Key": keys.read})
        assert unknown.status_code == 404

    async def test_a_hold_past_its_timeout_is_not_captured(self, client: httpx.AsyncClient, keys: Keys) -> None:
        await earn(client, keys, "acme", 20)
        hold = await post(client, "/v1/accounts/acme/holds", keys.write, {"points": 20, "timeout_seconds": 1})
        hold_id = hold["hold"]["hold_id"]
        await asyncio.sleep(1.1)  # past expires_at; the periodic task is off in this app
        late = await client.post(f"/v1/holds/{hold_id}/capture", json={}, headers=h(keys.write))
        assert late.status_code == 409
        assert late.headers["content-type"] == "application/problem+json"
        assert (late.json()["error"], late.json()["hold_id"]) == ("HoldExpired", hold_id)
        assert (await balance(client, keys, "acme"))["redeemed"] == 0
        voided = await post(client, f"/v1/holds/{hold_id}/void", keys.write)
        assert voided["hold"]["status"] == "expired"
        assert (voided["balance"]["available"], voided["balance"]["held"]) == (20, 0)


class TestClawback:
    async def test_a_clawback_beyond_what_its_earn_gave_is_409(self, client: httpx.AsyncClient, keys: Keys) -> None:
        first = await earn(client, keys, "acme", 100)
        await earn(client, keys, "acme", 400)
        body = {"original_earn": first["transaction_id"], "points": 100}
        await post(client, "/v1/accounts/acme/clawback", keys.admin, body)
        for points in (100, 1_000_000):
            response = await client.post(
                "/v1/accounts/acme/clawback", json={**body, "points": points}, headers=h(keys.admin)
            )
            assert response.status_code == 409
            assert response.headers["content-type"] == "application/problem+json"
            problem = response.json()
            assert (problem["error"], problem["earned"], problem["left"]) == ("ClawbackExceedsEarn", 100, 0)
        assert (await balance(client, keys, "acme"))["available"] == 400


class TestAdmin:
    async def test_transfer_and_adjustment_audit_trail(self, client: httpx.AsyncClient, keys: Keys) -> None:
        await earn(client, keys, "parent", 100)
        moved = await post(client, "/v1/accounts/parent/transfers", keys.admin, {"to_account_id": "sub", "points": 40})
        assert moved["balance"]["available"] == 60
        assert (await balance(client, keys, "sub"))["available"] == 40
        same = await client.post(
            "/v1/accounts/parent/transfers", json={"to_account_id": "parent", "points": 1}, headers=h(keys.admin)
        )
        assert same.status_code == 422
        await post(client, "/v1/accounts/sub/adjustments", keys.admin, {"points": -15, "reason": "duplicate order"})
        no_reason = await client.post("/v1/accounts/sub/adjustments", json={"points": 5}, headers=h(keys.admin))
        assert no_reason.status_code == 422
        audit = await client.get("/v1/adjustments", headers={"X-API-Key": keys.admin})
        items = audit.json()["items"]
        assert [(e["account_id"], e["points"], e["reason"]) for e in items] == [("sub", -15, "duplicate order")]
        assert items[0]["actor_key_id"] == keys.admin.split("_")[1]
        liability = (await client.get("/v1/liability", headers={"X-API-Key": keys.read})).json()
        assert (liability["available"], liability["outstanding"], liability["accounts"]) == (85, 85, 2)

    async def test_policy_round_trip(self, client: httpx.AsyncClient, keys: Keys) -> None:
        default = (await client.get("/v1/policy", headers={"X-API-Key": keys.read})).json()
        assert default["clawback_policy"] == "receivable"
        body = {"expiry_rule": "months_after_earn", "expiry_months": 6, "hold_timeout_seconds": 60}
        response = await client.put("/v1/policy", json=body, headers={"X-API-Key": keys.admin})
        assert response.status_code == 200
        shown = (await client.get("/v1/policy", headers={"X-API-Key": keys.read})).json()
        assert (shown["expiry_months"], shown["hold_timeout_seconds"]) == (6, 60)
        posted = await earn(client, keys, "acme", 5)
        expiring = await client.get(
            "/v1/accounts/acme/expiring", params={"within": "200d"}, headers={"X-API-Key": keys.read}
        )
        assert expiring.json()["points"] == 5
        created = datetime.fromisoformat(posted["entries"][0]["created_at"])
        expires = datetime.fromisoformat(expiring.json()["lots"][0]["expires_at"])
        assert 181 <= (expires - created).days <= 184
        bad = await client.get(
            "/v1/accounts/acme/expiring", params={"within": "soon"}, headers={"X-API-Key": keys.read}
        )
        assert bad.status_code == 422


class TestReads:
    async def test_history_pagination_filters_and_as_of(self, client: httpx.AsyncClient, keys: Keys) -> None:
        for points in (10, 20, 30):
            await earn(client, keys, "acme", points)
        middle = datetime.now(UTC)
        await post(client, "/v1/accounts/acme/redeem", keys.write, {"points": 5})
        headers = {"X-API-Key": keys.read}
        first = (await client.get("/v1/accounts/acme/entries", params={"limit": 2}, headers=headers)).json()
        assert [e["seq"] for e in first["items"]] == [4, 3]
        second = (
            await client.get(
                "/v1/accounts/acme/entries", params={"limit": 2, "cursor": first["next_cursor"]}, headers=headers
            )
        ).json()
        assert [e["seq"] for e in second["items"]] == [2, 1]
        assert second["next_cursor"] is None
        earns = (await client.get("/v1/accounts/acme/entries", params={"kind": "earn"}, headers=headers)).json()
        assert [e["points"] for e in earns["items"]] == [30, 20, 10]
        recent = (
            await client.get("/v1/accounts/acme/entries", params={"since": middle.isoformat()}, headers=headers)
        ).json()
        assert [e["kind"] for e in recent["items"]] == ["redeem"]
        assert (await balance(client, keys, "acme", as_of=middle.isoformat()))["available"] == 60
        assert (await balance(client, keys, "acme"))["available"] == 55
        before = (datetime.now(UTC) - timedelta(days=1)).isoformat()
        assert (await balance(client, keys, "acme", as_of=before))["available"] == 0
        accounts = (await client.get("/v1/accounts", params={"kind": "customer"}, headers=headers)).json()
        assert [a["account_id"] for a in accounts["items"]] == ["acme"]
        verified = (await client.get("/v1/accounts/acme/verify", headers=headers)).json()
        assert verified == {"account_id": "acme", "entries": 4, "ok": True, "problems": [], "anchored_seq": None}
        missing = await client.get("/v1/accounts/nobody/entries", headers=headers)
        assert missing.status_code == 404

    async def test_a_system_shard_has_history_verify_and_a_balance_over_rest(
        self, client: httpx.AsyncClient, keys: Keys
    ) -> None:
        await earn(client, keys, "acme", 10)
        await earn(client, keys, "acme", 20)
        headers = {"X-API-Key": keys.read}
        shard = shard_of("system:issuance", "acme")
        # The id as it is, and with its `/` percent-encoded: both reach the shard.
        for path in (shard, shard.replace("/", "%2F")):
            entries = await client.get(f"/v1/accounts/{path}/entries", headers=headers)
            assert entries.status_code == 200, entries.text
            assert [(e["account_id"], e["points"]) for e in entries.json()["items"]] == [(shard, -20), (shard, -10)]
            verified = (await client.get(f"/v1/accounts/{path}/verify", headers=headers)).json()
            assert (verified["account_id"], verified["entries"], verified["ok"]) == (shard, 2, True)
            assert (await balance(client, keys, path))["available"] == -30
        # The suffixes still name their routes, and an unknown shard is a 404 problem.
        assert (await client.get("/v1/accounts/acme/verify", headers=headers)).json()["account_id"] == "acme"
        missing = await client.get("/v1/accounts/system:issuance/99/entries", headers=headers)
        assert missing.status_code == 404
        assert missing.json()["error"] == "AccountNotFound"

    async def test_the_whole_programme_is_verified_by_an_admin(self, client: httpx.AsyncClient, keys: Keys) -> None:
        await earn(client, keys, "acme", 10)
        await post(client, "/v1/accounts/acme/redeem", keys.write, {"points": 4})
        verified = await client.get("/v1/verify", headers={"X-API-Key": keys.admin})
        assert verified.status_code == 200, verified.text
        # acme, its issuance shard and its redemption shard (one shard each: one customer).
        assert verified.json() == {
            "tenant_id": keys.tenant,
            "accounts": 3,
            "entries": 4,
            "ok": True,
            "problems": [],
            "failed": [],
        }
        assert (await client.get("/v1/verify", headers={"X-API-Key": keys.read})).status_code == 403
