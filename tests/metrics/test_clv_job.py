"""The CLV fit job end to end against PostgreSQL: `loyalty metrics fit-clv` reads a tenant's orders, stores
every customer's prediction and the fit, `GET /v1/clv` shows it; the schedule's subprocess and due tenants."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import async_sessionmaker

from metrics.app import create_app
from metrics.models import ClvFit, ClvPrediction, Order, TenantConfig
from metrics.service import clv_service
from metrics.tasks import fit_in_subprocess
from shared.db import AsyncSession, create_engine, create_sessionmaker, transaction
from shared.events import utcnow
from tests.conftest import create_api_key, database_url, running_app, service_settings
from tests.metrics.clv_synthetic import AS_OF, synthetic_orders

pytestmark = [pytest.mark.db, pytest.mark.slow]


def loyalty(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "METRICS_DATABASE_URL": database_url("metrics"), "COLUMNS": "250"}
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args], env=env, capture_output=True, text=True, timeout=240, check=False
    )


Sessions = async_sessionmaker[AsyncSession]


@pytest.fixture
async def sessions() -> AsyncIterator[Sessions]:
    engine = create_engine(database_url("metrics"), pool_size=2)
    yield create_sessionmaker(engine)
    await engine.dispose()


async def add_orders(session: AsyncSession, tenant: str, rows: list[tuple[str, datetime, str, str]]) -> None:
    """(customer, ordered_at, amount, refunded) orders in EUR, the tenant's reporting currency."""
    session.add(TenantConfig(tenant_id=tenant, reporting_currency="EUR"))
    for i, (customer, at, amount, refunded) in enumerate(rows):
        session.add(
            Order(
                tenant_id=tenant,
                order_id=f"o-{i}",
                customer_id=customer,
                ordered_at=at,
                day=at.date(),
                currency="EUR",
                original_amount=Decimal(amount),
                amount=Decimal(amount),
                refunded=Decimal(refunded),
                channel="webshop",
            )
        )


def at(days_before_as_of: int, hour: int = 10) -> datetime:
    return datetime.combine(AS_OF - timedelta(days=days_before_as_of), time(hour), tzinfo=UTC)


def hand_made_orders() -> list[tuple[str, datetime, str, str]]:
    return [
        # "loyal": purchase days 300, 200 (two orders, one half refunded), 100 and 5 days before as_of.
        ("loyal", at(300), "100.00", "0"),
        ("loyal", at(200, 9), "60.00", "0"),
        ("loyal", at(200, 15), "40.00", "20.00"),
        ("loyal", at(100), "90.00", "0"),
        ("loyal", at(5), "70.00", "0"),
        # "gone": three purchases long ago, then nothing.
        ("gone", at(700), "80.00", "0"),
        ("gone", at(690), "80.00", "0"),
        ("gone", at(680), "80.00", "0"),
        # "once": a single purchase; its second order was refunded in full and counts as none.
        ("once", at(50), "25.00", "0"),
        ("once", at(20), "30.00", "30.00"),
        # After as_of: left out.
        ("loyal", at(-3), "500.00", "0"),
    ]


