"""Rewards through the real app on the real database: the catalogue, what a customer can redeem and why
not, redemption orders on holds (reserve, confirm, cancel, expire), coupons, discounts and refunds,
privileges and entitlements, members, idempotency, tenant isolation, and 50 parallel redemptions of the
last 5 items."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, cast

import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import async_sessionmaker

from ledger.app import create_app
from ledger.models import STOCK_SHARDS, Balance, Coupon, RedemptionOrder, Reward, RewardsOutbox, RewardStock
from ledger.rewards_service import rewards_service
from ledger.tasks import expire_redemptions
from shared.consumer import Inbound
from shared.db import AsyncSession, transaction
from shared.events import MAX_POINTS, CloudEvent, PurchaseRefunded, RefundedLine, TierChanged, decode_event, make_event
from tests.conftest import create_api_key, running_app, service_settings
from tests.ledger.conftest import check_books

pytestmark = [pytest.mark.db, pytest.mark.kafka]


@pytest.fixture(scope="module")
async def client() -> AsyncIterator[httpx.AsyncClient]:
    settings = service_settings("ledger", consumers_enabled=False, tasks_enabled=False, outbox_relay_enabled=False)
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


def h(key: str, idem: str | None = None) -> dict[str, str]:
    return {"X-API-Key": key, "Idempotency-Key": idem or str(uuid.uuid4())}


async def call(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    key: str,
    body: Any = None,
    *,
    status: int,
    idem: str | None = None,
) -> Any:
    response = await client.request(method, path, json=body, headers=h(key, idem))
    assert response.status_code == status, response.text
    if status >= 400:
        assert response.headers["content-type"] == "application/problem+json"
    return response.json()


async def earn(client: httpx.AsyncClient, keys: Keys, account: str, points: int) -> None:
    await call(client, "POST", f"/v1/accounts/{account}/earn", keys.admin, {"points": points}, status=201)


async def reward(client: httpx.AsyncClient, keys: Keys, reward_id: str, **fields: Any) -> Any:
    body = {"reward_id": reward_id, "name": f"Reward {reward_id}", "kind": "gift", "points": 100, **fields}
    return await call(client, "POST", "/v1/rewards", keys.admin, body, status=201)


async def redeem(client: httpx.AsyncClient, keys: Keys, customer: str, reward_id: str, **kw: Any) -> Any:
    status = kw.pop("status", 201)
    body = {"customer_id": customer, "reward_id": reward_id, **kw}
    return await call(client, "POST", "/v1/redemptions", keys.write, body, status=status)


async def balance(client: httpx.AsyncClient, keys: Keys, account: str) -> Any:
    response = await client.get(f"/v1/accounts/{account}", headers={"X-API-Key": keys.read})
    assert response.status_code == 200, response.text
    return response.json()


async def events_of(db: async_sessionmaker[AsyncSession], tenant: str) -> list[CloudEvent[Any]]:
    """The tenant's `redemption.changed` events waiting in the rewards outbox, oldest first."""
    async with db() as session:
        rows = (await session.execute(select(RewardsOutbox).order_by(RewardsOutbox.id))).scalars()
        events = [decode_event(r.value) for r in rows]
    return [e for e in events if e.tenantid == tenant]


async def set_tier(db: async_sessionmaker[AsyncSession], tenant: str, customer: str, tier: str, at: datetime) -> None:
    event = make_event(
        "tier.changed",
        TierChanged(customer_id=customer, tier=tier, reason="test"),
        tenant_id=tenant,
        source="rules",
        time=at,
    )
    async with transaction(db) as session:
        assert await rewards_service.handle_customer_events(session, [inbound(event)]) == []


def inbound(event: CloudEvent[Any]) -> Inbound[Any]:
    return Inbound(event, "topic", 0, 0, cast(Any, None))


