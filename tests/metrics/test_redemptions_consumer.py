"""Redemptions per reward and kind through Kafka: `redemption.changed` events on the test namespace's rewards
topic, as the ledger's rewards outbox publishes them (out of order, a redelivery, a second event for one change,
an order whose facts change, an invalid event), into GET /v1/kpis/redemptions, against numbers computed by
hand (the comments show the arithmetic)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from metrics.app import create_app
from shared.events import CloudEvent
from shared.topics import REWARDS
from tests.conftest import KAFKA, create_api_key, dead_letters_for, eventually, running_app, service_settings, topic
from tests.factories import redemption
from tests.groups import group_lag

pytestmark = [pytest.mark.kafka, pytest.mark.db]

# reward id -> (kind, points, value, currency)
REWARDS_OF = {
    "mug": ("gift", 100, Decimal("12.50"), "EUR"),
    "cpn-10": ("coupon", 300, Decimal("10.00"), "EUR"),
    "disc-2": ("discount", 200, Decimal("2.00"), "EUR"),
    "vip": ("privilege", 500, None, None),
}


def at(day: str, hour: int = 12) -> datetime:
    return datetime.fromisoformat(day).replace(hour=hour, tzinfo=UTC)


def changed(
    tenant: str, order: str, reward: str, change: str, when: datetime, *, customer: str = "c-1", **extra: Any
) -> CloudEvent[Any]:
    kind, points, value, currency = REWARDS_OF[reward]
    return redemption(
        tenant,
        f"{tenant}-{order}",
        change,
        customer=customer,
        reward_id=reward,
        reward_kind=kind,
        points=points,
        value=value,
        currency=currency,
        occurred_at=when,
        **extra,
    )


def figures(reserved: int = 0, confirmed: int = 0, cancelled: int = 0, expired: int = 0, refunded: int = 0,
            coupons: int = 0, points_reserved: int = 0, spent: int = 0, returned: int = 0,
            values: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    return {
        "reserved": reserved,
        "confirmed": confirmed,
        "cancelled": cancelled,
        "expired": expired,
        "refunded": refunded,
        "coupons_consumed": coupons,
        "points_reserved": points_reserved,
        "points_spent": spent,
        "points_returned": returned,
        "values": [{"currency": c, "value": v} for c, v in sorted((values or {}).items())],
    }


def item(reward: str, **kw: Any) -> dict[str, Any]:
    return {**figures(**kw), "reward_id": reward, "reward_kind": REWARDS_OF[reward][0]}


def plain(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Money values as Decimals (the API sends strings: "25.00" and "25.0" are the same amount)."""
    return [
        {**e, "values": [{"currency": v["currency"], "value": Decimal(v["value"])} for v in e["values"]]}
        for e in entries
    ]


