"""The Grafana dashboard against a real Prometheus: every panel's PromQL has data after a short run.

Grafana cannot run here, so the check does what it would: the three services run as real HTTP servers
(subprocesses on free loopback ports, on this session's topics and test databases), a little traffic goes
through them (a ruleset, purchases in two waves so rates see increases, bad messages for the DLQ, an outbox
row too large to publish for the quarantine panel, REST calls), a Prometheus of our own scrapes their
/metrics every second, and each panel target's expression, with Grafana's variables substituted as Grafana
would for a dashboard over this run, must evaluate through /api/v1/query without error and with a
non-empty result, and must have a finite value somewhere in the run (/api/v1/query_range, what a time
series panel draws). `promtool check metrics` must accept each service's /metrics.

`prometheus` and `promtool` come from Debian's `prometheus` package (`make setup` installs it); when they
are missing the test fails rather than skips, so CI cannot pass without the check.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import PIPE
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from rules.repository import OutboxRepository
from shared.db import create_engine, create_sessionmaker, transaction
from shared.topics import POINTS_COMMANDS, PURCHASES
from tests.conftest import ROOT, create_api_key, eventually, service_settings, topic
from tests.factories import purchase
from tests.rules.helpers import install
from tests.rules.samples import BASE, doc

pytestmark = [pytest.mark.kafka, pytest.mark.db]

DASHBOARD = ROOT / "deploy/grafana/dashboards/loyalty.json"
SERVICES = ("ledger", "rules", "metrics")
SCRAPE_INTERVAL_S = 1
# Grafana's $__rate_interval: max($__interval + scrape interval, 4 x scrape interval), the scrape interval being
# the data source's (here this test's Prometheus). $__interval: the range over the panel's ~1,000 points,
# never below the scrape interval; a run of a minute or two gives the scrape interval.
GRAFANA_VARIABLES = {
    "$__rate_interval": f"{4 * SCRAPE_INTERVAL_S}s",
    "$__interval": f"{SCRAPE_INTERVAL_S}s",
    "$__range": "5m",
}


def binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/bin")
    if found is None:
        pytest.fail(f"`{name}` is not on PATH nor in /usr/bin: `make setup` installs it (Debian's prometheus package)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def panel_targets() -> list[tuple[str, str]]:
    """(panel title, expression) of every target of every panel, rows' nested panels included."""

    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in walk(dashboard["panels"]) for t in p.get("targets", []) if "expr" in t]


def substitute(expr: str, variables: dict[str, str]) -> str:
    # Longest name first, so that a name which begins another ($__interval, $__interval_ms) cannot cut it.
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace(name, variables[name]).replace("${" + name[1:] + "}", variables[name])
    assert "$" not in expr, f"a Grafana variable left unsubstituted in {expr!r}"
    return expr


def template_variables() -> dict[str, str]:
    """The dashboard's template variables at their current value ($var and ${var}); "All" as a regex."""
    dashboard = json.loads(DASHBOARD.read_text())
    values = {}
    for variable in dashboard.get("templating", {}).get("list", []):
        current = variable.get("current", {}).get("value", ".*")
        if current in ("$__all", ["$__all"]):
            current = ".*"
        values[f"${variable['name']}"] = "|".join(current) if isinstance(current, list) else str(current)
    return values


@dataclass
class Stack:
    urls: dict[str, str]  # service -> base URL
    prometheus: str
    started: float  # Unix time before the traffic