class TestCatalogue:
    async def test_crud_needs_admin_and_a_used_reward_is_retired(self, client: httpx.AsyncClient, keys: Keys) -> None:
        body = {"reward_id": "mug", "name": "Mug", "kind": "gift", "points": 100}
        problem = await call(client, "POST", "/v1/rewards", keys.write, body, status=403)
        assert problem["required_scope"] == "admin"
        created = await reward(client, keys, "mug", stock=3, value="12.50", currency="EUR")
        assert (created["status"], created["stock"], Decimal(created["value"])) == ("active", 3, Decimal("12.5"))
        assert (await call(client, "POST", "/v1/rewards", keys.admin, body, status=409))["error"] == "RewardExists"
        updated = await call(
            client, "PUT", "/v1/rewards/mug", keys.admin, {"name": "Big mug", "points": 120, "stock": 10}, status=200
        )
        assert (updated["name"], updated["points"], updated["stock"], updated["value"]) == ("Big mug", 120, 10, None)
        listed = await call(client, "GET", "/v1/rewards", keys.read, status=200)
        assert [r["reward_id"] for r in listed["items"]] == ["mug"]
        await reward(client, keys, "unused")
        assert (await call(client, "DELETE", "/v1/rewards/unused", keys.admin, status=200))["outcome"] == "deleted"
        await call(client, "GET", "/v1/rewards/unused", keys.read, status=404)
        await earn(client, keys, "acme", 500)
        await redeem(client, keys, "acme", "mug")
        assert (await call(client, "DELETE", "/v1/rewards/mug", keys.admin, status=200))["outcome"] == "retired"
        assert (await call(client, "GET", "/v1/rewards/mug", keys.read, status=200))["status"] == "retired"
        refused = await redeem(client, keys, "acme", "mug", status=409)
        assert (refused["error"], refused["reason"]) == ("NotEligible", "retired")

    async def test_invalid_definitions_are_422(self, client: httpx.AsyncClient, keys: Keys) -> None:
        await call(
            client,
            "POST",
            "/v1/rewards",
            keys.admin,
            {"reward_id": "p", "name": "P", "kind": "privilege", "points": 1},
            status=422,
        )
        unknown_tier = await call(
            client,
            "POST",
            "/v1/rewards",
            keys.admin,
            {"reward_id": "g", "name": "G", "kind": "gift", "points": 1, "min_tier": "gold"},
            status=422,
        )
        assert unknown_tier["error"] == "InvalidReward"
        no_value = await call(
            client,
            "POST",
            "/v1/rewards",
            keys.admin,
            {"reward_id": "d", "name": "D", "kind": "discount", "points": 1},
            status=422,
        )
        assert "point value" in no_value["detail"]
        await call(
            client,
            "POST",
            "/v1/rewards",
            keys.admin,
            {"reward_id": "x", "name": "X", "kind": "gift", "points": 0},
            status=422,
        )


class TestCustomerCatalogue:
    async def test_each_unavailable_reward_says_why(
        self, client: httpx.AsyncClient, keys: Keys, db: async_sessionmaker[AsyncSession]
    ) -> None:
        await call(
            client, "PUT", "/v1/reward-settings", keys.admin, {"tiers": ["silver", "gold", "platinum"]}, status=200
        )
        now = datetime.now(UTC)
        await reward(client, keys, "a-open", points=100)
        await reward(client, keys, "b-gold", points=100, min_tier="gold")
        await reward(client, keys, "c-later", points=100, available_from=(now + timedelta(days=1)).isoformat())
        await reward(client, keys, "d-empty", points=100, stock=0)
        await reward(client, keys, "e-dear", points=10_000)
        await reward(client, keys, "f-once", points=100, limit_count=1, limit_period="month")
        await earn(client, keys, "acme", 1000)
        await set_tier(db, keys.tenant, "acme", "silver", now)
        await redeem(client, keys, "acme", "f-once")
        listing = await call(client, "GET", "/v1/customers/acme/rewards", keys.read, status=200)
        assert (listing["available"], listing["tier"]) == (900, "silver")
        reasons = {item["reward"]["reward_id"]: [r["reason"] for r in item["reasons"]] for item in listing["items"]}
        assert reasons == {
            "a-open": [],
            "b-gold": ["tier"],
            "c-later": ["not_yet_available"],
            "d-empty": ["stock"],
            "e-dear": ["points"],
            "f-once": ["limit"],
        }
        assert {i["reward"]["reward_id"]: i["redeemable"] for i in listing["items"]}["a-open"] is True
        assert {i["reward"]["reward_id"]: i["used_in_period"] for i in listing["items"]}["f-once"] == 1
        # A newer tier.changed makes the gold reward redeemable; an older one delivered late changes nothing.
        await set_tier(db, keys.tenant, "acme", "platinum", now + timedelta(seconds=2))
        await set_tier(db, keys.tenant, "acme", "silver", now + timedelta(seconds=1))
        listing = await call(client, "GET", "/v1/customers/acme/rewards", keys.read, status=200)
        assert listing["tier"] == "platinum"
        assert {i["reward"]["reward_id"]: i["redeemable"] for i in listing["items"]}["b-gold"] is True
        await call(client, "GET", "/v1/customers/nobody/rewards", keys.read, status=404)

    async def test_the_listing_pages_by_reward_id_and_an_empty_catalogue_still_gives_the_balance(
        self, client: httpx.AsyncClient, keys: Keys
    ) -> None:
        await earn(client, keys, "acme", 250)
        empty = await call(client, "GET", "/v1/customers/acme/rewards", keys.read, status=200)
        assert (empty["available"], empty["items"], empty["next_cursor"]) == (250, [], None)
        for reward_id in ("r-3", "r-1", "r-5", "r-2", "r-4"):
            await reward(client, keys, reward_id, points=100)
        await call(client, "DELETE", "/v1/rewards/r-4", keys.admin, status=200)  # deleted: never listed
        pages, cursor = [], ""
        while True:
            page = await call(client, "GET", f"/v1/customers/acme/rewards?limit=2{cursor}", keys.read, status=200)
            assert page["available"] == 250
            pages.append([item["reward"]["reward_id"] for item in page["items"]])
            if page["next_cursor"] is None:
                break
            cursor = f"&cursor={page['next_cursor']}"
        assert pages == [["r-1", "r-2"], ["r-3", "r-5"]]


