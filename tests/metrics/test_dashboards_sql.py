"""Every SQL query of the Grafana dashboards (panels and template variables) against the metrics database, as
Grafana's PostgreSQL data source runs it: macros and variables substituted, through the read-only role the
data source uses (loyalty_reader), for a tenant with hand-computed data (tests/metrics/kpi_rows.py). Each must
run, return rows with a value, and a time series a `time` column; a few panels' figures are checked by hand.
The structure check (every panel has a query on a known data source) needs no database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import yaml
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from shared.db import AsyncSession, create_engine, create_sessionmaker
from tests.conftest import DB_SUFFIX, PG, service_settings
from tests.dashboards import DATABASE, PROMETHEUS, ROOT, Query, dashboards, problems, queries, sql
from tests.metrics.kpi_rows import seed

READER = "loyalty_reader"  # deploy/postgres/db-up.sh creates it, migration 0006 grants it SELECT
START = datetime(2024, 1, 1, tzinfo=UTC)
END = datetime(2025, 3, 15, 23, 59, 59, tzinfo=UTC)


def reader_url() -> str:
    host = PG.split("@", 1)[1]
    return f"postgresql+asyncpg://{READER}:{READER}@{host}/loyalty_metrics{DB_SUFFIX}"


SQL_QUERIES = [q for q in queries() if q.datasource == DATABASE]


def test_every_panel_has_a_query_on_a_provisioned_data_source() -> None:
    boards = dashboards()
    assert set(boards) == {"programme-overview.json", "customer-value.json", "pipeline-health.json"}
    assert problems() == []
    assert len(SQL_QUERIES) >= 15
    provisioned = {
        source["uid"]
        for path in (ROOT / "deploy/grafana/provisioning/datasources").glob("*.yml")
        for source in yaml.safe_load(path.read_text())["datasources"]
    }
    assert provisioned == {PROMETHEUS, DATABASE}
    # Grafana keys dashboards by uid and panels by id within a dashboard.
    assert len({b["uid"] for b in boards.values()}) == len(boards)
    for name, board in boards.items():
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), name


@pytest.fixture
async def reader() -> AsyncIterator[AsyncEngine]:
    engine = create_engine(reader_url(), pool_size=1)
    yield engine
    await engine.dispose()


@pytest.fixture
async def seeded(tenant: str) -> str:
    engine = create_engine(service_settings("metrics").database_url, pool_size=1)
    try:
        sessionmaker: async_sessionmaker[AsyncSession] = create_sessionmaker(engine)
        await seed(sessionmaker, tenant)
    finally:
        await engine.dispose()
    return tenant


async def run(engine: AsyncEngine, query: Query, tenant: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    values = {"tenant": tenant, "period": "month"}
    async with engine.connect() as conn:
        await conn.execute(text("set transaction read only"))
        result = await conn.execute(text(sql(query, values, START, END)))
        return list(result.keys()), [tuple(row) for row in result]


@pytest.mark.db
@pytest.mark.parametrize("query", SQL_QUERIES, ids=lambda q: q.name)
async def test_sql_query_returns_rows_for_a_tenant_with_data(reader: AsyncEngine, seeded: str, query: Query) -> None:
    columns, rows = await run(reader, query, seeded)
    assert rows, f"{query.name}: no rows"
    if query.format == "time_series":
        assert "time" in columns, f"{query.name}: a time series needs a `time` column, got {columns}"
    numbers = [v for row in rows for v in row if isinstance(v, int | float | Decimal)]
    assert numbers or query.panel.startswith("variable"), f"{query.name}: no value in {rows}"


def panel(title: str) -> Query:
    (found,) = [q for q in SQL_QUERIES if q.panel == title]
    return found


@pytest.mark.db
class TestFiguresByHand:
    async def test_retention_of_march_2025(self, reader: AsyncEngine, seeded: str) -> None:
        _, rows = await run(reader, panel("Retention (CRR) and churn per $period"), seeded)
        march = {row[0]: row[1:] for row in rows}[datetime(2025, 3, 1, tzinfo=UTC)]
        # S = 3, E = 3 on the period's last day so far (today is after it: the 31st counts), N = 1.
        assert [float(v) for v in march] == [pytest.approx(200 / 3), pytest.approx(100 / 3)]

    async def test_nps_of_march_2025(self, reader: AsyncEngine, seeded: str) -> None:
        _, rows = await run(reader, panel("NPS and customer effort per $period"), seeded)
        # 2 promoters, 1 detractor of 3; efforts 2 and 6.
        [(time, nps, responses, ces)] = rows
        assert (time, responses, float(ces)) == (datetime(2025, 3, 1, tzinfo=UTC), 3, 4.0)
        assert float(nps) == pytest.approx(100 / 3)

    async def test_pareto_and_repeat_odds(self, reader: AsyncEngine, seeded: str) -> None:
        _, top20 = await run(reader, panel("Top 20 % share of net revenue"), seeded)
        _, curve = await run(reader, panel("Pareto curve"), seeded)
        _, odds = await run(reader, panel("Repeat odds: the chance of an n-th purchase"), seeded)
        # Buyers' net revenue 300, 150, 100, 50, 0 (600): the top floor(0.2 x 5) = 1 customer has 50 %.
        assert top20 == [(Decimal(50),)]
        shares = {label: float(share) for label, share in curve}
        assert (shares["top 10 %"], shares["top 20 %"], shares["top 40 %"], shares["top 100 %"]) == (0, 50, 75, 100)
        # P(2) = 2 / 5, P(3) = 1 / 2, P(4) = 0 / 1, P(5) undefined.
        assert [(n, None if p is None else float(p), b) for n, p, b in odds] == [
            ("n = 2", 40.0, 27),
            ("n = 3", 50.0, 45),
            ("n = 4", 0.0, 54),
            ("n = 5", None, None),
        ]

    async def test_redemptions_per_reward_and_kind(self, reader: AsyncEngine, seeded: str) -> None:
        columns, rows = await run(reader, panel("Redemptions per reward and kind"), seeded)
        assert columns[:2] == ["reward", "kind"]
        assert columns[-1] == "value confirmed"
        # Up to the 15th of March: the mugs of the 20th are after the range, the privilege's rows are zeros.
        assert [tuple(int(v) if isinstance(v, Decimal) else v for v in row) for row in rows] == [
            # reserved, confirmed, cancelled, expired, refunded in full, coupons consumed, points reserved,
            # spent, returned, value: mug 2 x 12.50.
            ("mug", "gift", 2, 2, 1, 0, 0, 0, 200, 200, 0, "25.00 EUR"),
            ("cpn", "coupon", 1, 1, 0, 0, 0, 1, 300, 300, 0, "10.00 EUR"),
            ("disc", "discount", 1, 1, 0, 0, 1, 0, 200, 200, 200, "2.00 EUR"),
        ]

    async def test_the_reader_cannot_read_api_keys(self, reader: AsyncEngine) -> None:
        async with reader.connect() as conn:
            with pytest.raises(DBAPIError, match="permission denied"):
                await conn.execute(text("select count(*) from metrics.api_keys"))
