"""Segments against PostgreSQL: classification from the metrics tables, the stored segment and its outbox
event on a change only, the scheduled run (time alone makes leavers; a failing tenant holds back no other),
and the REST list, its pagination, the CSV export and a customer's metrics."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, cast

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from metrics.app import create_app
from metrics.service import encode_cursor, segment_service
from metrics.tasks import classify_all
from shared.consumer import Inbound
from shared.db import AsyncSession, create_sessionmaker, transaction
from shared.events import SegmentChanged, decode_event, utcnow
from tests.conftest import create_api_key, running_app, service_settings
from tests.factories import purchase
from tests.metrics.helpers import NOW, add_customer, ago, metrics_engine

pytestmark = [pytest.mark.db]

NS = "seg-test."


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[AsyncEngine]:
    async with metrics_engine() as engine:
        yield engine


@pytest.fixture
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return create_sessionmaker(engine)


async def stored(engine: AsyncEngine, tenant: str) -> dict[str, tuple[str, datetime]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("select customer_id, segment, since from metrics.customer_segments where tenant_id = :t"),
            {"t": tenant},
        )
        return {r.customer_id: (r.segment, r.since) for r in rows}


async def published(engine: AsyncEngine, tenant: str) -> list[Any]:
    """The segment.changed events waiting in the outbox for this tenant (oldest first)."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("select key, value from metrics.outbox where key like :k order by id"), {"k": f"{tenant}:%".encode()}
        )
        events = [decode_event(r.value) for r in rows]
    return [e for e in events if e.tenantid == tenant]


async def reclassify(sessions: async_sessionmaker[AsyncSession], tenant: str, ids: list[str], now: datetime) -> int:
    async with transaction(sessions) as session:
        return await segment_service.reclassify(session, tenant, ids, now=now, namespace=NS)


class TestReclassify:
    async def test_each_segment_from_the_tables_and_an_event_per_change(
        self, engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession], tenant: str
    ) -> None:
        await add_customer(engine, tenant, "new", [10])
        await add_customer(engine, tenant, "loyal", [700, 600, 500, 400, 300, 200, 100, 10])  # gaps of 100 days
        await add_customer(engine, tenant, "risky", [400, 300, 250, 240, 230])  # gaps 100, 50, 10, 10: median 30
        await add_customer(engine, tenant, "gone", [500, 400])
        await add_customer(engine, tenant, "fan", [300, 200], last_referral_at=ago(20))
        await add_customer(engine, tenant, "promoter", [300, 200], last_nps=10, last_nps_at=ago(5))
        await add_customer(engine, tenant, "shopper", [600, 200], discounted=2)  # 2 of 2 discounted, 1 a year
        await add_customer(engine, tenant, "fading", [300, 100], prediction=(0.1, "50"))
        await add_customer(engine, tenant, "angry", [300, 200], last_nps=3, last_nps_at=ago(150))
        await add_customer(engine, tenant, "no-purchase", [], last_review_at=ago(1))
        ids = ["new", "loyal", "risky", "gone", "fan", "promoter", "shopper", "fading", "angry", "no-purchase"]
        changed = await reclassify(sessions, tenant, ids, NOW)
        segments = {c: s for c, (s, _) in (await stored(engine, tenant)).items()}
        assert segments == {
            "new": "new",
            "loyal": "loyal_passive",
            "risky": "at_risk",  # 230 days since the last purchase > 2 x 30
            "gone": "leaver",
            "fan": "ambassador",
            "promoter": "ambassador",
            "shopper": "price_shopper",
            "fading": "at_risk",
            "angry": "leaver",  # detractor 150 days ago, no purchase since
        }
        assert changed == 9
        events = await published(engine, tenant)
        assert {(e.data.customer_id, e.data.previous_segment, e.data.segment) for e in events} == {
            (c, None, s) for c, s in segments.items()
        }
        assert all(isinstance(e.data, SegmentChanged) and e.time == NOW and e.source == "metrics" for e in events)
        assert {e.key for e in events} == {f"{tenant}:{c}".encode() for c in segments}

    async def test_no_change_no_event_and_time_alone_makes_a_leaver(
        self, engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession], tenant: str
    ) -> None:
        await add_customer(engine, tenant, "c", [200, 100, 10])  # gaps 100, 90: median 95
        assert await reclassify(sessions, tenant, ["c"], NOW) == 1
        assert await reclassify(sessions, tenant, ["c"], NOW + timedelta(days=1)) == 0
        later = NOW + timedelta(days=200)  # 210 days since the last purchase > 2 x 95: at risk
        assert await reclassify(sessions, tenant, ["c"], later) == 1
        gone = NOW + timedelta(days=400)
        assert await reclassify(sessions, tenant, ["c"], gone) == 1
        events = await published(engine, tenant)
        assert [(e.data.previous_segment, e.data.segment) for e in events] == [
            (None, "loyal_passive"),
            ("loyal_passive", "at_risk"),
            ("at_risk", "leaver"),
        ]
        assert (await stored(engine, tenant))["c"] == ("leaver", gone)

    async def test_the_tenants_thresholds_and_window_apply(
        self, engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession], tenant: str
    ) -> None:
        await add_customer(engine, tenant, "c", [100])
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "insert into metrics.tenant_config (tenant_id, activity_window_days, segment_thresholds) "
                    "values (:t, 90, cast(:s as jsonb))"
                ),
                {"t": tenant, "s": json.dumps({"new_days": 200})},
            )
        await reclassify(sessions, tenant, ["c"], NOW)
        assert (await stored(engine, tenant))["c"][0] == "leaver"  # 100 days > a window of 90