class TestRedemptionOrders:
    async def test_reserve_confirm_cancel_move_points_and_stock_and_publish(
        self, client: httpx.AsyncClient, keys: Keys, db: async_sessionmaker[AsyncSession]
    ) -> None:
        await reward(client, keys, "mug", points=300, stock=2)
        await earn(client, keys, "acme", 1000)
        first = await redeem(client, keys, "acme", "mug", member_id="buyer-1")
        assert (first["state"], first["points"]) == ("reserved", 300)
        assert (await balance(client, keys, "acme"))["available"] == 700
        assert (await balance(client, keys, "acme"))["held"] == 300
        hold = await call(client, "GET", f"/v1/holds/{first['hold_id']}", keys.read, status=200)
        assert (hold["status"], hold["points"]) == ("active", 300)
        confirmed = await call(client, "POST", f"/v1/redemptions/{first['order_id']}/confirm", keys.write, status=201)
        assert confirmed["state"] == "confirmed"
        after = await balance(client, keys, "acme")
        assert (after["available"], after["held"], after["redeemed"]) == (700, 0, 300)
        second = await redeem(client, keys, "acme", "mug")
        assert (await call(client, "GET", "/v1/rewards/mug", keys.read, status=200))["stock"] == 0
        cancelled = await call(client, "POST", f"/v1/redemptions/{second['order_id']}/cancel", keys.write, status=201)
        assert cancelled["state"] == "cancelled"
        assert (await call(client, "GET", "/v1/rewards/mug", keys.read, status=200))["stock"] == 1
        assert (await balance(client, keys, "acme"))["available"] == 700
        again = await call(client, "POST", f"/v1/redemptions/{second['order_id']}/confirm", keys.write, status=409)
        assert (again["error"], again["state"]) == ("RedemptionStateConflict", "cancelled")
        changes = [(e.data.order_id, e.data.change, e.data.state) for e in await events_of(db, keys.tenant)]
        assert changes == [
            (first["order_id"], "reserved", "reserved"),
            (first["order_id"], "confirmed", "confirmed"),
            (second["order_id"], "reserved", "reserved"),
            (second["order_id"], "cancelled", "cancelled"),
        ]
        await check_books(db, keys.tenant)

    async def test_idempotency_key_returns_the_same_order(self, client: httpx.AsyncClient, keys: Keys) -> None:
        await reward(client, keys, "mug", points=100, stock=5)
        await earn(client, keys, "acme", 1000)
        body = {"customer_id": "acme", "reward_id": "mug"}
        first = await call(client, "POST", "/v1/redemptions", keys.write, body, status=201, idem="k-1")
        repeat = await call(client, "POST", "/v1/redemptions", keys.write, body, status=201, idem="k-1")
        assert repeat == first
        assert (await balance(client, keys, "acme"))["held"] == 100
        assert (await call(client, "GET", "/v1/rewards/mug", keys.read, status=200))["stock"] == 4
        other = await call(
            client, "POST", "/v1/redemptions", keys.write, {**body, "member_id": "m"}, status=422, idem="k-1"
        )
        assert other["error"] == "IdempotencyKeyReused"

    async def test_errors_insufficient_out_of_stock_limit(self, client: httpx.AsyncClient, keys: Keys) -> None:
        await reward(client, keys, "dear", points=5000)
        await reward(client, keys, "gone", points=10, stock=0)
        await reward(client, keys, "daily", points=10, limit_count=2, limit_period="day")
        await earn(client, keys, "acme", 100)
        short = await redeem(client, keys, "acme", "dear", status=409)
        assert (short["error"], short["requested"], short["available"]) == ("InsufficientPoints", 5000, 100)
        assert (await redeem(client, keys, "acme", "gone", status=409))["error"] == "OutOfStock"
        await redeem(client, keys, "acme", "daily")
        cancelled = await redeem(client, keys, "acme", "daily")
        await call(client, "POST", f"/v1/redemptions/{cancelled['order_id']}/cancel", keys.write, status=201)
        await redeem(client, keys, "acme", "daily")  # the cancelled order does not count
        limit = await redeem(client, keys, "acme", "daily", status=409)
        assert (limit["error"], limit["limit"], limit["period"]) == ("LimitReached", 2, "day")
        assert (await redeem(client, keys, "acme", "missing", status=404))["error"] == "RewardNotFound"
        assert (await redeem(client, keys, "nobody", "daily", status=404))["error"] == "AccountNotFound"
        assert (await balance(client, keys, "acme"))["available"] == 80

    async def test_an_order_is_reserved_for_the_programmes_hold_timeout_or_the_rewards_own(
        self, client: httpx.AsyncClient, keys: Keys
    ) -> None:
        policy = {
            "expiry_rule": "never",
            "expiry_months": 12,
            "clawback_policy": "receivable",
            "hold_timeout_seconds": 120,
        }
        await call(client, "PUT", "/v1/policy", keys.admin, policy, status=200)
        await reward(client, keys, "default", points=10)
        await reward(client, keys, "own", points=10, reserve_seconds=3600)
        await earn(client, keys, "acme", 100)
        for reward_id, seconds in (("default", 120), ("own", 3600)):
            order = await redeem(client, keys, "acme", reward_id)
            reserved = datetime.fromisoformat(order["expires_at"]) - datetime.fromisoformat(order["created_at"])
            assert reserved == timedelta(seconds=seconds)

    async def test_window_is_enforced(self, client: httpx.AsyncClient, keys: Keys) -> None:
        past = datetime.now(UTC) - timedelta(days=1)
        await reward(client, keys, "old", points=10, available_until=past.isoformat())
        await earn(client, keys, "acme", 100)
        refused = await redeem(client, keys, "acme", "old", status=409)
        assert (refused["error"], refused["reason"]) == ("NotEligible", "no_longer_available")

    async def test_tier_restriction_is_enforced(
        self, client: httpx.AsyncClient, keys: Keys, db: async_sessionmaker[AsyncSession]
    ) -> None:
        await call(client, "PUT", "/v1/reward-settings", keys.admin, {"tiers": ["silver", "gold"]}, status=200)
        await reward(client, keys, "lounge", points=10, min_tier="gold")
        await earn(client, keys, "acme", 100)
        refused = await redeem(client, keys, "acme", "lounge", status=409)
        assert (refused["error"], refused["reason"]) == ("NotEligible", "tier")
        await set_tier(db, keys.tenant, "acme", "gold", datetime.now(UTC))
        await redeem(client, keys, "acme", "lounge")

    async def test_expiry_releases_the_hold_and_the_stock(
        self, client: httpx.AsyncClient, keys: Keys, db: async_sessionmaker[AsyncSession]
    ) -> None:
        await reward(client, keys, "mug", points=100, stock=1, reserve_seconds=60)
        await earn(client, keys, "acme", 100)
        order = await redeem(client, keys, "acme", "mug")
        later = datetime.now(UTC) + timedelta(seconds=61)
        assert await expire_redemptions(db, now=later, limit=10_000) >= 1
        expired = await call(client, "GET", f"/v1/redemptions/{order['order_id']}", keys.read, status=200)
        assert expired["state"] == "expired"
        assert (await call(client, "GET", f"/v1/holds/{order['hold_id']}", keys.read, status=200))[
            "status"
        ] == "expired"
        assert (await balance(client, keys, "acme"))["available"] == 100
        assert (await call(client, "GET", "/v1/rewards/mug", keys.read, status=200))["stock"] == 1
        await check_books(db, keys.tenant)