class Processes:
    """Child processes in their own process groups, stopped (and their temp dirs removed) on close."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="loyalty-dashboards-"))

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            argv, env=env, cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.procs.append((name, proc))
        return proc

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode}:\n{self.log(name)[-4000:]}")

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def service_env(service: str, port: int, **overrides: Any) -> dict[str, str]:
    settings = service_settings(
        service,
        http_port=port,
        database_pool_size=3,
        consumer_group_suffix=f"-dashboards-{uuid.uuid4().hex[:6]}",
        **overrides,
    )
    env = dict(os.environ)
    paths = [str(ROOT), *(str(ROOT / "services" / s) for s in SERVICES)]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    for name, value in settings.model_dump(mode="json").items():
        if value is not None:
            env[f"{service}_{name}".upper()] = value if isinstance(value, str) else json.dumps(value)
    return env


def prometheus_config(targets: dict[str, str]) -> str:
    jobs = [{"job_name": service, "static_configs": [{"targets": [address]}]} for service, address in targets.items()]
    config = {
        "global": {
            "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
            "scrape_timeout": f"{SCRAPE_INTERVAL_S}s",
            "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
        },
        "scrape_configs": jobs,
    }
    return json.dumps(config)  # YAML is a superset of JSON


async def until_ready(processes: Processes, url: str, timeout_s: float = 90.0) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        deadline = time.monotonic() + timeout_s
        while True:
            processes.check_alive()
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{url} not ready within {timeout_s}s")
            await asyncio.sleep(0.3)


@pytest.fixture(scope="module")
async def stack(kafka_topics: list[str], raw_producer: AIOKafkaProducer) -> AsyncIterator[Stack]:
    prometheus_bin = binary("prometheus")
    binary("promtool")
    processes = Processes()
    try:
        ports = {service: free_port() for service in SERVICES}
        overrides: dict[str, dict[str, Any]] = {
            # The rules relay sweeps its outbox soon, so the oversized row below is quarantined within the run.
            "rules": {"outbox_sweep_seconds": 0.3, "outbox_sweep_after_seconds": 0.2},
        }
        for service in SERVICES:
            env = service_env(service, ports[service], **overrides.get(service, {}))
            processes.start(service, [sys.executable, "-m", service], env)
        urls = {service: f"http://127.0.0.1:{port}" for service, port in ports.items()}
        for service in SERVICES:
            await until_ready(processes, f"{urls[service]}/readyz")

        prometheus_port = free_port()
        config = processes.tmp / "prometheus.yml"
        config.write_text(prometheus_config({s: f"127.0.0.1:{p}" for s, p in ports.items()}))
        processes.start(
            "prometheus",
            [
                prometheus_bin,
                f"--config.file={config}",
                f"--storage.tsdb.path={processes.tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
                "--log.level=warn",
            ],
            dict(os.environ),
        )
        prometheus = f"http://127.0.0.1:{prometheus_port}"
        await until_ready(processes, f"{prometheus}/-/ready")
        # Prometheus applies its targets a few seconds after start: traffic before its first scrapes is not seen.
        await eventually(lambda: scraped(prometheus), timeout_s=30, interval_s=0.5)

        started = time.time()
        await drive_traffic(urls, raw_producer)
        yield Stack(urls=urls, prometheus=prometheus, started=started)
        processes.check_alive()
    finally:
        processes.close()


async def scraped(prometheus: str) -> bool:
    async with httpx.AsyncClient(timeout=10) as client:
        data = await query(client, prometheus, "query", query="count_over_time(up[1m]) >= 2 and up == 1")
    return {r["metric"]["job"] for r in data["result"]} == set(SERVICES)


async def drive_traffic(urls: dict[str, str], producer: AIOKafkaProducer) -> None:
    tenant = f"t-{uuid.uuid4().hex[:12]}"
    keys = {service: await create_api_key(service, tenant, ["admin"]) for service in SERVICES}
    clients = {
        service: httpx.AsyncClient(base_url=url, headers={"X-API-Key": keys[service]}, timeout=10)
        for service, url in urls.items()
    }
    try:
        await install(clients["rules"], keys["rules"], doc(BASE))
        # Two waves a few scrapes apart: a counter's first sample shows no increase, so a rate panel has a
        # finite value only once a series that already exists grows again.
        for wave in range(2):
            customers = [f"c-{wave}-{i}" for i in range(3)]
            for customer in customers:
                event = purchase(tenant, customer, net="25.00")
                await producer.send(topic(PURCHASES), event.to_bytes(), key=event.key)
            # A bad message on the purchases topic: the rules and metrics consumers dead-letter it.
            await producer.send(topic(PURCHASES), b"{not json", key=f"{tenant}:c-bad".encode())
            await producer.flush()
            await quarantine_an_oversized_outbox_row(tenant)

            async def earned(customers: list[str] = customers) -> bool:
                for customer in customers:
                    response = await clients["ledger"].get(f"/v1/accounts/{customer}")
                    if response.status_code != 200 or response.json()["lifetime_earned"] <= 0:
                        return False
                return True

            await eventually(earned, timeout_s=60, interval_s=0.3)
            assert (await clients["rules"].get(f"/v1/customers/{customers[0]}/state")).status_code == 200
            kpis = await clients["metrics"].get(
                "/v1/kpis", params={"from": "2026-01-01", "to": "2030-01-01", "period": "year"}
            )
            assert kpis.status_code == 200, kpis.text
            assert (await clients["ledger"].get("/v1/accounts/nobody")).status_code == 404
            await asyncio.sleep(4 * SCRAPE_INTERVAL_S)
    finally:
        for client in clients.values():
            await client.aclose()


async def quarantine_an_oversized_outbox_row(tenant: str) -> None:
    """A rules outbox row larger than the relay sends (its default 1,000,000 bytes): the relay moves it aside."""
    engine = create_engine(service_settings("rules").database_url, pool_size=1)
    try:
        async with transaction(create_sessionmaker(engine)) as session:
            row = {"topic": topic(POINTS_COMMANDS), "key": f"{tenant}:c-huge".encode(), "value": b"x" * 1_000_100}
            await OutboxRepository.from_session(session).add([row])
    finally:
        await engine.dispose()


async def query(client: httpx.AsyncClient, prometheus: str, path: str, **params: Any) -> Any:
    response = await client.get(f"{prometheus}/api/v1/{path}", params=params)
    body = response.json()
    assert response.status_code == 200, f"{params.get('query')}: {body}"
    assert body["status"] == "success", f"{params.get('query')}: {body}"
    return body["data"]


def finite(series: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(v)) for s in series for _, v in s["values"])


async def panel_problems(stack: Stack, expressions: list[tuple[str, str]]) -> list[str]:
    problems = []
    end = time.time()
    async with httpx.AsyncClient(timeout=10) as client:
        for title, expr in expressions:
            data = await query(client, stack.prometheus, "query", query=expr, time=end)
            if not data["result"]:
                problems.append(f"{title}: {expr} is empty")
                continue
            series = await query(
                client,
                stack.prometheus,
                "query_range",
                query=expr,
                start=stack.started,
                end=end,
                step=SCRAPE_INTERVAL_S,
            )
            if not finite(series["result"]):
                problems.append(f"{title}: {expr} has no finite value during the run: {series['result']}"[:1000])
    return problems


async def test_every_panel_query_has_data(stack: Stack) -> None:
    variables = {**GRAFANA_VARIABLES, **template_variables()}
    expressions = [(title, substitute(expr, variables)) for title, expr in panel_targets()]
    assert len(expressions) >= 10, "the dashboard's panels were not found"

    # Prometheus may not have scraped the last effects yet: the panels get a few scrapes to show them. A query
    # Prometheus refuses fails at once (in `query`).
    for _ in range(20):
        problems = await panel_problems(stack, expressions)
        if not problems:
            break
        await asyncio.sleep(1)
    assert not problems, "panels without data:\n" + "\n".join(problems)


@pytest.mark.parametrize("service", SERVICES)
async def test_promtool_accepts_the_metrics_exposition(stack: Stack, service: str) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        exposition = (await client.get(f"{stack.urls[service]}/metrics")).content
    assert b"http_requests_total" in exposition
    promtool = await asyncio.create_subprocess_exec(
        binary("promtool"), "check", "metrics", stdin=PIPE, stdout=PIPE, stderr=subprocess.STDOUT
    )
    output, _ = await promtool.communicate(exposition)
    # promtool exits 1 on lint problems (names, help texts, units) as well as on a malformed exposition.
    assert promtool.returncode == 0, output.decode()
    assert output == b"", output.decode()