class TestPending:
    async def test_marked_customers_are_classified_and_a_failing_tenant_holds_back_no_other(
        self, engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession], tenant: str
    ) -> None:
        broken, now = f"{tenant}-broken", utcnow()
        await add_customer(engine, tenant, "c-1", [10], now=now)
        await add_customer(engine, tenant, "c-2", [200, 100], now=now)
        await add_customer(engine, broken, "c-1", [10], now=now)
        await break_thresholds(engine, broken)
        batch = [
            Inbound(e, "purchases", 0, n, cast(Any, None))
            for n, e in enumerate(
                [purchase(tenant, "c-1"), purchase(tenant, "c-1"), purchase(tenant, "c-2"), purchase(broken, "c-1")]
            )
        ]
        async with transaction(sessions) as session:
            await segment_service.mark_batch(session, batch)
        assert await pending(engine, tenant, broken) == {(tenant, "c-1"), (tenant, "c-2"), (broken, "c-1")}
        taken, failed = await segment_service.reclassify_pending(sessions, namespace=NS, limit=100_000)
        assert taken >= 3
        assert failed == [broken]
        assert {c: s for c, (s, _) in (await stored(engine, tenant)).items()} == {"c-1": "new", "c-2": "loyal_passive"}
        assert await stored(engine, broken) == {}
        assert await pending(engine, tenant, broken) == set()  # the broken tenant's marks go (the daily run retries)


async def break_thresholds(engine: AsyncEngine, tenant: str) -> None:
    """Stores thresholds no PUT would accept (as an older version might have): classifying the tenant fails."""
    async with engine.begin() as conn:
        await conn.execute(
            text("insert into metrics.tenant_config (tenant_id, segment_thresholds) values (:t, cast(:s as jsonb))"),
            {"t": tenant, "s": json.dumps({"new_days": 0})},
        )


async def pending(engine: AsyncEngine, *tenants: str) -> set[tuple[str, str]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("select tenant_id, customer_id from metrics.segments_pending where tenant_id = any(:t)"),
            {"t": list(tenants)},
        )
        return {(r.tenant_id, r.customer_id) for r in rows}


class TestScheduledRun:
    async def test_every_customer_of_each_tenant_in_pages_and_a_failing_tenant_holds_back_no_other(
        self, engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession], tenant: str
    ) -> None:
        broken = f"{tenant}-broken"
        for n in range(7):
            await add_customer(engine, tenant, f"c-{n}", [300])
        await add_customer(engine, broken, "c-0", [300])
        await break_thresholds(engine, broken)
        outcome = await classify_all(sessions, now=NOW, namespace=NS, page=3, tenants=[broken, tenant])
        assert outcome == {broken: None, tenant: (7, 7)}
        assert {s for s, _ in (await stored(engine, tenant)).values()} == {"loyal_passive"}
        assert await stored(engine, broken) == {}
        # A year later, without a purchase: everyone has left.
        outcome = await classify_all(sessions, now=NOW + timedelta(days=100), namespace=NS, page=3, tenants=[tenant])
        assert outcome == {tenant: (7, 7)}
        assert {s for s, _ in (await stored(engine, tenant)).values()} == {"leaver"}