class TestMembers:
    async def test_only_listed_members_redeem_within_their_maximum(self, client: httpx.AsyncClient, keys: Keys) -> None:
        await reward(client, keys, "small", points=100)
        await reward(client, keys, "big", points=500)
        await earn(client, keys, "acme", 2000)
        await redeem(client, keys, "acme", "small", member_id="anyone")  # all members by default
        members = {"all_members": False, "members": [{"member_id": "anna"}, {"member_id": "bob", "max_points": 200}]}
        await call(client, "PUT", "/v1/customers/acme/redeemers", keys.write, members, status=403)
        await call(client, "PUT", "/v1/customers/acme/redeemers", keys.admin, members, status=200)
        assert (await call(client, "GET", "/v1/customers/acme/redeemers", keys.read, status=200))[
            "all_members"
        ] is False
        stranger = await redeem(client, keys, "acme", "small", member_id="carl", status=409)
        assert (stranger["error"], stranger["reason"]) == ("NotEligible", "member")
        assert "carl" in stranger["detail"]
        assert (await redeem(client, keys, "acme", "small", status=409))["reason"] == "member"
        over = await redeem(client, keys, "acme", "big", member_id="bob", status=409)
        assert "at most 200" in over["detail"]
        await redeem(client, keys, "acme", "small", member_id="bob")
        await redeem(client, keys, "acme", "big", member_id="anna")
        listing = await call(client, "GET", "/v1/customers/acme/rewards?member_id=bob", keys.read, status=200)
        assert {i["reward"]["reward_id"]: i["redeemable"] for i in listing["items"]} == {"small": True, "big": False}


