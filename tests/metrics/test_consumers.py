"""The four inputs through Kafka into the aggregates, and the KPI endpoints over them, against numbers
computed by hand (the comments show the arithmetic)."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from sqlalchemy import text

from metrics.app import create_app
from shared.db import create_engine
from shared.events import (
    CloudEvent,
    LedgerEntryPosted,
    PurchaseRefunded,
    SurveyAnswered,
    TierChanged,
    WalletEstimated,
    make_event,
)
from shared.topics import CUSTOMERS, ENGAGEMENT, LEDGER_ENTRIES, PURCHASES
from tests.conftest import (
    create_api_key,
    database_url,
    dead_letters_for,
    eventually,
    running_app,
    service_settings,
    topic,
)
from tests.factories import purchase

pytestmark = [pytest.mark.kafka, pytest.mark.db]


def at(day: str, hour: int = 12) -> datetime:
    return datetime.fromisoformat(day).replace(hour=hour, tzinfo=UTC)


def with_id(event: CloudEvent[Any], event_id: str) -> CloudEvent[Any]:
    return make_event(
        event.type, event.data, tenant_id=event.tenantid, source=event.source, event_id=event_id, time=event.time
    )


def refund(tenant: str, customer: str, order_id: str, amount: str, when: datetime) -> CloudEvent[Any]:
    data = PurchaseRefunded(
        refund_id=f"R-{uuid.uuid4().hex[:8]}",
        original_order_id=order_id,
        customer_id=customer,
        currency="EUR",
        amount=Decimal(amount),
    )
    return make_event("purchase.refunded", data, tenant_id=tenant, source="tests", time=when)


def survey(tenant: str, customer: str, nps: int | None, effort: int | None, when: datetime) -> CloudEvent[Any]:
    data = SurveyAnswered(survey_id=f"S-{uuid.uuid4().hex[:6]}", customer_id=customer, nps=nps, effort_score=effort)
    return make_event("survey.answered", data, tenant_id=tenant, source="tests", time=when)


def entry(
    tenant: str, account: str, kind: str, points: int, when: datetime, bucket: Any = "available"
) -> CloudEvent[Any]:
    customer = None if account.startswith("system:") else account
    data = LedgerEntryPosted(
        entry_id=str(uuid.uuid4()),
        transaction_id=str(uuid.uuid4()),
        account_id=account,
        customer_id=customer,
        kind=kind,
        points=points,
        balance_after=0,
        created_at=when,
        bucket=bucket,
    )
    return make_event(
        "ledger.entry.posted", data, tenant_id=tenant, source="loyalty/ledger", subject=account, time=when
    )


def wallet(tenant: str, customer: str, spend: str, when: datetime) -> CloudEvent[Any]:
    data = WalletEstimated(
        customer_id=customer,
        period_start=date(2025, 1, 1),
        period_end=date(2025, 3, 1),
        estimated_spend=Decimal(spend),
        currency="EUR",
    )
    return make_event("wallet.estimated", data, tenant_id=tenant, source="tests", time=when)


async def send(producer: AIOKafkaProducer, name: str, events: list[CloudEvent[Any]]) -> None:
    for event in events:
        await producer.send_and_wait(topic(name), event.to_bytes(), key=event.key)


class TestKpisThroughKafka:
    async def test_a_small_programme_by_hand(self, raw_producer: AIOKafkaProducer, tenant: str) -> None:
        admin = await create_api_key("metrics", tenant, ["admin"])
        headers = {"X-API-Key": admin}
        # c-3 bought in February 2024 (sent last: history arrives late): active up to 2025-02-08.
        c3 = purchase(tenant, "c-3", net="200.00", ordered_at=at("2024-02-10"))
        c1_jan = purchase(tenant, "c-1", net="100.00", ordered_at=at("2025-01-10"))
        c1_feb = purchase(tenant, "c-1", net="50.00", ordered_at=at("2025-02-05"))
        # The refund comes before its order: kept, and applied when the order arrives.
        c1_refund = refund(tenant, "c-1", c1_feb.data.order_id, "20.00", at("2025-02-06"))
        # 30 USD at 0.5 = 15 EUR.
        c2 = purchase(tenant, "c-2", net="30.00", currency="USD", ordered_at=at("2025-02-20"))
        unknown = purchase(tenant, "c-4", net="10.00", currency="GBP", ordered_at=at("2025-02-21"))
        resent = with_id(c1_jan, f"resent-{uuid.uuid4().hex[:8]}")
        purchases = [c1_refund, c1_jan, c1_jan, c1_feb, c2, unknown, resent, c3]
        engagement = [
            survey(tenant, "c-1", 10, 2, at("2025-02-01")),
            survey(tenant, "c-1", 3, 4, at("2025-02-15")),  # c-1's latest answer in February: a detractor
            survey(tenant, "c-2", 9, None, at("2025-02-16")),
            wallet(tenant, "c-1", "1000", at("2025-02-27", 8)),
            wallet(tenant, "c-1", "650", at("2025-02-27", 9)),  # replaces the estimate of 1000
        ]
        ledger = [
            entry(tenant, "c-1", "earn", 100, at("2025-01-10")),
            entry(tenant, "c-1", "earn", 50, at("2025-02-05"), "pending"),
            entry(tenant, "c-1", "redeem", -30, at("2025-02-10")),
            entry(tenant, "c-1", "expire", -10, at("2025-02-11")),
            entry(tenant, "c-1", "clawback", -20, at("2025-02-12")),
            entry(tenant, "system:issuance/03", "clawback", 20, at("2025-02-12")),
            entry(tenant, "system:redemption/03", "redeem", 30, at("2025-02-10")),
        ]
        tier = make_event(
            "tier.changed",
            TierChanged(customer_id="c-1", tier="gold", reason="spend"),
            tenant_id=tenant,
            source="tests",
            time=at("2025-02-01"),
        )
        settings = service_settings("metrics", consumer_group_suffix=f"-{tenant}")
        async with running_app(create_app(settings)) as client:
            config = {"reporting_currency": "EUR", "conversion_factors": {"USD": "0.5"}}
            assert (await client.put("/v1/config", json=config, headers=headers)).status_code == 200
            await send(raw_producer, PURCHASES, purchases)
            await send(raw_producer, ENGAGEMENT, engagement)
            await send(raw_producer, LEDGER_ENTRIES, ledger)
            await send(raw_producer, CUSTOMERS, [tier])

            async def settled() -> dict[str, Any] | None:
                response = await client.get(
                    "/v1/kpis", params={"from": "2025-01-01", "to": "2025-03-01", "period": "month"}, headers=headers
                )
                body: dict[str, Any] = response.json()
                feb = body["items"][1]
                # Every input has arrived (the topics' partitions are consumed in no set order).
                done = (
                    feb["orders"],
                    feb["refunds"],
                    feb["share_of_wallet"],
                    feb["nps_responses"],
                    feb["ces_responses"],
                )
                points = (feb["points_redeemed"], feb["points_expired"], feb["points_clawed_back"])
                jan = body["items"][0]
                complete = done == (2, "20.00", "20.00", 2, 2) and points == (30, 10, 20)
                liability = (await client.get("/v1/kpis/lifetime", headers=headers)).json()["liability"]
                complete = complete and (liability["available_points"], liability["pending_points"]) == (40, 50)
                return body if complete and (jan["customers_start"], jan["points_issued"]) == (1, 100) else None

            body = await eventually(settled)
            lifetime = (await client.get("/v1/kpis/lifetime", params={"as_of": "2025-03-01"}, headers=headers)).json()
            now = (await client.get("/v1/kpis/lifetime", headers=headers)).json()
            cohorts = (
                await client.get(
                    "/v1/kpis/cohorts",
                    params={"period": "month", "from": "2024-01-01", "to": "2025-03-01"},
                    headers=headers,
                )
            ).json()
            [gbp] = await dead_letters_for(unknown.id.encode())
            [again] = await dead_letters_for(resent.id.encode())
        jan, feb = body["items"]
        assert body["currency"] == "EUR"
        assert (jan["start"], jan["end"]) == ("2025-01-01", "2025-02-01")
        # January: S = {c-3}, E = {c-3, c-1}, N = {c-1}: CRR = (2 - 1) / 1 = 100 %.
        assert (jan["customers_start"], jan["customers_end"], jan["new_customers"]) == (1, 2, 1)
        assert (jan["crr"], jan["churn_rate"]) == ("100.00", "0.00")
        assert (jan["orders"], Decimal(jan["net_revenue"]), jan["buyers"], jan["active_customers"]) == (
            1,
            Decimal(100),
            1,
            2,
        )
        # February: S = {c-3, c-1}, E = {c-1, c-2} (c-3 inactive after 2025-02-08), N = {c-2}: (2 - 1) / 2.
        assert (feb["customers_start"], feb["customers_end"], feb["new_customers"]) == (2, 2, 1)
        assert (feb["crr"], feb["churn_rate"]) == ("50.00", "50.00")
        assert feb["active_customers"] == 3
        # Orders 50 (refunded 20) + 15: net 45, two orders, two buyers.
        assert (feb["orders"], Decimal(feb["net_revenue"]), Decimal(feb["refunds"])) == (2, Decimal(45), Decimal(20))
        assert Decimal(feb["average_order_value"]) == Decimal("22.5")
        assert (feb["buyers"], feb["purchase_frequency"]) == (2, "1.00")
        # Latest answers: c-1 3 (detractor), c-2 9 (promoter): NPS 0; efforts 2 and 4: CES 3.
        assert (feb["nps"], feb["nps_responses"], feb["promoters"], feb["detractors"]) == ("0.00", 2, 1, 1)
        assert (feb["ces"], feb["ces_responses"]) == ("3.00", 2)
        # c-1's net revenue over January and February, 100 + 50 - 20 = 130, of the latest estimate, 650.
        assert (feb["share_of_wallet"], feb["wallet_estimates"]) == ("20.00", 1)
        assert (jan["points_issued"], jan["active_members"]) == (100, 1)
        assert (feb["points_issued"], feb["points_redeemed"], feb["points_expired"], feb["points_clawed_back"]) == (
            50,
            30,
            10,
            20,
        )
        assert feb["active_members"] == 1
        # Lifetime: c-1 2 orders 130, c-2 1 order 15, c-3 1 order 200.
        for view in (lifetime, now):
            assert (view["customers"], view["orders"], Decimal(view["net_revenue"])) == (3, 4, Decimal(345))
            assert view["repeat_purchase_rate"] == "33.33"
            assert view["p_nth_purchase"] == {"2": "33.33", "3": "0.00", "4": None, "5": None}
            assert view["pareto_top20_share"] == "0.00"  # floor(0.2 x 3) = 0 customers
            shares = [p["revenue_share"] for p in view["pareto_curve"]]
            assert shares == ["0.00"] * 3 + ["57.97"] * 3 + ["95.65"] * 3 + ["100.00"]
            clv = view["clv"]
            assert (Decimal(clv["mean"]), Decimal(clv["median"]), Decimal(clv["p90"])) == (
                Decimal(115),
                Decimal(130),
                Decimal(186),  # rank 1.8 of [15, 130, 200]: 130 + 0.8 x 70
            )
            assert [c["customer_id"] for c in clv["top"]] == ["c-3", "c-1", "c-2"]
            # Available 100 - 30 - 10 - 20 = 40, pending 50; a point is worth 0.01.
            assert (view["liability"]["available_points"], view["liability"]["pending_points"]) == (40, 50)
            assert Decimal(view["liability"]["available_value"]) == Decimal("0.40")
        # Trailing 12 months up to 2025-03-01: issued 150, redeemed 30, expired 10.
        assert (lifetime["redemption_rate"], lifetime["breakage_rate"]) == ("20.00", "6.67")
        assert (now["points_issued_12m"], now["redemption_rate"]) == (0, None)
        matrix = {c["cohort"]: c for c in cohorts["items"]}
        assert sorted(matrix) == ["2024-02-01", "2025-01-01", "2025-02-01"]
        assert matrix["2024-02-01"]["active"][:13] == [1] + [0] * 12
        assert matrix["2025-01-01"]["active"][:3] == [1, 1, 0]
        assert matrix["2025-01-01"]["retention"][:3] == ["100.00", "100.00", "0.00"]
        assert matrix["2025-02-01"]["active"][:2] == [1, 0]
        assert "currency GBP has no conversion factor to the reporting currency EUR" in gbp.reason
        assert again.reason == f"order_id {c1_jan.data.order_id!r} was already processed under another event id"

    async def test_a_tenant_without_configuration_reports_in_its_first_currency(
        self, raw_producer: AIOKafkaProducer, tenant: str
    ) -> None:
        key = await create_api_key("metrics", tenant, ["metrics:read"])
        settings = service_settings("metrics", consumer_group_suffix=f"-{tenant}")
        async with running_app(create_app(settings)) as client:
            await send(raw_producer, PURCHASES, [purchase(tenant, "c-1", net="12.34", currency="CHF")])

            async def config() -> dict[str, Any] | None:
                body: dict[str, Any] = (await client.get("/v1/config", headers={"X-API-Key": key})).json()
                return body if body["reporting_currency"] else None

            body = await eventually(config)
        assert body["reporting_currency"] == "CHF"

    async def test_a_first_purchase_that_arrives_late_leaves_no_empty_cohort(
        self, raw_producer: AIOKafkaProducer, tenant: str
    ) -> None:
        key = await create_api_key("metrics", tenant, ["metrics:read"])
        settings = service_settings("metrics", consumer_group_suffix=f"-{tenant}")
        params = {"period": "month", "from": "2025-01-01", "to": "2025-06-01"}
        async with running_app(create_app(settings)) as client:
            # The March order first: the customer is in March's cohort until January's order arrives.
            await send(raw_producer, PURCHASES, [purchase(tenant, "c-1", net="10.00", ordered_at=at("2025-03-05"))])

            async def cohorts(count: int) -> list[Any] | None:
                r = await client.get("/v1/kpis/cohorts", params=params, headers={"X-API-Key": key})
                items: list[Any] = r.json()["items"]
                return items if sum(i["customers"] for i in items) == count else None

            assert [i["cohort"] for i in await eventually(lambda: cohorts(1))] == ["2025-03-01"]
            await send(raw_producer, PURCHASES, [purchase(tenant, "c-1", net="10.00", ordered_at=at("2025-01-05"))])

            async def moved() -> list[Any] | None:
                items = await cohorts(1)
                return items if items and items[0]["cohort"] == "2025-01-01" else None

            items = await eventually(moved)
        assert [(i["cohort"], i["customers"]) for i in items] == [("2025-01-01", 1)]
        assert items[0]["active"][:3] == [1, 0, 1]


class TestKpiParameters:
    @pytest.mark.parametrize(
        ("path", "params", "status"),
        [
            ("/v1/kpis", {"from": "2025-03-01", "to": "2025-01-01"}, 422),
            ("/v1/kpis", {"from": "2025-01-01", "to": "2025-01-01"}, 422),
            ("/v1/kpis", {"from": "2020-01-01", "to": "2025-01-01", "period": "day"}, 422),
            ("/v1/kpis", {"from": "2025-01-01", "to": "2025-02-01", "period": "fortnight"}, 422),
            ("/v1/kpis", {"from": "0001-01-01", "to": "2025-02-01"}, 422),
            ("/v1/kpis", {"from": "2025-01-01"}, 422),
            ("/v1/kpis/lifetime", {"as_of": "9999-12-31"}, 422),
            ("/v1/kpis/cohorts", {"period": "day"}, 422),
            ("/v1/kpis/cohorts", {"from": "2025-03-01", "to": "2025-01-01"}, 422),
            ("/v1/kpis/redemptions", {"from": "2025-03-01", "to": "2025-03-01"}, 422),
            ("/v1/kpis/redemptions", {"from": "2022-01-01", "to": "2025-01-06"}, 422),  # 1,101 days
            ("/v1/kpis/redemptions", {"from": "2025-01-01", "to": "9000-01-01"}, 422),
            ("/v1/kpis/redemptions", {"to": "2025-01-01"}, 422),
        ],
    )
    async def test_bad_parameters_are_422_problems(
        self, tenant: str, path: str, params: dict[str, str], status: int
    ) -> None:
        key = await create_api_key("metrics", tenant, ["metrics:read"])
        async with running_app(create_app(service_settings("metrics", consumers_enabled=False))) as client:
            response = await client.get(path, params=params, headers={"X-API-Key": key})
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/problem+json"

    async def test_a_cohort_left_with_zero_customers_is_not_listed(self, tenant: str) -> None:
        # As ingestion leaves the cells when a customer's earlier order arrives after a later one: the later
        # order's cohort drops to zero customers, the earlier one's has the customer.
        cells = [("2025-03-01", "2025-03-01", 0), ("2025-03-01", "2025-04-01", 0), ("2025-01-01", "2025-01-01", 1)]
        engine = create_engine(database_url("metrics"), pool_size=1)
        try:
            async with engine.begin() as conn:
                for cohort, start, customers in cells:
                    await conn.execute(
                        text(
                            "insert into metrics.period_cells (tenant_id, period, cohort, start, customers) "
                            "values (:t, 'month', :c, :s, :n)"
                        ),
                        {"t": tenant, "c": date.fromisoformat(cohort), "s": date.fromisoformat(start), "n": customers},
                    )
        finally:
            await engine.dispose()
        key = await create_api_key("metrics", tenant, ["metrics:read"])
        params = {"period": "month", "from": "2025-01-01", "to": "2025-06-01"}
        async with running_app(create_app(service_settings("metrics", consumers_enabled=False))) as client:
            body = (await client.get("/v1/kpis/cohorts", params=params, headers={"X-API-Key": key})).json()
        assert [(c["cohort"], c["customers"]) for c in body["items"]] == [("2025-01-01", 1)]

    async def test_an_empty_tenant_has_zeros_and_nulls(self, tenant: str) -> None:
        key = await create_api_key("metrics", tenant, ["metrics:read"])
        async with running_app(create_app(service_settings("metrics", consumers_enabled=False))) as client:
            kpis = await client.get(
                "/v1/kpis",
                params={"from": "2025-01-01", "to": "2026-01-01", "period": "quarter"},
                headers={"X-API-Key": key},
            )
            lifetime = await client.get("/v1/kpis/lifetime", headers={"X-API-Key": key})
            # 1,100 days: the longest window.
            redemptions = await client.get(
                "/v1/kpis/redemptions", params={"from": "2022-01-01", "to": "2025-01-05"}, headers={"X-API-Key": key}
            )
        assert_empty(kpis, lifetime)
        assert redemptions.status_code == 200, redemptions.text
        body = redemptions.json()
        assert body["items"] == []
        assert [t["reward_kind"] for t in body["totals"]] == ["gift", "privilege", "discount", "coupon"]
        assert {(t["reserved"], t["points_spent"], tuple(t["values"])) for t in body["totals"]} == {(0, 0, ())}


def assert_empty(kpis: httpx.Response, lifetime: httpx.Response) -> None:
    items = kpis.json()["items"]
    assert [i["start"] for i in items] == ["2025-01-01", "2025-04-01", "2025-07-01", "2025-10-01"]
    for item in items:
        assert (item["customers_start"], item["orders"], item["crr"], item["nps"], item["average_order_value"]) == (
            0,
            0,
            None,
            None,
            None,
        )
    body = lifetime.json()
    assert (body["customers"], body["repeat_purchase_rate"], body["pareto_top20_share"]) == (0, None, None)
    assert body["clv"] == {"mean": None, "median": None, "p90": None, "top": []}