class TestFitClvCommand:
    async def test_fits_stores_every_customer_and_the_endpoint_shows_it(self, tenant: str, sessions: Sessions) -> None:
        synthetic = [
            (c, datetime.combine(day, time(12), tzinfo=UTC), str(net), "0") for c, day, net in synthetic_orders(400, 3)
        ]
        async with transaction(sessions) as session:
            await add_orders(session, tenant, [*hand_made_orders(), *synthetic])
        customers = len({c for c, *_ in synthetic}) + 3

        result = loyalty("metrics", "fit-clv", "--tenant", tenant, "--as-of", AS_OF.isoformat())
        assert result.returncode == 0, result.stderr

        async with sessions() as session:
            rows = {
                p.customer_id: p
                for p in (await session.execute(select(ClvPrediction).where(ClvPrediction.tenant_id == tenant)))
                .scalars()
                .all()
            }
            fit = (await session.execute(select(ClvFit).where(ClvFit.tenant_id == tenant))).scalar_one()
        assert len(rows) == customers == fit.customers
        loyal, gone, once = rows["loyal"], rows["gone"], rows["once"]
        # Hand-computed: repeat days 200 (60 + 40 - 20), 100 and 5 before as_of; first 300 days before it.
        assert (loyal.frequency, loyal.recency, loyal.t) == (3, 295, 300)
        assert loyal.monetary_value == Decimal("80.00")  # (80 + 90 + 70) / 3
        assert (gone.frequency, gone.recency, gone.t) == (2, 20, 700)
        assert (once.frequency, once.recency, once.t, once.monetary_value) == (0, 0, 50, Decimal("0.00"))
        assert loyal.p_alive > Decimal("0.5") > gone.p_alive
        assert once.p_alive == Decimal("1.000000")  # BG/NBD: no dropout before a repeat purchase
        assert loyal.clv > gone.clv
        assert loyal.purchases_365d > loyal.purchases_90d > 0
        assert {p.currency for p in rows.values()} == {"EUR"}
        assert all(p.clv == p.clv.quantize(Decimal("0.01")) for p in rows.values())
        gg = fit.parameters["gamma_gamma"]
        assert once.expected_spend == Decimal(str(gg["v"] * gg["p"] / (gg["q"] - 1))).quantize(Decimal("0.01"))
        assert fit.as_of == AS_OF
        assert fit.method == "map"
        assert fit.discount_rate == Decimal("0.10")  # the tenant configuration's default
        assert fit.horizon_months == 12
        assert fit.repeat_customers == sum(1 for p in rows.values() if p.frequency > 0)
        assert set(fit.parameters["bg_nbd"]) == {"r", "alpha", "a", "b"}

        key = await create_api_key("metrics", tenant, ["metrics:read"])
        other = await create_api_key("metrics", f"{tenant}-x", ["metrics:read"])
        async with running_app(create_app(service_settings("metrics", consumers_enabled=False))) as client:
            shown = await client.get("/v1/clv", headers={"X-API-Key": key})
            missing = await client.get("/v1/clv", headers={"X-API-Key": other})
        assert shown.status_code == 200, shown.text
        body = shown.json()
        assert body["customers"] == customers
        assert body["parameters"] == fit.parameters
        assert datetime.fromisoformat(body["fitted_at"]) == fit.fitted_at
        assert body["duration_seconds"] > 0
        assert missing.status_code == 404
        assert missing.headers["content-type"].startswith("application/problem+json")
        assert "no CLV fit" in missing.json()["detail"]

        # A second fit replaces the predictions (no customer twice) and becomes the latest.
        again = loyalty("metrics", "fit-clv", "--tenant", tenant, "--as-of", (AS_OF + timedelta(days=30)).isoformat())
        assert again.returncode == 0, again.stderr
        async with sessions() as session:
            count = await session.scalar(select(func.count()).where(ClvPrediction.tenant_id == tenant))
            latest = await clv_service.latest(session, tenant)
            t_loyal = await session.scalar(
                select(ClvPrediction.t).where(ClvPrediction.tenant_id == tenant, ClvPrediction.customer_id == "loyal")
            )
        assert count == customers
        assert latest.as_of == AS_OF + timedelta(days=30)
        assert t_loyal == 330

    async def test_too_few_repeat_customers_is_refused_clearly(self, tenant: str, sessions: Sessions) -> None:
        async with transaction(sessions) as session:
            await add_orders(session, tenant, hand_made_orders())
        result = loyalty("metrics", "fit-clv", "--tenant", tenant, "--as-of", AS_OF.isoformat())
        assert result.returncode == 1
        assert "2 customers with a repeat purchase; at least 10" in result.stderr
        async with sessions() as session:
            assert await session.scalar(select(func.count()).where(ClvFit.tenant_id == tenant)) == 0

    def test_bad_as_of_is_refused(self, tenant: str) -> None:
        result = loyalty("metrics", "fit-clv", "--tenant", tenant, "--as-of", "yesterday")
        assert result.returncode == 2
        assert "--as-of" in result.stderr


class TestSchedule:
    async def test_a_due_tenant_is_fitted_by_a_subprocess_and_then_no_longer_due(
        self, tenant: str, sessions: Sessions
    ) -> None:
        now = utcnow()
        rows = [
            (c, datetime.combine(day, time(12), tzinfo=UTC), str(net), "0") for c, day, net in synthetic_orders(150, 5)
        ]
        async with transaction(sessions) as session:
            await add_orders(session, tenant, rows)
        async with sessions() as session:
            assert tenant in await clv_service.tenants_due(session, fitted_before=now)

        assert await fit_in_subprocess(service_settings("metrics"), tenant)

        async with sessions() as session:
            assert tenant not in await clv_service.tenants_due(session, fitted_before=now)
            assert tenant in await clv_service.tenants_due(session, fitted_before=utcnow() + timedelta(seconds=1))
            assert (await clv_service.latest(session, tenant)).customers == 150

    async def test_a_failing_fit_reports_false(self, tenant: str, sessions: Sessions) -> None:
        async with transaction(sessions) as session:
            await add_orders(session, tenant, hand_made_orders()[:2])
        assert not await fit_in_subprocess(service_settings("metrics"), tenant)