# --- REST ---------------------------------------------------------------------------------------------


def app() -> Any:
    return create_app(service_settings("metrics", consumers_enabled=False))


async def seed_list(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession], tenant: str
) -> list[dict[str, Any]]:
    """12 customers with distinct revenues, half with a CLV prediction (CLV ties included), classified at NOW."""
    rows: list[dict[str, Any]] = []
    for n in range(12):
        days = [700 - 10 * n, 30 + n] if n % 3 else [40 + n]
        prediction = (round(0.05 * n, 2), str(100 * (n % 4))) if n % 2 == 0 else None
        await add_customer(engine, tenant, f"c-{n:02d}", days, amount=str(10 + n), prediction=prediction)
        rows.append({"id": f"c-{n:02d}", "revenue": (10 + n) * len(days), "last": ago(min(days)), "p": prediction})
    await reclassify(sessions, tenant, [r["id"] for r in rows], NOW)
    return rows


async def all_pages(client: Any, key: str, query: str, limit: int) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(50):
        url = f"/v1/customers?{query}&limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        response = await client.get(url, headers={"X-API-Key": key})
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["items"]) <= limit
        items.extend(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("pagination did not end")


class TestCustomerList:
    async def test_every_sort_pages_through_all_customers_in_order(
        self, engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession], tenant: str
    ) -> None:
        rows = await seed_list(engine, sessions, tenant)
        key = await create_api_key("metrics", tenant, ["metrics:read"])
        # The expected orders, computed from the seed: desc with ties by id desc; customers without a
        # prediction last (clv: by id desc; p_alive: ascending, by id).
        with_clv = [r for r in rows if r["p"] is not None]
        without = [r for r in rows if r["p"] is None]
        expected = {
            "revenue": [r["id"] for r in sorted(rows, key=lambda r: (r["revenue"], r["id"]), reverse=True)],
            "last_purchase": [r["id"] for r in sorted(rows, key=lambda r: (r["last"], r["id"]), reverse=True)],
            "clv": [r["id"] for r in sorted(with_clv, key=lambda r: (Decimal(r["p"][1]), r["id"]), reverse=True)]
            + sorted((r["id"] for r in without), reverse=True),
            "p_alive": [r["id"] for r in sorted(with_clv, key=lambda r: (r["p"][0], r["id"]))]
            + sorted(r["id"] for r in without),
        }
        async with running_app(app()) as client:
            for sort, ids in expected.items():
                for limit in (1, 5, 12, 500):
                    items = await all_pages(client, key, f"sort={sort}", limit)
                    assert [i["customer_id"] for i in items] == ids, (sort, limit)
            other = await create_api_key("metrics", f"{tenant}-other", ["metrics:read"])
            theirs = await client.get("/v1/customers", headers={"X-API-Key": other})
        first = next(i for i in items if i["customer_id"] == "c-00")
        assert Decimal(first["net_revenue"]) == Decimal(10)
        assert first["p_alive"] == 0.0
        assert Decimal(first["clv"]) == 0
        assert theirs.json() == {"items": [], "next_cursor": None}

    async def test_segment_filter_and_overview(
        self, engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession], tenant: str
    ) -> None:
        await seed_list(engine, sessions, tenant)
        key = await create_api_key("metrics", tenant, ["metrics:read"])
        async with running_app(app()) as client:
            items = await all_pages(client, key, "sort=revenue&segment=new", 2)
            overview = (await client.get("/v1/segments", headers={"X-API-Key": key})).json()
        # Single-order customers (n divisible by 3) bought 40-51 days ago: new, but for c-00, whose P(alive)
        # of 0.0 makes it at risk (c-06 has 0.3, not under 0.3). By revenue 10 + n, highest first.
        assert [i["customer_id"] for i in items] == ["c-09", "c-06", "c-03"]
        assert {i["segment"] for i in items} == {"new"}
        assert overview["customers"] == 12
        assert overview["counts"]["new"] == 3
        assert sum(overview["counts"].values()) == 12
        assert set(overview["counts"]) == {"ambassador", "loyal_passive", "price_shopper", "at_risk", "leaver", "new"}
        assert overview["thresholds"]["rhythm_factor"] == 2.0
        assert overview["activity_window_days"] == 365

    @pytest.mark.parametrize(
        "query",
        [
            "cursor=not-base64!",
            "cursor=" + encode_cursor("revenue", ["1", "c-1"]) + "&sort=clv",  # another sort's cursor
            "cursor=" + encode_cursor("revenue", ["NaN", "c-1"]) + "&sort=revenue",
            "cursor=" + encode_cursor("last_purchase", ["2026-01-01T00:00:00", "c-1"]) + "&sort=last_purchase",
            "limit=0",
            "limit=501",
            "sort=name",
            "segment=vip",
        ],
    )
    async def test_bad_parameters_are_422_problems(self, tenant: str, query: str) -> None:
        key = await create_api_key("metrics", tenant, ["metrics:read"])
        async with running_app(app()) as client:
            response = await client.get(f"/v1/customers?{query}", headers={"X-API-Key": key})
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == "application/problem+json"

    async def test_the_list_needs_metrics_read(self, tenant: str) -> None:
        key = await create_api_key("metrics", tenant, ["points:read"])
        async with running_app(app()) as client:
            response = await client.get("/v1/customers", headers={"X-API-Key": key})
        assert response.status_code == 403


