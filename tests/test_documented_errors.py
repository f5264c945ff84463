"""Each route documents the errors it declares (`shared.errors.raises` on its endpoint and dependencies), one
OpenAPI response per status; read from the apps' own schema, without a database or a broker."""

from collections.abc import Callable
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute

from ledger.app import create_app as ledger_app
from ledger.endpoints import router as ledger_router
from ledger.rewards_endpoints import router as rewards_router
from metrics.app import create_app as metrics_app
from metrics.endpoints import router as metrics_router
from rules.app import create_app as rules_app
from rules.endpoints import router as rules_router
from shared.errors import (
    REQUEST_INVALID,
    DocumentedRoute,
    Forbidden,
    ServiceError,
    Unauthorized,
    UnprocessableEntity,
    responses,
)


@pytest.mark.parametrize(
    ("create_app", "routers"),
    [(ledger_app, [ledger_router, rewards_router]), (rules_app, [rules_router]), (metrics_app, [metrics_router])],
    ids=["ledger", "rules", "metrics"],
)
def test_every_route_documents_the_statuses_of_its_errors(
    create_app: Callable[[], FastAPI], routers: list[APIRouter]
) -> None:
    paths: dict[str, Any] = create_app().openapi()["paths"]
    routes = [r for router in routers for r in router.routes if isinstance(r, APIRoute)]
    # `path_format` is the path as OpenAPI shows it (a `{account_id:path}` parameter as `{account_id}`).
    assert {r.path_format for r in routes} == {p for p in paths if p.startswith("/v1")}
    for route in routes:
        assert isinstance(route, DocumentedRoute), route.path
        # Every /v1 route authenticates: its errors come from the `require` dependency too.
        assert {Unauthorized, Forbidden} <= set(route.errors), route.path
        assert route.methods
        for method in route.methods:
            documented = paths[route.path_format][method.lower()]["responses"]
            for error in route.errors:
                status = str(error.status_code)
                assert status in documented, (method, route.path, error.__name__)
                assert f"`{error.__name__}`" in documented[status]["description"], (method, route.path)


def test_ledger_routes_name_their_own_errors() -> None:
    paths = ledger_app().openapi()["paths"]
    redeem = paths["/v1/accounts/{account_id}/redeem"]["post"]["responses"]
    assert "`InsufficientPoints`" in redeem["409"]["description"]
    assert "`AccountNotFound`" in redeem["404"]["description"]
    # A route that validates its request keeps FastAPI's schema of the 422, with its own errors listed too.
    assert redeem["422"]["content"]
    assert "`IdempotencyKeyReused`" in redeem["422"]["description"]
    assert REQUEST_INVALID in redeem["422"]["description"]
    # A clawback's only 409: asking for more than its earn has left.
    clawback = paths["/v1/accounts/{account_id}/clawback"]["post"]["responses"]
    assert clawback["409"]["description"].startswith("- `ClawbackExceedsEarn`")
    assert "`InsufficientPoints`" not in clawback["409"]["description"]


class Documented(ServiceError):
    """What the docs say."""

    status_code = 404


class Untitled(ServiceError):
    status_code = 404


class TestResponses:
    def test_one_response_per_status_listing_each_error(self) -> None:
        assert responses(Documented, Untitled, Unauthorized, Documented) == {
            "401": {"description": "- `Unauthorized`: No API key, or one that is unknown or revoked."},
            "404": {"description": "- `Documented`: What the docs say.\n- `Untitled`: Untitled"},
        }

    def test_a_validating_route_says_so_first_in_its_422(self) -> None:
        assert responses(UnprocessableEntity, validates=True)["422"]["description"].splitlines() == [
            f"- {REQUEST_INVALID}",
            "- `UnprocessableEntity`: A value in the request cannot be used.",
        ]
        assert responses(Documented, validates=True) == {"404": {"description": "- `Documented`: What the docs say."}}