class TestRedemptionsThroughKafka:
    async def test_orders_per_reward_and_kind_by_hand(self, raw_producer: AIOKafkaProducer, tenant: str) -> None:
        key = await create_api_key("metrics", tenant, ["metrics:read"])
        other = f"{tenant}-b"
        o1_confirmed = changed(tenant, "O1", "mug", "confirmed", at("2025-03-02"))
        o7_confirmed = changed(tenant, "O7", "vip", "confirmed", at("2025-03-06"), customer="c-4")
        # The same change of O7 again under another event id: a second confirmation is the producer's error.
        o7_again = changed(tenant, "O7", "vip", "confirmed", at("2025-03-06", 13), customer="c-4")
        # O1 is a mug in its earlier events; an event saying it is a coupon is refused, not counted twice.
        o1_coupon = changed(tenant, "O1", "cpn-10", "coupon_consumed", at("2025-03-03"), state="confirmed")
        invalid = json.loads(changed(tenant, "O8", "mug", "reserved", at("2025-03-03")).to_bytes())
        invalid["data"]["reward_kind"] = "voucher"
        invalid_bytes = json.dumps(invalid).encode()
        events = [
            # mug (gift, 100 points, 12.50 EUR)
            changed(tenant, "O1", "mug", "reserved", at("2025-03-01")),
            o1_confirmed,
            o1_confirmed,  # a redelivery: skipped
            changed(tenant, "O2", "mug", "reserved", at("2025-03-01", 9), customer="c-2"),
            changed(tenant, "O2", "mug", "cancelled", at("2025-03-01", 10), customer="c-2"),
            changed(tenant, "O3", "mug", "reserved", at("2025-03-02"), customer="c-3"),
            changed(tenant, "O3", "mug", "expired", at("2025-03-05"), customer="c-3"),
            changed(tenant, "O9", "mug", "reserved", at("2025-02-28"), customer="c-3"),  # before the window
            changed(tenant, "O9", "mug", "confirmed", at("2025-03-01"), customer="c-3"),
            # cpn-10 (coupon, 300 points, 10.00 EUR): O4 confirmed by consuming its coupon; O5 confirmed on the
            # 3rd and its coupon consumed on the 4th, the consumption arriving first.
            changed(tenant, "O4", "cpn-10", "reserved", at("2025-03-02"), customer="c-2"),
            changed(tenant, "O4", "cpn-10", "coupon_consumed", at("2025-03-03"), customer="c-2", state="confirmed"),
            changed(tenant, "O5", "cpn-10", "coupon_consumed", at("2025-03-04"), customer="c-3", state="confirmed"),
            changed(tenant, "O5", "cpn-10", "reserved", at("2025-03-03", 9), customer="c-3"),
            changed(tenant, "O5", "cpn-10", "confirmed", at("2025-03-03", 10), customer="c-3"),
            # disc-2 (discount, 200 points, 2.00 EUR): refunded in two parts, the last one first (50, then 200).
            changed(tenant, "O6", "disc-2", "reserved", at("2025-03-04", 9), customer="c-4"),
            changed(tenant, "O6", "disc-2", "confirmed", at("2025-03-04", 10), customer="c-4"),
            changed(tenant, "O6", "disc-2", "refunded", at("2025-03-07"), customer="c-4", points_returned=200),
            changed(
                tenant,
                "O6",
                "disc-2",
                "refunded",
                at("2025-03-06"),
                customer="c-4",
                state="confirmed",
                points_returned=50,
            ),
            # vip (privilege, 500 points, no value)
            changed(tenant, "O7", "vip", "reserved", at("2025-03-05"), customer="c-4"),
            o7_confirmed,
            o7_again,
            o1_coupon,
            # Another tenant's order counts for that tenant only.
            changed(other, "O1", "mug", "reserved", at("2025-03-01")),
        ]
        settings = service_settings("metrics", consumer_group_suffix=f"-{tenant}")
        march = {"from": "2025-03-01", "to": "2025-04-01"}
        items = [
            # O4 and O5 reserved, both confirmed (O4 by its coupon), both coupons consumed: 2 x 300 points.
            item(
                "cpn-10",
                reserved=2,
                confirmed=2,
                coupons=2,
                points_reserved=600,
                spent=600,
                values={"EUR": "20.00"},
            ),
            # O6: 200 points spent, all 200 returned (50 + 150), refunded in full once.
            item(
                "disc-2",
                reserved=1,
                confirmed=1,
                refunded=1,
                points_reserved=200,
                spent=200,
                returned=200,
                values={"EUR": "2.00"},
            ),
            # O1, O2, O3 reserved in March (O9 in February); O1 and O9 confirmed: 2 x 12.50.
            item(
                "mug",
                reserved=3,
                confirmed=2,
                cancelled=1,
                expired=1,
                points_reserved=300,
                spent=200,
                values={"EUR": "25.00"},
            ),
            item("vip", reserved=1, confirmed=1, points_reserved=500, spent=500),
        ]
        # Each kind has one reward here: its totals are that reward's figures.
        totals = [
            {k: v for k, v in entry.items() if k != "reward_id"}
            for kind in ("gift", "privilege", "discount", "coupon")
            for entry in items
            if entry["reward_kind"] == kind
        ]
        want = {"start": "2025-03-01", "end": "2025-04-01", "items": plain(items), "totals": plain(totals)}
        async with running_app(create_app(settings)) as client:
            for event in events:
                await raw_producer.send_and_wait(topic(REWARDS), event.to_bytes(), key=event.key)
            await raw_producer.send_and_wait(topic(REWARDS), invalid_bytes, key=f"{tenant}:c-1".encode())

            async def summary(params: dict[str, str], api_key: str = key) -> dict[str, Any]:
                response = await client.get("/v1/kpis/redemptions", params=params, headers={"X-API-Key": api_key})
                assert response.status_code == 200, response.text
                body: dict[str, Any] = response.json()
                return {**body, "items": plain(body["items"]), "totals": plain(body["totals"])}

            async def settled() -> dict[str, Any] | None:
                body = await summary(march)
                return body if body == want else None

            await eventually(settled)
            [again] = await dead_letters_for(o7_again.id.encode())
            [mixed] = await dead_letters_for(o1_coupon.id.encode())
            [bad] = await dead_letters_for(invalid["id"].encode())

            async def caught_up() -> bool:
                return await group_lag(KAFKA, lambda group: group == f"metrics-rewards-{tenant}") == 0

            await eventually(caught_up)
            # Everything consumed, the redelivery and the refused events included: the figures stay.
            assert await summary(march) == want
            first_days = await summary({"from": "2025-03-01", "to": "2025-03-03"})
            february = await summary({"from": "2025-02-01", "to": "2025-03-01"})
            theirs = await summary(march, await create_api_key("metrics", other, ["metrics:read"]))
        # The 1st and 2nd: O1, O2 and O3 reserved, O1 and O9 confirmed, O2 cancelled; O4 reserved (its coupon on
        # the 3rd).
        assert first_days["items"] == plain(
            [
                item("cpn-10", reserved=1, points_reserved=300),
                item(
                    "mug", reserved=3, confirmed=2, cancelled=1, points_reserved=300, spent=200, values={"EUR": "25.00"}
                ),
            ]
        )
        assert february["items"] == plain([item("mug", reserved=1, points_reserved=100)])
        assert theirs["items"] == plain([item("mug", reserved=1, points_reserved=100)])
        assert again.reason == f"redemption_change 'confirmed:{tenant}-O7' was already processed under another event id"
        assert mixed.reason == (
            f"redemption order '{tenant}-O1' is reward 'mug' (gift, 100 points, value 12.50 EUR) in earlier events; "
            "this event says reward 'cpn-10' (coupon, 300 points, value 10.00 EUR)"
        )
        assert bad.reason == (
            "invalid redemption.changed v1: data.reward_kind: Input should be 'gift', 'privilege', 'discount' or "
            "'coupon'"
        )
        assert bad.code == "invalid"
