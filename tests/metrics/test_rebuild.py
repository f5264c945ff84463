"""`loyalty metrics rebuild`: the topics replayed from the beginning into fresh aggregates give the same
numbers, through Kafka; another tenant's aggregates stay as they were."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from metrics.app import create_app
from metrics.rebuild import rebuild
from shared.db import create_engine
from shared.topics import ENGAGEMENT, LEDGER_ENTRIES, PURCHASES, REWARDS
from tests.conftest import create_api_key, database_url, eventually, running_app, service_settings
from tests.factories import purchase, redemption
from tests.metrics.test_consumers import at, entry, refund, send, survey

pytestmark = [pytest.mark.kafka, pytest.mark.db]

QUERIES = [
    ("/v1/kpis", {"from": "2024-01-01", "to": "2025-07-01", "period": "quarter"}),
    ("/v1/kpis", {"from": "2025-01-01", "to": "2025-03-01", "period": "week"}),
    ("/v1/kpis/lifetime", {"as_of": "2025-06-30"}),
    ("/v1/kpis/lifetime", {}),
    ("/v1/kpis/cohorts", {"period": "month", "from": "2024-01-01", "to": "2025-07-01"}),
    ("/v1/kpis/redemptions", {"from": "2025-01-01", "to": "2025-07-01"}),
    ("/v1/kpis/redemptions", {"from": "2025-02-02", "to": "2025-02-03"}),
]


async def snapshot(client: httpx.AsyncClient, key: str) -> list[Any]:
    return [(await client.get(path, params=params, headers={"X-API-Key": key})).json() for path, params in QUERIES]


class TestRebuild:
    async def test_replaying_the_topics_gives_the_same_numbers(
        self, raw_producer: AIOKafkaProducer, tenant: str
    ) -> None:
        other = f"{tenant}-b"
        keys = {t: await create_api_key("metrics", t, ["metrics:read"]) for t in (tenant, other)}
        orders = [
            purchase(t, f"c-{i % 4}", net=f"{10 + i}.50", ordered_at=at(f"2025-0{1 + i % 6}-1{i % 9}"))
            for t in (tenant, other)
            for i in range(12)
        ]
        orders.append(purchase(tenant, "c-9", net="99.00", ordered_at=at("2024-03-03")))
        refunds = [refund(tenant, "c-1", orders[1].data.order_id, "5.00", at("2025-05-01"))]
        surveys = [survey(tenant, f"c-{i}", 10 - i * 3, i + 1, at(f"2025-02-0{i + 1}")) for i in range(3)]
        ledger = [
            entry(tenant, "c-0", "earn", 40, at("2025-01-10")),
            entry(tenant, "c-0", "redeem", -15, at("2025-02-10")),
        ]
        # A coupon confirmed on 2 February, its consumption on the 3rd sent first; a cancelled gift.
        coupon = {"reward_id": "cpn", "reward_kind": "coupon"}
        rewards = [
            redemption(tenant, f"{tenant}-R1", "coupon_consumed", **coupon, occurred_at=at("2025-02-03")),
            redemption(tenant, f"{tenant}-R1", "reserved", **coupon, occurred_at=at("2025-02-01")),
            redemption(tenant, f"{tenant}-R1", "confirmed", **coupon, occurred_at=at("2025-02-02")),
            redemption(tenant, f"{tenant}-R2", "reserved", occurred_at=at("2025-03-01")),
            redemption(tenant, f"{tenant}-R2", "cancelled", occurred_at=at("2025-03-02")),
        ]
        settings = service_settings("metrics", consumer_group_suffix=f"-{tenant}")
        async with running_app(create_app(settings)) as client:
            await send(raw_producer, PURCHASES, [*refunds, *orders])
            await send(raw_producer, ENGAGEMENT, surveys)
            await send(raw_producer, LEDGER_ENTRIES, ledger)
            await send(raw_producer, REWARDS, rewards)

            async def settled() -> list[Any] | None:
                views = await snapshot(client, keys[tenant])
                lifetime = views[3]
                done = lifetime["orders"] == 13 and lifetime["liability"]["available_points"] == 25
                kinds = {t["reward_kind"]: t for t in views[5]["totals"]}
                done = done and (kinds["coupon"]["confirmed"], kinds["gift"]["cancelled"]) == (1, 1)
                theirs = await snapshot(client, keys[other])
                return (
                    [views, theirs]
                    if done and theirs[3]["orders"] == 12 and views[0]["items"][4]["nps_responses"] == 3
                    else None
                )

            before, theirs_before = await eventually(settled)
        # Spoil the tenant's aggregates: the rebuild must recompute them, not keep them.
        engine = create_engine(database_url("metrics"), pool_size=1)
        try:
            async with engine.begin() as conn:
                await conn.exec_driver_sql(
                    f"update metrics.daily set orders = orders + 100 where tenant_id = '{tenant}'"
                )
                await conn.exec_driver_sql(f"delete from metrics.customers where tenant_id = '{tenant}'")
                await conn.exec_driver_sql(
                    f"update metrics.redemptions_daily set reserved = reserved + 7 where tenant_id = '{tenant}'"
                )
        finally:
            await engine.dispose()
        replayed = await rebuild(service_settings("metrics"), tenant, poll_s=0.1)
        async with running_app(create_app(service_settings("metrics", consumers_enabled=False))) as client:
            after = await snapshot(client, keys[tenant])
            theirs_after = await snapshot(client, keys[other])
        assert replayed.events[PURCHASES] == 14
        assert replayed.events[ENGAGEMENT] == 3
        assert replayed.events[LEDGER_ENTRIES] == 2
        assert replayed.events[REWARDS] == 5
        assert after == before
        assert theirs_after == theirs_before
        assert before[3]["orders"] == 13
        figures = [
            (i["reward_id"], i["reserved"], i["confirmed"], i["coupons_consumed"], i["cancelled"])
            for i in before[5]["items"]
        ]
        assert figures == [("cpn", 1, 1, 1, 0), ("gift-1", 1, 0, 0, 1)]
        # The coupon is confirmed once, on its confirmation's day (2 February), not its consumption's.
        assert [(i["reward_id"], i["confirmed"], i["coupons_consumed"]) for i in before[6]["items"]] == [("cpn", 1, 0)]
