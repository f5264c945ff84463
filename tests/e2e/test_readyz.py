"""/readyz follows the broker: 503 while it is stopped, 200 again once it is back."""

from __future__ import annotations

import asyncio
import subprocess

import httpx
import pytest

from ledger.app import create_app
from tests.conftest import ROOT, eventually, running_app, service_settings

pytestmark = [pytest.mark.kafka, pytest.mark.db, pytest.mark.disruptive]


async def kafka(action: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        str(ROOT / "deploy/kafka/kafka.sh"), action, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()


async def test_readyz_turns_503_without_the_broker_and_200_after() -> None:
    async with running_app(create_app(service_settings("ledger"))) as client:
        assert (await client.get("/readyz")).status_code == 200
        await kafka("down")
        try:
            response = await eventually(lambda: _unready(client), timeout_s=30)
            assert response.headers["content-type"] == "application/problem+json"
            body = response.json()
            assert body["checks"]["kafka"].startswith("unreachable")
            assert body["checks"]["database"] == "ok"
            assert (await client.get("/healthz")).status_code == 200, "liveness does not depend on Kafka"
        finally:
            await kafka("up")
        ready = await eventually(lambda: _ready(client), timeout_s=60)
        assert ready.json()["checks"]["kafka"] == "ok"


async def _unready(client: httpx.AsyncClient) -> httpx.Response | None:
    response = await client.get("/readyz")
    return response if response.status_code == 503 else None


async def _ready(client: httpx.AsyncClient) -> httpx.Response | None:
    response = await client.get("/readyz")
    return response if response.status_code == 200 else None