class TestCoupons:
    async def test_generated_code_validates_and_is_consumed_once(
        self, client: httpx.AsyncClient, keys: Keys, db: async_sessionmaker[AsyncSession]
    ) -> None:
        await reward(client, keys, "ten-off", kind="coupon", points=200, value="10.00", currency="EUR")
        await earn(client, keys, "acme", 500)
        order = await redeem(client, keys, "acme", "ten-off")
        code = order["coupon_code"]
        assert len(code.replace("-", "")) == 16
        checked = await call(client, "POST", "/v1/coupons/validate", keys.read, {"code": code}, status=200)
        assert (checked["valid"], checked["status"], checked["customer_id"]) == (True, "issued", "acme")
        assert Decimal(checked["value"]) == 10
        consumed = await call(
            client, "POST", "/v1/coupons/consume", keys.write, {"code": code, "purchase_order_id": "SO-1"}, status=201
        )
        assert (consumed["status"], consumed["valid"], consumed["consumed_by"]) == ("consumed", False, "SO-1")
        assert (await call(client, "GET", f"/v1/redemptions/{order['order_id']}", keys.read, status=200))[
            "state"
        ] == "confirmed"
        assert (await balance(client, keys, "acme"))["redeemed"] == 200
        twice = await call(
            client, "POST", "/v1/coupons/consume", keys.write, {"code": code, "purchase_order_id": "SO-2"}, status=409
        )
        assert (twice["error"], twice["coupon_status"]) == ("CouponNotUsable", "consumed")
        other = await create_api_key("ledger", f"t-{uuid.uuid4().hex[:12]}", ["points:read", "points:write"])
        assert (await call(client, "POST", "/v1/coupons/validate", other, {"code": code}, status=404))[
            "error"
        ] == "CouponNotFound"
        await call(client, "POST", "/v1/coupons/consume", other, {"code": code, "purchase_order_id": "X"}, status=404)
        await check_books(db, keys.tenant)

    async def test_pool_codes_are_issued_until_the_pool_is_empty(self, client: httpx.AsyncClient, keys: Keys) -> None:
        await reward(client, keys, "pooled", kind="coupon", points=10, coupon_source="pool")
        imported = await call(
            client,
            "POST",
            "/v1/rewards/pooled/coupons",
            keys.admin,
            {"codes": ["CODE-AAAA", "CODE-BBBB", "CODE-AAAA"]},
            status=201,
        )
        assert (imported["imported"], imported["duplicates"]) == (2, 1)
        # A pooled code not yet issued to anyone is unknown at the checkout.
        await call(client, "POST", "/v1/coupons/validate", keys.read, {"code": "CODE-AAAA"}, status=404)
        await earn(client, keys, "acme", 100)
        codes = {(await redeem(client, keys, "acme", "pooled"))["coupon_code"] for _ in range(2)}
        assert codes == {"CODE-AAAA", "CODE-BBBB"}
        assert (await redeem(client, keys, "acme", "pooled", status=409))["error"] == "OutOfStock"
        assert (await balance(client, keys, "acme"))["held"] == 20

    async def test_a_cancelled_orders_code_is_void(self, client: httpx.AsyncClient, keys: Keys) -> None:
        await reward(client, keys, "c", kind="coupon", points=10)
        await earn(client, keys, "acme", 100)
        order = await redeem(client, keys, "acme", "c")
        await call(client, "POST", f"/v1/redemptions/{order['order_id']}/cancel", keys.write, status=201)
        checked = await call(
            client, "POST", "/v1/coupons/validate", keys.read, {"code": order["coupon_code"]}, status=200
        )
        assert (checked["status"], checked["valid"]) == ("void", False)
        body = {"code": order["coupon_code"], "purchase_order_id": "SO-1"}
        assert (await call(client, "POST", "/v1/coupons/consume", keys.write, body, status=409))[
            "coupon_status"
        ] == "void"


def refund(
    tenant: str, customer: str, order: str, refund_id: str, amount: str, currency: str = "EUR"
) -> CloudEvent[Any]:
    data = PurchaseRefunded(
        refund_id=refund_id,
        original_order_id=order,
        customer_id=customer,
        currency=currency,
        lines=[RefundedLine(sku="S", quantity=Decimal(1), amount=Decimal(amount))],
    )
    return make_event("purchase.refunded", data, tenant_id=tenant, source="webshop")


