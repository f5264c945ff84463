"""The `loyalty` CLI as an operator runs it: a subprocess with the service's settings from the environment."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from metrics.app import create_app
from tests.conftest import database_url, running_app, service_settings

pytestmark = pytest.mark.db


def loyalty(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "METRICS_DATABASE_URL": database_url("metrics"), "COLUMNS": "250"}
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


class TestKeys:
    async def test_created_key_is_printed_once_and_authenticates(self, tenant: str) -> None:
        created = loyalty("keys", "create", "--tenant", tenant, "--scope", "metrics:read", "--service", "metrics")
        assert created.returncode == 0, created.stderr
        token = created.stdout.strip()
        assert token.startswith("lk_")
        assert "not shown again" in created.stderr

        listed = loyalty("keys", "list", "--tenant", tenant, "--service", "metrics")
        assert listed.returncode == 0, listed.stderr
        assert tenant in listed.stdout
        assert token.rsplit("_", 1)[1] not in listed.stdout, "the secret is never listed"

        async with running_app(create_app(service_settings("metrics", consumers_enabled=False))) as client:
            path = "/v1/kpis?from=2026-01-01&to=2026-01-02"
            assert (await client.get(path, headers={"X-API-Key": token})).status_code == 200
            key_id = token.split("_")[1]
            revoked = loyalty("keys", "revoke", key_id, "--service", "metrics")
            assert revoked.returncode == 0, revoked.stderr
            assert (await client.get(path, headers={"X-API-Key": token})).status_code == 401

    def test_unknown_scope_is_refused_clearly(self, tenant: str) -> None:
        result = loyalty("keys", "create", "--tenant", tenant, "--scope", "points:steal", "--service", "metrics")
        assert result.returncode != 0
        assert "unknown scopes" in result.stderr
