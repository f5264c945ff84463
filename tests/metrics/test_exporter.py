"""The headline KPI gauges: hand-computed figures from rows in the metrics tables, the cap on tenants, a tenant
whose refresh fails while the others go on, and the series of tenants no longer exported removed."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import async_sessionmaker

from metrics import schemas
from metrics.config import MAX_GAUGE_TENANTS
from metrics.exporter import Headline, KpiGauges, samples
from metrics.models import Daily, TenantConfig
from metrics.tasks import refresh_kpi_gauges
from shared.db import AsyncSession, create_engine, create_sessionmaker, transaction
from tests.conftest import service_settings
from tests.metrics.kpi_rows import TODAY, daily, seed


def value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


PERIOD: dict[str, Any] = {
    "start": "2025-03-01",
    "end": "2025-04-01",
    "customers_start": 4,
    "customers_end": 5,
    "new_customers": 2,
    "crr": "75.00",
    "churn_rate": "25.00",
    "active_customers": 6,
    "buyers": 3,
    "orders": 7,
    "net_revenue": "120.50",
    "refunds": "0",
    "average_order_value": None,
    "purchase_frequency": None,
    "nps": "50.00",
    "nps_responses": 4,
    "promoters": 3,
    "detractors": 1,
    "ces": None,
    "ces_responses": 0,
    "share_of_wallet": None,
    "wallet_estimates": 0,
    "points_issued": 10,
    "points_redeemed": 4,
    "points_expired": 1,
    "points_clawed_back": 0,
    "active_members": 2,
}
LIFETIME: dict[str, Any] = {
    "as_of": "2025-03-15",
    "currency": "EUR",
    "customers": 8,
    "orders": 10,
    "net_revenue": "900",
    "repeat_purchase_rate": "25.00",
    "p_nth_purchase": {},
    "p_nth_purchase_benchmark": {},
    "pareto_top20_share": None,
    "pareto_curve": [],
    "clv": {"mean": None, "median": None, "p90": None, "top": []},
    "liability": {
        "available_points": 300,
        "pending_points": 100,
        "held_points": 0,
        "point_value": "0.01",
        "available_value": "3.00",
        "pending_value": "1.00",
    },
    "points_issued_12m": 0,
    "points_redeemed_12m": 0,
    "points_expired_12m": 0,
    "redemption_rate": None,
    "breakage_rate": None,
}


def headline(period: dict[str, Any] | None = None, lifetime: dict[str, Any] | None = None) -> Headline:
    return Headline(
        period=schemas.PeriodKpis.model_validate(PERIOD | (period or {})),
        lifetime=schemas.Lifetime.model_validate(LIFETIME | (lifetime or {})),
        segments={"ambassador": 2, "new": 1},
    )


class TestPure:
    def test_the_gauge_settings_are_bounded(self) -> None:
        with pytest.raises(ValidationError):
            service_settings("metrics", kpi_gauges_max_tenants=MAX_GAUGE_TENANTS + 1)
        with pytest.raises(ValidationError):
            service_settings("metrics", kpi_gauges_tenants=["x" * 64])

    def test_samples_are_the_apis_figures_with_rates_as_ratios(self) -> None:
        out = {(gauge._name, labels): v for (gauge, labels), v in samples("a", headline(), now=1.0).items()}
        assert out[("loyalty_kpi_retention_ratio", ("a",))] == 0.75
        assert out[("loyalty_kpi_churn_ratio", ("a",))] == 0.25
        assert out[("loyalty_kpi_repeat_purchase_ratio", ("a",))] == 0.25
        assert out[("loyalty_kpi_nps", ("a",))] == 50.0
        assert out[("loyalty_kpi_active_customers", ("a",))] == 6
        assert out[("loyalty_kpi_net_revenue", ("a", "EUR"))] == 120.5
        assert out[("loyalty_kpi_liability_value", ("a", "EUR"))] == 4.0
        assert out[("loyalty_kpi_points", ("a", "redeemed"))] == 4
        assert out[("loyalty_kpi_liability_points", ("a", "pending"))] == 100
        assert out[("loyalty_kpi_customers", ("a", "ambassador"))] == 2
        assert out[("loyalty_kpi_customers", ("a", "leaver"))] == 0
        assert len([k for k in out if k[0] == "loyalty_kpi_customers"]) == 6

    def test_undefined_figures_have_no_series(self) -> None:
        h = headline({"crr": None, "churn_rate": None, "nps": None}, {"repeat_purchase_rate": None, "currency": None})
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
        gauges.publish({a: headline(), b: headline({"orders": 3})}, kept=[], dropped=0, now=1.0)
        assert value("loyalty_kpi_orders", tenant=b) == 3
        # b fails this time (its values stay), a is no longer exported (its series go), c is new.
        gauges.publish({c: headline({"orders": 9})}, kept=[b], dropped=1, now=2.0)
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
            # A configuration row no API would write (an activity window of 0 days): its tenant's refresh fails.
            await session.execute(insert(Daily), [daily(poisoned, "2025-03-02", orders=1)])
            await session.execute(insert(TenantConfig).values(tenant_id=poisoned, activity_window_days=0))
        failures = value("loyalty_kpi_refresh_failures_total") or 0.0
        settings = service_settings("metrics", kpi_gauges_tenants=[poisoned, tenant], kpi_gauges_max_tenants=2)

        result = await refresh_kpi_gauges(settings, sessionmaker, KpiGauges(), today=TODAY)

        assert sorted(result.exported) == sorted([tenant, poisoned])
        assert result.failed == [poisoned]
        assert value("loyalty_kpi_refresh_failures_total") == failures + 1
        assert value("loyalty_kpi_orders", tenant=poisoned) is None
        # The API's percentages have two decimals: 66.67 % and 33.33 %.
        assert value("loyalty_kpi_retention_ratio", tenant=tenant) == pytest.approx(2 / 3, abs=1e-4)
        assert value("loyalty_kpi_churn_ratio", tenant=tenant) == pytest.approx(1 / 3, abs=1e-4)
        assert value("loyalty_kpi_active_customers", tenant=tenant) == 4
        assert value("loyalty_kpi_new_customers", tenant=tenant) == 1
        assert value("loyalty_kpi_orders", tenant=tenant) == 3
        assert value("loyalty_kpi_net_revenue", tenant=tenant, currency="EUR") == 280
        assert value("loyalty_kpi_repeat_purchase_ratio", tenant=tenant) == pytest.approx(2 / 5)
        assert value("loyalty_kpi_nps", tenant=tenant) == pytest.approx(100 / 3, abs=0.01)  # 2 promoters, 1 detractor
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