class TestDiscountsAndRefunds:
    async def test_refunds_give_points_back_in_proportion_exactly_once(
        self, client: httpx.AsyncClient, keys: Keys, db: async_sessionmaker[AsyncSession]
    ) -> None:
        await call(
            client, "PUT", "/v1/reward-settings", keys.admin, {"point_value": "0.01", "currency": "EUR"}, status=200
        )
        await reward(client, keys, "five-off", kind="discount", points=500)
        await earn(client, keys, "acme", 1000)
        missing = await redeem(client, keys, "acme", "five-off", status=422)
        assert "purchase_order_id" in missing["detail"]
        order = await redeem(client, keys, "acme", "five-off", purchase_order_id="SO-9", order_amount="200.00")
        assert (Decimal(order["value"]), order["currency"]) == (Decimal(5), "EUR")
        await call(client, "POST", f"/v1/redemptions/{order['order_id']}/confirm", keys.write, status=201)
        assert (await balance(client, keys, "acme"))["available"] == 500
        first = refund(keys.tenant, "acme", "SO-9", "R-1", "50.00")  # a quarter of the order
        replay = first.model_copy(update={"id": str(uuid.uuid4())})  # the same refund under another event id
        wrong = refund(keys.tenant, "acme", "SO-9", "R-X", "10.00", currency="USD")
        unrelated = refund(keys.tenant, "acme", "SO-other", "R-2", "99.00")
        async with transaction(db) as session:
            rejections = await rewards_service.handle_purchase_events(
                session, [inbound(e) for e in (first, first, replay, wrong, unrelated)]
            )
        reasons = sorted(r.reason for r in rejections)
        assert len(reasons) == 2
        assert "refund_id 'R-1' was already processed" in reasons[1]
        assert "USD" in reasons[0]
        after = await balance(client, keys, "acme")
        assert (after["available"], after["redeemed"]) == (500 + 125, 500 - 125)
        state = await call(client, "GET", f"/v1/redemptions/{order['order_id']}", keys.read, status=200)
        assert (state["state"], state["points_returned"], Decimal(state["refunded_amount"])) == (
            "confirmed",
            125,
            Decimal(50),
        )
        # The rest of the order: every point comes back, and the order is refunded.
        async with transaction(db) as session:
            assert (
                await rewards_service.handle_purchase_events(
                    session, [inbound(refund(keys.tenant, "acme", "SO-9", "R-3", "150.00"))]
                )
                == []
            )
        assert (await balance(client, keys, "acme"))["available"] == 1000
        state = await call(client, "GET", f"/v1/redemptions/{order['order_id']}", keys.read, status=200)
        assert (state["state"], state["points_returned"]) == ("refunded", 500)
        changes = [e.data.change for e in await events_of(db, keys.tenant)]
        assert changes == ["reserved", "confirmed", "refunded", "refunded"]
        await check_books(db, keys.tenant)


class TestPrivileges:
    async def test_a_confirmed_privilege_is_an_entitlement_for_its_duration(
        self, client: httpx.AsyncClient, keys: Keys
    ) -> None:
        await reward(client, keys, "priority", kind="privilege", points=100, duration_days=90, name="Priority delivery")
        await earn(client, keys, "acme", 100)
        order = await redeem(client, keys, "acme", "priority")
        assert (await call(client, "GET", "/v1/customers/acme/entitlements", keys.read, status=200))["items"] == []
        await call(client, "POST", f"/v1/redemptions/{order['order_id']}/confirm", keys.write, status=201)
        now = await call(client, "GET", "/v1/customers/acme/entitlements", keys.read, status=200)
        (item,) = now["items"]
        starts, ends = datetime.fromisoformat(item["starts_at"]), datetime.fromisoformat(item["ends_at"])
        assert (item["name"], ends - starts) == ("Priority delivery", timedelta(days=90))
        beyond = (ends + timedelta(seconds=1)).isoformat()
        later = await client.get(
            "/v1/customers/acme/entitlements", params={"at": beyond}, headers={"X-API-Key": keys.read}
        )
        assert later.json()["items"] == []


class TestTenantIsolation:
    async def test_another_tenants_key_sees_and_changes_nothing(self, client: httpx.AsyncClient, keys: Keys) -> None:
        await call(client, "PUT", "/v1/reward-settings", keys.admin, {"tiers": ["gold"]}, status=200)
        await reward(client, keys, "mug", points=10, stock=3)
        await earn(client, keys, "acme", 100)
        order = await redeem(client, keys, "acme", "mug")
        other = Keys(
            "other",
            await create_api_key("ledger", "other-" + uuid.uuid4().hex[:8], ["admin"]),
            await create_api_key("ledger", "other-" + uuid.uuid4().hex[:8], ["points:read", "points:write"]),
            "",
        )
        oid = order["order_id"]
        await call(client, "GET", f"/v1/redemptions/{oid}", other.write, status=404)
        await call(client, "POST", f"/v1/redemptions/{oid}/confirm", other.write, status=404)
        await call(client, "POST", f"/v1/redemptions/{oid}/cancel", other.write, status=404)
        await call(client, "GET", "/v1/rewards/mug", other.write, status=404)
        await call(client, "PUT", "/v1/rewards/mug", other.admin, {"name": "x", "points": 1}, status=404)
        await call(client, "DELETE", "/v1/rewards/mug", other.admin, status=404)
        await call(client, "GET", "/v1/customers/acme/rewards", other.write, status=404)
        assert (await call(client, "GET", "/v1/rewards", other.write, status=200))["items"] == []
        assert (await redeem(client, other, "acme", "mug", status=404))["error"] == "AccountNotFound"
        codes = {"codes": ["CODE-1234"]}
        await call(client, "POST", "/v1/rewards/mug/coupons", other.admin, codes, status=404)
        members = {"all_members": False, "members": [{"member_id": "x"}]}
        await call(client, "PUT", "/v1/customers/acme/redeemers", other.admin, members, status=200)
        assert (await call(client, "GET", "/v1/customers/acme/redeemers", keys.read, status=200))["all_members"] is True
        assert (await call(client, "GET", "/v1/customers/acme/entitlements", other.write, status=200))["items"] == []
        assert (await call(client, "GET", "/v1/reward-settings", other.write, status=200))["tiers"] == []
        assert (await call(client, "GET", f"/v1/redemptions/{oid}", keys.read, status=200))["state"] == "reserved"
        assert (await call(client, "GET", "/v1/rewards/mug", keys.read, status=200))["stock"] == 2


