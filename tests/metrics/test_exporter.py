"""The headline KPI gauges: hand-computed figures from rows in the metrics tables, the cap on tenants, a tenant
whose refresh fails while the others go on, and the series of tenants no longer exported removed."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import async_sessionmaker

from metrics.exporter import Headline, KpiGauges, retention, samples
from metrics.models import Daily
from metrics.tasks import refresh_kpi_gauges
from shared.db import AsyncSession, create_engine, create_sessionmaker, transaction
from tests.conftest import service_settings
from tests.metrics.kpi_rows import TODAY, daily, seed


def value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def headline(**overrides: Any) -> Headline:
    fields: dict[str, Any] = {
        "customers_start": 4,
        "active_customers": 5,
        "new_customers": 2,
        "orders": 7,
        "net_revenue": Decimal("120.50"),
        "points_issued": 10,
        "points_redeemed": 4,
        "points_expired": 1,
        "points_clawed_back": 0,
        "points_available": 300,
        "points_pending": 100,
        "buyers": 8,
        "repeat_buyers": 2,
        "currency": "EUR",
        "point_value": None,
        "responses": 4,
        "promoters": 3,
        "detractors": 1,
    }
    return Headline(**(fields | overrides))


class TestPure:
    def test_retention_is_e_minus_n_over_s_and_undefined_without_customers_at_the_start(self) -> None:
        assert retention(4, 5, 2) == Decimal("0.75")
        assert retention(10, 10, 0) == 1
        assert retention(0, 3, 3) is None

    def test_samples_hand_computed(self) -> None:
        out = {(gauge._name, labels): v for (gauge, labels), v in samples("a", headline(), now=1.0).items()}
        assert out[("loyalty_kpi_retention_ratio", ("a",))] == 0.75
        assert out[("loyalty_kpi_churn_ratio", ("a",))] == 0.25
        assert out[("loyalty_kpi_repeat_purchase_ratio", ("a",))] == 0.25
        assert out[("loyalty_kpi_nps", ("a",))] == 50.0  # (3 - 1) / 4
        assert out[("loyalty_kpi_net_revenue", ("a", "EUR"))] == 120.5
        assert out[("loyalty_kpi_liability_value", ("a", "EUR"))] == 4.0  # 400 points at the default 0.01
        assert out[("loyalty_kpi_points", ("a", "redeemed"))] == 4
        assert out[("loyalty_kpi_liability_points", ("a", "pending"))] == 100

    def test_undefined_figures_have_no_series(self) -> None:
        nothing = {"buyers": 0, "repeat_buyers": 0, "responses": 0, "promoters": 0, "detractors": 0}
        h = headline(customers_start=0, currency=None, **nothing)
        names = {gauge._name for gauge, _ in samples("a", h, now=1.0)}
        assert not names & {
            "loyalty_kpi_retention_ratio",
            "loyalty_kpi_churn_ratio",
            "loyalty_kpi_repeat_purchase_ratio",
            "loyalty_kpi_nps",
            "loyalty_kpi_net_revenue",
            "loyalty_kpi_liability_value",
        }
        assert "loyalty_kpi_active_customers" in names

    def test_publish_keeps_failed_tenants_and_removes_the_ones_no_longer_exported(self) -> None:
        a, b, c = (f"t-{uuid.uuid4().hex[:8]}" for _ in range(3))
        gauges = KpiGauges()
        gauges.publish({a: headline(), b: headline(orders=3)}, kept=[], dropped=0, now=1.0)
        assert value("loyalty_kpi_orders", tenant=b) == 3
        # b fails this time (its values stay), a is no longer exported (its series go), c is new.
        gauges.publish({c: headline(orders=9)}, kept=[b], dropped=1, now=2.0)
        assert value("loyalty_kpi_orders", tenant=a) is None
        assert value("loyalty_kpi_points", tenant=a, movement="issued") is None
        assert value("loyalty_kpi_orders", tenant=b) == 3
        assert value("loyalty_kpi_refresh_timestamp_seconds", tenant=b) == 1.0
        assert value("loyalty_kpi_orders", tenant=c) == 9
        assert value("loyalty_kpi_tenants", state="exported") == 2
        assert value("loyalty_kpi_tenants", state="dropped") == 1
        gauges.publish({}, kept=[], dropped=0, now=3.0)
        assert value("loyalty_kpi_orders", tenant=b) is None


@pytest.fixture
async def sessionmaker() -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(service_settings("metrics").database_url, pool_size=2)
    yield create_sessionmaker(engine)
    await engine.dispose()


class TestRefresh:
    async def test_hand_computed_gauges_and_a_failing_tenant_does_not_stop_the_others(
        self, sessionmaker: async_sessionmaker[AsyncSession], tenant: str
    ) -> None:
        poisoned = f"{tenant}-poisoned"
        await seed(sessionmaker, tenant)
        async with transaction(sessionmaker) as session:
            # Points beyond 64 bits in the month: that tenant's query fails (bigint out of range).
            rows = [daily(poisoned, d, orders=1, points_issued=9 * 10**18) for d in ("2025-03-01", "2025-03-02")]
            await session.execute(insert(Daily), rows)
        failures = value("loyalty_kpi_refresh_failures_total") or 0.0
        settings = service_settings("metrics", kpi_gauges_tenants=[poisoned, tenant], kpi_gauges_max_tenants=2)

        result = await refresh_kpi_gauges(settings, sessionmaker, KpiGauges(), today=TODAY)

        assert sorted(result.exported) == sorted([tenant, poisoned])
        assert result.failed == [poisoned]
        assert value("loyalty_kpi_refresh_failures_total") == failures + 1
        assert value("loyalty_kpi_orders", tenant=poisoned) is None
        assert value("loyalty_kpi_retention_ratio", tenant=tenant) == pytest.approx(2 / 3)
        assert value("loyalty_kpi_churn_ratio", tenant=tenant) == pytest.approx(1 / 3)
        assert value("loyalty_kpi_active_customers", tenant=tenant) == 3
        assert value("loyalty_kpi_new_customers", tenant=tenant) == 1
        assert value("loyalty_kpi_orders", tenant=tenant) == 3
        assert value("loyalty_kpi_net_revenue", tenant=tenant, currency="EUR") == 280
        assert value("loyalty_kpi_repeat_purchase_ratio", tenant=tenant) == pytest.approx(2 / 5)
        assert value("loyalty_kpi_nps", tenant=tenant) == pytest.approx(100 / 3)  # 2 promoters, 1 detractor
        assert value("loyalty_kpi_nps_responses", tenant=tenant) == 3
        expected_points = {"issued": 300, "redeemed": 10, "expired": 5, "clawed_back": 7}
        for movement, points in expected_points.items():
            assert value("loyalty_kpi_points", tenant=tenant, movement=movement) == points
        assert value("loyalty_kpi_liability_points", tenant=tenant, state="available") == 270
        assert value("loyalty_kpi_liability_points", tenant=tenant, state="pending") == 50
        assert value("loyalty_kpi_liability_value", tenant=tenant, currency="EUR") == 160  # 320 x 0.5
        segments = {"ambassador": 2, "at_risk": 1, "loyal_passive": 0, "price_shopper": 0, "leaver": 0, "new": 0}
        for segment, customers in segments.items():
            assert value("loyalty_kpi_customers", tenant=tenant, segment=segment) == customers

    async def test_the_cap_exports_the_pinned_tenant_and_counts_the_rest_as_dropped(
        self, sessionmaker: async_sessionmaker[AsyncSession], tenant: str
    ) -> None:
        others = [f"{tenant}-{i}" for i in range(2)]
        await seed(sessionmaker, tenant)
        async with transaction(sessionmaker) as session:
            # More recently active than the pinned tenant: only the pin keeps it in.
            await session.execute(insert(Daily), [daily(t, "2025-03-14", orders=1) for t in others])
        settings = service_settings("metrics", kpi_gauges_tenants=[tenant], kpi_gauges_max_tenants=1)

        result = await refresh_kpi_gauges(settings, sessionmaker, KpiGauges(), today=TODAY)

        assert result.exported == [tenant]
        assert result.dropped >= len(others)
        assert value("loyalty_kpi_tenants", state="dropped") == result.dropped
        assert value("loyalty_kpi_tenants", state="exported") == 1
        assert all(value("loyalty_kpi_orders", tenant=t) is None for t in others)
