"""GET/PUT /v1/config: defaults, bounds, the admin scope, the caller's own tenant."""

from __future__ import annotations

import pytest

from metrics.app import create_app
from tests.conftest import create_api_key, running_app, service_settings

pytestmark = [pytest.mark.db]

DEFAULTS: dict[str, object] = {
    "activity_window_days": 365,
    "reporting_currency": None,
    "conversion_factors": {},
    "point_value": "0.01",
    "clv_discount_rate": "0.10",
    "clv_horizon_months": 12,
    "segment_thresholds": {},
    "updated_at": None,
}


def app() -> object:
    return create_app(service_settings("metrics", consumers_enabled=False))


class TestConfig:
    async def test_defaults_then_a_put_replaces_the_whole_configuration(self, tenant: str) -> None:
        admin = await create_api_key("metrics", tenant, ["admin"])
        reader = await create_api_key("metrics", tenant, ["metrics:read"])
        body = {
            "activity_window_days": 90,
            "reporting_currency": "EUR",
            "conversion_factors": {"USD": "0.92", "GBP": "1.17"},
            "point_value": "0.005",
            "segment_thresholds": {"new_days": 30},
        }
        async with running_app(app()) as client:  # type: ignore[arg-type]
            before = (await client.get("/v1/config", headers={"X-API-Key": reader})).json()
            put = await client.put("/v1/config", json=body, headers={"X-API-Key": admin})
            after = (await client.get("/v1/config", headers={"X-API-Key": reader})).json()
            # PUT replaces: fields left out return to their defaults.
            again = await client.put("/v1/config", json={"point_value": "1"}, headers={"X-API-Key": admin})
        assert before == DEFAULTS
        assert put.status_code == 200, put.text
        assert after["activity_window_days"] == 90
        assert after["conversion_factors"] == {"USD": "0.92", "GBP": "1.17"}
        assert after["point_value"] == "0.005"
        assert after["segment_thresholds"] == {"new_days": 30}
        assert after["clv_horizon_months"] == 12
        assert after["updated_at"] is not None
        assert again.json()["activity_window_days"] == 365
        assert again.json()["conversion_factors"] == {}
        assert again.json()["point_value"] == "1"

    async def test_put_needs_admin_and_touches_only_the_callers_tenant(self, tenant: str) -> None:
        reader = await create_api_key("metrics", tenant, ["metrics:read"])
        admin = await create_api_key("metrics", tenant, ["admin"])
        other = await create_api_key("metrics", f"{tenant}-b", ["metrics:read"])
        async with running_app(app()) as client:  # type: ignore[arg-type]
            refused = await client.put("/v1/config", json={}, headers={"X-API-Key": reader})
            await client.put("/v1/config", json={"activity_window_days": 30}, headers={"X-API-Key": admin})
            theirs = (await client.get("/v1/config", headers={"X-API-Key": other})).json()
        assert refused.status_code == 403
        assert refused.json()["required_scope"] == "admin"
        assert theirs["activity_window_days"] == 365

    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ({"activity_window_days": 0}, "activity_window_days"),
            ({"activity_window_days": 3651}, "activity_window_days"),
            ({"reporting_currency": "euro"}, "reporting_currency"),
            ({"conversion_factors": {"USD": "0"}}, "conversion_factors"),
            ({"conversion_factors": {"USD": "NaN"}}, "conversion_factors"),
            ({"conversion_factors": {"usd": "1"}}, "conversion_factors"),
            ({"conversion_factors": {"USD": "0.0000000000001"}}, "conversion_factors"),
            ({"point_value": "-1"}, "point_value"),
            ({"clv_discount_rate": "1.5"}, "clv_discount_rate"),
            ({"clv_horizon_months": 0}, "clv_horizon_months"),
            ({"segment_thresholds": {"x": "y" * 20000}}, "segment_thresholds"),
            ({"unknown": 1}, "unknown"),
        ],
    )
    async def test_out_of_bounds_values_are_422_problems(
        self, tenant: str, body: dict[str, object], field: str
    ) -> None:
        admin = await create_api_key("metrics", tenant, ["admin"])
        async with running_app(app()) as client:  # type: ignore[arg-type]
            response = await client.put("/v1/config", json=body, headers={"X-API-Key": admin})
            stored = (await client.get("/v1/config", headers={"X-API-Key": admin})).json()
        assert response.status_code == 422
        assert response.headers["content-type"] == "application/problem+json"
        assert field in response.json()["detail"]
        assert stored == DEFAULTS