class TestConcurrency:
    async def test_fifty_parallel_redemptions_of_the_last_five_never_oversell_or_overdraw(
        self, client: httpx.AsyncClient, keys: Keys, db: async_sessionmaker[AsyncSession]
    ) -> None:
        await reward(client, keys, "last", points=100, stock=5)
        customers = [f"c-{i:02d}" for i in range(25)]
        for customer in customers:  # enough for one redemption each, two asked for by each
            await earn(client, keys, customer, 150)

        async def attempt(customer: str) -> httpx.Response:
            body = {"customer_id": customer, "reward_id": "last"}
            return await client.post("/v1/redemptions", json=body, headers=h(keys.write))

        responses = await asyncio.gather(*(attempt(c) for c in customers * 2))
        won = [r.json() for r in responses if r.status_code == 201]
        refused = [r.json()["error"] for r in responses if r.status_code != 201]
        assert len(won) == 5
        assert set(refused) <= {"OutOfStock", "InsufficientPoints"}
        assert len(refused) == 45
        assert all(r.status_code in (201, 409) for r in responses)
        async with db() as session:
            stock = (await session.execute(select(Reward.stock).where(Reward.tenant_id == keys.tenant))).scalar_one()
            orders = (
                await session.execute(select(RedemptionOrder).where(RedemptionOrder.tenant_id == keys.tenant))
            ).scalars()
            held = {
                b.account_id: (b.available, b.held)
                for b in (await session.execute(select(Balance).where(Balance.tenant_id == keys.tenant))).scalars()
                if b.kind == "customer"
            }
        assert stock == 0
        winners = [o.customer_id for o in orders]
        assert sorted(winners) == sorted(w["customer_id"] for w in won)
        for customer, (available, on_hold) in held.items():
            assert (available, on_hold) == ((50, 100) if customer in winners else (150, 0))
        await check_books(db, keys.tenant)


async def shares(db: async_sessionmaker[AsyncSession], tenant: str, reward_id: str) -> list[int]:
    async with db() as session:
        found = await session.execute(
            select(RewardStock.units)
            .where(RewardStock.tenant_id == tenant, RewardStock.reward_id == reward_id)
            .order_by(RewardStock.shard)
        )
        return list(found.scalars())


async def blocked_by(db: async_sessionmaker[AsyncSession], pid: int, task: asyncio.Task[Any]) -> bool:
    """True once some backend waits for a lock the backend `pid` holds; False if `task` finished first."""
    query = text("SELECT count(*) FROM pg_stat_activity WHERE CAST(:pid AS int) = ANY(pg_blocking_pids(pid))")
    while not task.done():
        async with db() as session:
            if (await session.execute(query, {"pid": pid})).scalar_one():
                return True
        await asyncio.sleep(0.01)
    return False


