"""schemathesis against each service's own OpenAPI document: every operation, authenticated with a key of all
scopes, positive and negative requests generated from the document, sent over HTTP to the running app (its
real database and broker).

Every response must: not be a 5xx; be problem+json when it is a 4xx; carry a documented status code and a
documented content type; match the documented schema. Examples per operation are few and derandomized, so a
run takes minutes and CI sees the same requests every time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, CheckContext, GenerationMode, Response
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from ledger.app import create_app as ledger_app
from metrics.app import create_app as metrics_app
from rules.app import create_app as rules_app
from shared.errors import PROBLEM_JSON
from tests.conftest import create_api_key, service_settings
from tests.e2e.live import serve

pytestmark = [pytest.mark.kafka, pytest.mark.db]

APPS: dict[str, Callable[..., FastAPI]] = {"ledger": ledger_app, "rules": rules_app, "metrics": metrics_app}
# Per operation and generation mode; LOYALTY_SCHEMATHESIS_EXAMPLES=500 for a deeper run by hand.
EXAMPLES = int(os.environ.get("LOYALTY_SCHEMATHESIS_EXAMPLES", "25"))
# No consumers, and few connections: the database serves every test run on the machine.
SMALL: dict[str, Any] = {"consumers_enabled": False, "database_pool_size": 2, "database_pool_warm": False}


@schemathesis.check
def errors_are_problem_json(ctx: CheckContext, response: Response, case: Case[Any]) -> bool | None:
    """A 4xx answers in RFC 9457 problem+json, with its status repeated in the body."""
    if 400 <= response.status_code < 500:
        content_type = (response.headers.get("content-type") or [""])[0]
        assert content_type.split(";")[0] == PROBLEM_JSON, f"{response.status_code} answered as {content_type!r}"
        body = response.json()
        assert body["status"] == response.status_code, body
        assert body["title"], body
    return None


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    errors_are_problem_json,
]


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, str]]:
    with ExitStack() as stack:
        yield {
            service: stack.enter_context(serve(create(service_settings(service, **SMALL))))
            for service, create in APPS.items()
        }


@pytest.fixture
async def keys(tenant: str) -> dict[str, dict[str, str]]:
    return {service: {"X-API-Key": await create_api_key(service, tenant, ["admin"])} for service in APPS}


FUZZ = settings(
    max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck)
)


@pytest.mark.timeout(120 + EXAMPLES * 12)  # the generated requests of one service, on a busy machine
@pytest.mark.parametrize("service", sorted(APPS))
def test_every_operation_conforms(service: str, servers: dict[str, str], keys: dict[str, dict[str, str]]) -> None:
    schema = schemathesis.openapi.from_url(f"{servers[service]}/openapi.json")
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # a document schemathesis cannot read fails here
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @FUZZ
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Case[Any]) -> None:
                case.call_and_validate(headers=keys[service], checks=CHECKS)

            try:
                run()
            except Unsatisfiable:
                # An operation without parameters or body (/healthz) has no negative input at all.
                assert mode is GenerationMode.NEGATIVE, operation.label
            except (Exception, BaseExceptionGroup) as exc:  # every operation is tried, the failures reported together
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert operations >= 1
    assert not failures, f"{len(failures)} failing:\n\n" + "\n\n".join(failures)