class TestCsvAndCustomerMetrics:
    async def test_the_csv_holds_every_page_and_defuses_formulas(
        self, engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession], tenant: str
    ) -> None:
        await seed_list(engine, sessions, tenant)
        for n, name in enumerate(['=HYPERLINK("x")', "+1", "-2", "@cmd", 'quote"d,comma']):
            await add_customer(engine, tenant, name, [5 + n])
        await reclassify(sessions, tenant, ['=HYPERLINK("x")', "+1", "-2", "@cmd", 'quote"d,comma'], NOW)
        key = await create_api_key("metrics", tenant, ["metrics:read"])
        async with running_app(app()) as client:
            response = await client.get("/v1/customers.csv?sort=revenue", headers={"X-API-Key": key})
            listed = await all_pages(client, key, "sort=revenue", 500)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/csv")
        table = list(csv.reader(io.StringIO(response.text)))
        assert table[0][:3] == ["customer_id", "segment", "reason"]
        ids = [row[0] for row in table[1:]]
        defused = {'=HYPERLINK("x")': '\'=HYPERLINK("x")', "+1": "'+1", "-2": "'-2", "@cmd": "'@cmd"}
        assert ids == [defused.get(i["customer_id"], i["customer_id"]) for i in listed]
        assert len(ids) == 17
        assert 'quote"d,comma' in ids

    async def test_a_customers_metrics_and_404_for_an_unknown_one(
        self, engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession], tenant: str
    ) -> None:
        await add_customer(
            engine, tenant, "c-1", [30, 10], amount="25.50", prediction=(0.8, "120.5"), last_nps=9, last_nps_at=ago(3)
        )
        await add_customer(engine, tenant, "c-2", [], last_review_at=ago(1))  # engagement only
        await reclassify(sessions, tenant, ["c-1", "c-2"], NOW)
        key = await create_api_key("metrics", tenant, ["metrics:read"])
        async with running_app(app()) as client:
            one = (await client.get("/v1/customers/c-1/metrics", headers={"X-API-Key": key})).json()
            two = (await client.get("/v1/customers/c-2/metrics", headers={"X-API-Key": key})).json()
            missing = await client.get("/v1/customers/nobody/metrics", headers={"X-API-Key": key})
            other = await create_api_key("metrics", f"{tenant}-x", ["metrics:read"])
            theirs = await client.get("/v1/customers/c-1/metrics", headers={"X-API-Key": other})
        assert one["orders"] == 2
        assert Decimal(one["net_revenue"]) == Decimal("51.00")
        assert one["segment"]["segment"] == "new"  # first purchase 30 days ago
        assert one["clv_prediction"]["p_alive"] == 0.8
        assert Decimal(str(one["clv_prediction"]["clv"])) == Decimal("120.5")
        assert two["segment"] is None
        assert two["clv_prediction"] is None
        assert two["orders"] == 0
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"
        assert theirs.status_code == 404