class TestStockShares:
    """A stocked reward's units are spread over `STOCK_SHARDS` rows: a redemption takes a unit from a share no
    other transaction holds, and waits for a held one only when no other share has units left."""

    async def test_stock_is_spread_evenly_and_set_anew(
        self, client: httpx.AsyncClient, keys: Keys, db: async_sessionmaker[AsyncSession]
    ) -> None:
        assert STOCK_SHARDS == 8  # the figures below are worked out for 8 shares
        await reward(client, keys, "mug", stock=10)
        assert await shares(db, keys.tenant, "mug") == [2, 2, 1, 1, 1, 1, 1, 1]

        async def put(**fields: Any) -> Any:
            body = {"name": "Mug", "points": 100, **fields}
            return await call(client, "PUT", "/v1/rewards/mug", keys.admin, body, status=200)

        assert (await put(stock=3))["stock"] == 3
        assert await shares(db, keys.tenant, "mug") == [1, 1, 1, 0, 0, 0, 0, 0]
        assert (await put())["stock"] is None  # unlimited: no shares at all
        assert await shares(db, keys.tenant, "mug") == []
        assert (await put(stock=0))["stock"] == 0
        assert await shares(db, keys.tenant, "mug") == [0] * 8
        assert (await put(stock=MAX_POINTS))["stock"] == MAX_POINTS
        largest = await shares(db, keys.tenant, "mug")
        assert sum(largest) == MAX_POINTS
        assert max(largest) - min(largest) <= 1
        listed = await call(client, "GET", "/v1/rewards", keys.read, status=200)
        assert [(r["reward_id"], r["stock"]) for r in listed["items"]] == [("mug", MAX_POINTS)]
        assert (await call(client, "DELETE", "/v1/rewards/mug", keys.admin, status=200))["outcome"] == "deleted"
        assert await shares(db, keys.tenant, "mug") == []

    async def test_a_held_share_does_not_block_a_redemption(
        self, client: httpx.AsyncClient, keys: Keys, db: async_sessionmaker[AsyncSession]
    ) -> None:
        await reward(client, keys, "mug", points=10, stock=16)
        await earn(client, keys, "acme", 100)
        async with db() as session, session.begin():
            # Another transaction holds the first share, as a redemption between its take and its commit does.
            held = select(RewardStock).where(
                RewardStock.tenant_id == keys.tenant, RewardStock.reward_id == "mug", RewardStock.shard == 0
            )
            await session.execute(held.with_for_update())
            # Were it to wait for the held share, this would time out.
            await asyncio.wait_for(redeem(client, keys, "acme", "mug"), timeout=30)
            left = await shares(db, keys.tenant, "mug")
            assert (left[0], sorted(left)) == (2, [1, 2, 2, 2, 2, 2, 2, 2])  # taken from another share
        assert (await call(client, "GET", "/v1/rewards/mug", keys.read, status=200))["stock"] == 15

    @pytest.mark.parametrize("holder_commits", [True, False])
    async def test_when_every_share_with_units_is_held_a_redemption_waits_for_it(
        self, client: httpx.AsyncClient, keys: Keys, db: async_sessionmaker[AsyncSession], holder_commits: bool
    ) -> None:
        await reward(client, keys, "mug", points=10, stock=1)
        await earn(client, keys, "acme", 100)
        labels = {"kind": "gift", "change": "reserved"}
        counted = REGISTRY.get_sample_value("ledger_redemption_changes_total", labels) or 0
        async with db() as session:
            async with session.begin():
                # Another transaction takes the last unit and has not committed yet.
                pid = (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
                await session.execute(
                    update(RewardStock)
                    .where(RewardStock.tenant_id == keys.tenant, RewardStock.reward_id == "mug", RewardStock.units > 0)
                    .values(units=RewardStock.units - 1)
                )
                status = 409 if holder_commits else 201
                waiting = asyncio.create_task(redeem(client, keys, "acme", "mug", status=status))
                assert await asyncio.wait_for(blocked_by(db, pid, waiting), timeout=30), await waiting
                if not holder_commits:
                    await session.rollback()
            answer = await asyncio.wait_for(waiting, timeout=30)
        # Taken by the other transaction: out of stock. Given back (rolled back): the waiting redemption has it.
        assert answer["error"] == "OutOfStock" if holder_commits else answer["state"] == "reserved"
        assert await shares(db, keys.tenant, "mug") == [0] * 8
        assert (await balance(client, keys, "acme"))["available"] == (100 if holder_commits else 90)
        # A redemption refused at its last statement (everything rolled back) is not counted as reserved.
        assert REGISTRY.get_sample_value("ledger_redemption_changes_total", labels) == counted + (not holder_commits)


class TestOutboxRows:
    async def test_events_carry_the_contract(
        self, client: httpx.AsyncClient, keys: Keys, db: async_sessionmaker[AsyncSession]
    ) -> None:
        await reward(client, keys, "mug", points=10, value="3.50", currency="EUR")
        await earn(client, keys, "acme", 100)
        order = await redeem(client, keys, "acme", "mug", member_id="buyer-1")
        (event,) = await events_of(db, keys.tenant)
        assert (event.type, event.subject, event.key) == ("redemption.changed", "acme", f"{keys.tenant}:acme".encode())
        data = json.loads(event.to_bytes())["data"]
        assert data["order_id"] == order["order_id"]
        assert (data["reward_kind"], data["points"], Decimal(data["value"]), data["member_id"]) == (
            "gift",
            10,
            Decimal("3.5"),
            "buyer-1",
        )
        async with db() as session:
            code_rows = (await session.execute(select(Coupon).where(Coupon.tenant_id == keys.tenant))).all()
        assert code_rows == []
