"""`make chaos`: nothing is lost, created or granted twice while the platform's processes and infrastructure fail.

While a seeded stream of purchases, partial and full refunds, reviews and attendances flows into Kafka, the run
kills the rules service with SIGKILL and restarts it, later the ledger, later metrics, then restarts the Kafka
broker and PostgreSQL. When the stream has drained it reconciles exactly: every customer's points (available +
pending + held) equal what the ruleset gives for the events sent, computed by `tests.chaos.stream.Reference`
(not by the rules engine); each customer has one ledger posting per command and the number of commands the
reference expects; `verify` passes for every customer account (REST) and for the tenant (`loyalty ledger
verify`); metrics' KPIs over the run's days equal the reference's: orders, net revenue after refunds, refunds,
points issued and clawed back, customers with an order and the points liability; the DLQ is empty. It prints a
summary table and exits 1 when anything differs.

It runs on infrastructure of its own, so restarting it disturbs no one else on the machine (or in CI): a Kafka
broker (`deploy/kafka/kafka.sh` with its own home, `.local/chaos/kafka`, fresh data every run, port 19092), a
PostgreSQL 15 cluster `chaos` on port 5433 (`deploy/postgres/db-up.sh`, created when missing), and the three
services as `python -m <service>` processes on ports 18001-18003 (logs in `.local/chaos/run/`). Each run uses a
fresh tenant. The broker and the cluster are stopped at the end (`--keep` leaves everything up).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from shared.consumer import DeadLetter
from shared.events import utcnow
from shared.topics import DLQ
from tests.chaos.stream import RULESET, Reference, Stream
from tests.groups import group_lag

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / ".local" / "chaos"
SERVICES = ("ledger", "rules", "metrics")
PG_VERSION = "15"


@dataclass(frozen=True)
class Config:
    seed: int
    customers: int
    rate: float
    duration: float
    drain_timeout: float
    pg_port: int
    kafka_port: int
    http_ports: dict[str, int]
    keep: bool
    pg_cluster: str = "chaos"

    @property
    def kafka(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    def database_url(self, service: str) -> str:
        return f"postgresql+asyncpg://loyalty:loyalty@127.0.0.1:{self.pg_port}/loyalty_{service}"

    def base_url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.http_ports[service]}"


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seed", type=int, default=1, help="seed of the event stream")
    p.add_argument("--customers", type=int, default=150)
    p.add_argument("--rate", type=float, default=30.0, help="events per second")
    p.add_argument("--duration", type=float, default=110.0, help="seconds of stream; faults are spread over it")
    p.add_argument("--drain-timeout", type=float, default=300.0, help="seconds to wait for the books to settle")
    p.add_argument("--pg-port", type=int, default=5433)
    p.add_argument("--kafka-port", type=int, default=19092, help="the controller listens on the next port")
    p.add_argument("--http-port", type=int, default=18001, help="ledger's; rules and metrics get the next two")
    p.add_argument("--keep", action="store_true", help="leave the broker, the cluster and the services running")
    a = p.parse_args(argv)
    ports = {s: a.http_port + i for i, s in enumerate(SERVICES)}
    return Config(a.seed, a.customers, a.rate, a.duration, a.drain_timeout, a.pg_port, a.kafka_port, ports, a.keep)


def log(message: str) -> None:
    print(f"chaos {time.strftime('%H:%M:%S')}  {message}", flush=True)


def _root_or_sudo(command: list[str]) -> list[str]:
    return command if os.geteuid() == 0 else ["sudo", *command]


# --- infrastructure -----------------------------------------------------------------------------------


class Infrastructure:
    """The run's own broker and PostgreSQL cluster, driven by the project's deploy scripts."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.kafka_home = LOCAL / "kafka"

    def _kafka_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "KAFKA_HOME_DIR": str(self.kafka_home),
            "KAFKA_LIBS_DIR": str(ROOT / ".local" / "kafka" / "libs"),
            "KAFKA_PORT": str(self.config.kafka_port),
            "KAFKA_CONTROLLER_PORT": str(self.config.kafka_port + 1),
            "KAFKA_HEAP_OPTS": "-Xms256m -Xmx512m",
            "PYTHON": sys.executable,
        }

    def kafka(self, action: str) -> None:
        subprocess.run([str(ROOT / "deploy/kafka/kafka.sh"), action], env=self._kafka_env(), check=True)

    def kafka_fresh(self) -> None:
        self.kafka("jars")
        self.kafka("down")
        shutil.rmtree(self.kafka_home / "data", ignore_errors=True)
        shutil.rmtree(self.kafka_home / "logs", ignore_errors=True)
        self.kafka("up")

    def postgres_up(self) -> None:
        env = {
            **os.environ,
            "PG_VERSION": PG_VERSION,
            "PG_CLUSTER": self.config.pg_cluster,
            "PG_PORT": str(self.config.pg_port),
            "LOYALTY_PG_TUNE": "0",  # a small cluster of its own: the defaults suffice for a few thousand events
            "LOYALTY_DATABASES": " ".join(f"loyalty_{s}" for s in SERVICES),
        }
        subprocess.run([str(ROOT / "deploy/postgres/db-up.sh")], env=env, check=True)

    def postgres(self, action: str, *options: str, check: bool = True) -> None:
        command = ["pg_ctlcluster", PG_VERSION, self.config.pg_cluster, action, *options]
        subprocess.run(_root_or_sudo(command), check=check)

    def down(self) -> None:
        # Best effort, so that a run that failed on the way up reports its own error.
        subprocess.run([str(ROOT / "deploy/kafka/kafka.sh"), "down"], env=self._kafka_env(), check=False)
        self.postgres("stop", check=False)


class Service:
    """One service as the Makefile runs it (`python -m <name>`), pointed at the run's infrastructure."""

    def __init__(self, name: str, config: Config) -> None:
        self.name = name
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = LOCAL / "run" / f"{name}.log"
        prefix = name.upper()
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            f"{prefix}_DATABASE_URL": config.database_url(name),
            f"{prefix}_KAFKA_BOOTSTRAP_SERVERS": config.kafka,
            f"{prefix}_HTTP_PORT": str(config.http_ports[name]),
            f"{prefix}_TOPIC_PARTITIONS": "3",
            f"{prefix}_LOG_LEVEL": "WARNING",
            f"{prefix}_CONSUMER_BATCH_TIMEOUT_MS": "100",
        }
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self._log is not None:
            self._log.close()
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.name], cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log is not None:
            self._log.close()

    async def ready(self, client: httpx.AsyncClient, timeout_s: float = 180.0) -> float:
        """Seconds until `/readyz` answers 200; raises when the process exits or the time runs out."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}); see {self.log_path}")
            try:
                if (await client.get(f"{self.config.base_url(self.name)}/readyz", timeout=5)).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f} s; see {self.log_path}")


def cli(config: Config, *args: str, service_env: bool = True) -> subprocess.CompletedProcess[str]:
    """The `loyalty` command line against the run's databases and broker (`ledger verify` reads the anchors)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if service_env:
        env.update({f"{s.upper()}_DATABASE_URL": config.database_url(s) for s in SERVICES})
        env.update({f"{s.upper()}_KAFKA_BOOTSTRAP_SERVERS": config.kafka for s in SERVICES})
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )


# --- the stream and the faults -------------------------------------------------------------------------


@dataclass
class Fault:
    at: float
    what: str
    recovered_s: float | None = None
    error: str | None = None


@dataclass
class Run:
    config: Config
    tenant: str
    stream: Stream
    infra: Infrastructure
    services: dict[str, Service]
    faults: list[Fault] = field(default_factory=list)
    resends: int = 0
    sent: int = 0
    started: float = 0.0

    @property
    def reference(self) -> Reference:
        return self.stream.reference


async def produce(run: Run) -> None:
    """Sends the stream at the configured rate; a send that fails (the broker restarting) is sent again, the
    same bytes under the same event id, so duplicates reach the topic and the services must absorb them."""
    config = run.config
    total = int(config.rate * config.duration)
    producer = AIOKafkaProducer(bootstrap_servers=config.kafka, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        for i in range(total):
            delay = run.started + i / config.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = run.stream.next()
            while True:
                try:
                    await asyncio.wait_for(
                        producer.send_and_wait(sent.topic, sent.event.to_bytes(), key=sent.event.key), 15
                    )
                    break
                except Exception:  # any broker error: the event is sent again until it is acknowledged
                    run.resends += 1
                    await asyncio.sleep(0.5)
            run.sent += 1
    finally:
        await producer.stop()


async def inject(run: Run, client: httpx.AsyncClient) -> None:
    """The fault schedule, spread over the stream: each service killed and restarted, then broker and database."""
    config = run.config
    span = config.duration

    async def kill(name: str) -> float:
        service = run.services[name]
        service.kill()
        await asyncio.sleep(2)
        service.start()
        return await service.ready(client)

    async def restart_broker() -> float:
        begun = time.monotonic()
        await asyncio.to_thread(run.infra.kafka, "down")
        await asyncio.to_thread(run.infra.kafka, "up")
        await all_ready(run, client)
        return time.monotonic() - begun

    async def restart_postgres() -> float:
        begun = time.monotonic()
        await asyncio.to_thread(run.infra.postgres, "restart", "-m", "fast")
        await all_ready(run, client)
        return time.monotonic() - begun

    schedule: list[tuple[float, str, Callable[[], Awaitable[float]]]] = [
        (0.12, "kill -9 rules, restart", lambda: kill("rules")),
        (0.30, "kill -9 ledger, restart", lambda: kill("ledger")),
        (0.48, "kill -9 metrics, restart", lambda: kill("metrics")),
        (0.64, "restart the Kafka broker", restart_broker),
        (0.82, "restart PostgreSQL (fast)", restart_postgres),
    ]
    for share, what, action in schedule:
        at = span * share
        await asyncio.sleep(max(0.0, run.started + at - time.monotonic()))
        fault = Fault(at=time.monotonic() - run.started, what=what)
        run.faults.append(fault)
        log(f"fault: {what}")
        try:
            fault.recovered_s = await action()
            log(f"fault: {what}: ready again after {fault.recovered_s:.1f} s")
        except Exception as exc:  # reported in the summary, and the run fails
            fault.error = f"{type(exc).__name__}: {exc}"
            log(f"fault: {what}: {fault.error}")


async def all_ready(run: Run, client: httpx.AsyncClient) -> None:
    await asyncio.gather(*(s.ready(client) for s in run.services.values()))


# --- reconciliation ------------------------------------------------------------------------------------


@dataclass
class Books:
    """The ledger's customer balances and metrics' figures for the run (its KPIs over the run's days)."""

    points: dict[str, int]
    orders: int
    net_revenue: Decimal  # after the refunds
    refunds: Decimal
    currency: str | None
    issued: int
    clawed_back: int
    buyers: int  # lifetime: customers with an order
    liability: int  # lifetime: available + pending + held

    def kpis(self) -> tuple[object, ...]:
        return (self.orders, self.net_revenue, self.refunds, self.issued, self.clawed_back, self.buyers, self.liability)


async def read_books(run: Run, client: httpx.AsyncClient, headers: dict[str, str]) -> Books:
    points: dict[str, int] = {}
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"kind": "customer", "limit": 500}
        if cursor:
            params["cursor"] = cursor
        page = await _get(client, f"{run.config.base_url('ledger')}/v1/accounts", headers, params)
        for b in page["items"]:
            points[b["account_id"]] = b["available"] + b["pending"] + b["held"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    # The run's days (a run may cross midnight); amounts count on their order's day, points on their entry's.
    today = utcnow().date()
    params = {"from": str(today - timedelta(days=1)), "to": str(today + timedelta(days=1)), "period": "day"}
    metrics = run.config.base_url("metrics")
    days = (await _get(client, f"{metrics}/v1/kpis", headers, params))["items"]
    lifetime = await _get(client, f"{metrics}/v1/kpis/lifetime", headers)
    liability = lifetime["liability"]
    return Books(
        points,
        orders=sum(d["orders"] for d in days),
        net_revenue=sum((Decimal(d["net_revenue"]) for d in days), Decimal(0)),
        refunds=sum((Decimal(d["refunds"]) for d in days), Decimal(0)),
        currency=lifetime["currency"],
        issued=sum(d["points_issued"] for d in days),
        clawed_back=sum(d["points_clawed_back"] for d in days),
        buyers=lifetime["customers"],
        liability=liability["available_points"] + liability["pending_points"] + liability["held_points"],
    )


def expected_kpis(ref: Reference) -> tuple[object, ...]:
    """`Books.kpis()` as the reference has them: net revenue is what was ordered minus what was refunded."""
    net = ref.revenue - ref.refunded
    return (ref.purchases, net, ref.refunded, ref.issued, ref.clawed, len(ref.buyers), sum(ref.points.values()))


async def _get(client: httpx.AsyncClient, url: str, headers: dict[str, str], params: Any = None) -> Any:
    response = await client.get(url, headers=headers, params=params, timeout=30)
    response.raise_for_status()
    return response.json()


def matches(run: Run, books: Books) -> bool:
    ref = run.reference
    customers = set(ref.points) | set(books.points)
    return all(books.points.get(c, 0) == ref.points.get(c, 0) for c in customers) and books.kpis() == expected_kpis(ref)


async def dead_letters(config: Config) -> list[DeadLetter]:
    # Without a group id the consumer is assigned every partition of the topic, from the beginning.
    consumer = AIOKafkaConsumer(
        DLQ, bootstrap_servers=config.kafka, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        for _ in range(100):
            if consumer.assignment():
                break
            await asyncio.sleep(0.1)
        ends = await consumer.end_offsets(list(consumer.assignment()))
        wanted = sum(ends.values())
        records: list[DeadLetter] = []
        deadline = time.monotonic() + 30
        while len(records) < wanted and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(DeadLetter.from_record(r) for r in batch)
        return records
    finally:
        await consumer.stop()


@dataclass
class Check:
    name: str
    expected: object
    found: object

    @property
    def ok(self) -> bool:
        return self.expected == self.found


async def reconcile(run: Run, client: httpx.AsyncClient, headers: dict[str, str], books: Books) -> list[Check]:
    ref = run.reference
    customers = sorted(set(ref.points) | set(books.points))
    exact = sum(books.points.get(c, 0) == ref.points.get(c, 0) for c in customers)
    checks = [
        Check("points, all customers", sum(ref.points.values()), sum(books.points.values())),
        Check("customers with exactly their points", len(customers), exact),
    ]
    # One posting per command on a customer's account: earns and clawbacks counted by their distinct sources,
    # a repeated (source, kind, bucket) is a duplicate.
    earns = clawbacks = duplicates = verified = 0
    for customer in customers:
        postings: Counter[tuple[str, str, str]] = Counter()
        cursor: int | None = None
        base = f"{run.config.base_url('ledger')}/v1/accounts/{customer}"
        while True:
            params: dict[str, Any] = {"limit": 500, **({"cursor": cursor} if cursor else {})}
            page = await _get(client, f"{base}/entries", headers, params)
            postings.update((e["source"], e["kind"], e["bucket"]) for e in page["items"])
            cursor = int(page["next_cursor"]) if page["next_cursor"] else None
            if cursor is None:
                break
        duplicates += sum(n - 1 for n in postings.values())
        earns += len({s for s, kind, _ in postings if kind == "earn"})
        clawbacks += len({s for s, kind, _ in postings if kind == "clawback"})
        verified += bool((await _get(client, f"{base}/verify", headers))["ok"])
    checks += [
        Check("earn commands booked", sum(ref.earns.values()), earns),
        Check("clawback commands booked", sum(ref.clawbacks.values()), clawbacks),
        Check("duplicate postings", 0, duplicates),
        Check("verify ok, customer accounts (REST)", len(books.points), verified),
    ]
    tenant_verify = await asyncio.to_thread(cli, run.config, "ledger", "verify", "--tenant", run.tenant)
    if tenant_verify.returncode != 0:
        log(f"loyalty ledger verify --tenant {run.tenant} failed:\n{tenant_verify.stdout}{tenant_verify.stderr}")
    checks += [
        Check("verify ok, tenant (loyalty ledger verify)", 0, tenant_verify.returncode),
        Check("metrics: reporting currency", "EUR", books.currency),
    ]
    names = [
        "metrics: orders",
        "metrics: net revenue after refunds (EUR)",
        "metrics: refunds (EUR)",
        "metrics: points issued",
        "metrics: points clawed back",
        "metrics: customers with an order",
        "metrics: points liability (customers)",
    ]
    checks += [Check(n, e, f) for n, e, f in zip(names, expected_kpis(ref), books.kpis(), strict=True)]
    letters = await dead_letters(run.config)
    for letter in letters[:10]:
        log(f"dead letter: {letter.code}: {letter.reason}")
    checks.append(Check("DLQ messages", 0, len(letters)))
    return checks


def summary(run: Run, checks: list[Check], drained_s: float | None, total_s: float) -> bool:
    ok = all(c.ok for c in checks) and all(f.error is None for f in run.faults)
    kinds = run.stream.kinds
    lines = [
        "",
        f"chaos run: tenant {run.tenant}, seed {run.config.seed}, {run.config.customers} customers, "
        f"{run.config.rate:g} events/s for {run.config.duration:g} s",
        "",
        "faults injected",
    ]
    for f in run.faults:
        outcome = f.error or f"ready again after {f.recovered_s:.1f} s"
        lines.append(f"  t+{f.at:5.1f} s  {f.what:<28} {outcome}")
    lines += [
        "",
        f"events sent: {run.sent} ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}); "
        f"sends repeated after a broker error: {run.resends}",
        "",
        f"  {'check':<44} {'expected':>14} {'found':>14}",
    ]
    for c in checks:
        lines.append(f"  {c.name:<44} {c.expected!s:>14} {c.found!s:>14}  {'ok' if c.ok else 'MISMATCH'}")
    settled = f"{drained_s:.1f} s after the stream ended" if drained_s is not None else "never"
    lines += ["", f"books settled: {settled}; whole run {total_s:.0f} s", f"RESULT: {'PASS' if ok else 'FAIL'}"]
    print("\n".join(lines), flush=True)
    return ok


# --- the run -------------------------------------------------------------------------------------------


async def main(config: Config) -> bool:
    begun = time.monotonic()
    infra = Infrastructure(config)
    services = {name: Service(name, config) for name in SERVICES}
    tenant = f"chaos-{uuid.uuid4().hex[:8]}"
    run = Run(config, tenant, Stream(tenant, customers=config.customers, seed=config.seed), infra, services)
    try:
        log("infrastructure: a broker and a PostgreSQL cluster of the run's own")
        infra.kafka_fresh()
        infra.postgres_up()
        migrated = cli(config, "migrate")
        if migrated.returncode != 0:
            raise RuntimeError(f"migrations failed: {migrated.stdout}{migrated.stderr}")
        created = cli(config, "keys", "create", "--tenant", tenant, "--scope", "admin", "--name", "chaos")
        if created.returncode != 0:
            raise RuntimeError(f"keys create failed: {created.stderr}")
        headers = {"X-API-Key": created.stdout.strip().splitlines()[-1]}
        for service in services.values():
            service.start()
        async with httpx.AsyncClient() as client:
            await all_ready(run, client)
            rules = config.base_url("rules")
            version = await client.post(f"{rules}/v1/rulesets/chaos/versions", json=RULESET, headers=headers)
            version.raise_for_status()
            activated = await client.post(
                f"{rules}/v1/rulesets/chaos/versions/{version.json()['version']}/activate",
                json={"effective_from": "2000-01-01T00:00:00Z"},
                headers=headers,
            )
            activated.raise_for_status()
            log(f"services ready, ruleset active; streaming {int(config.rate * config.duration)} events")
            run.started = time.monotonic()
            await asyncio.gather(produce(run), inject(run, client))
            stream_end = time.monotonic()
            log(f"stream sent ({run.sent} events); waiting for the books to settle")
            drained_s: float | None = None
            books = await read_books(run, client, headers)
            while time.monotonic() - stream_end < config.drain_timeout:
                if matches(run, books) and await group_lag(config.kafka) == 0:
                    drained_s = time.monotonic() - stream_end
                    log(f"books settled {drained_s:.1f} s after the stream ended; reconciling")
                    break
                await asyncio.sleep(2)
                books = await read_books(run, client, headers)
            # Anything still in flight (a late duplicate) would land now: read the books once more.
            await asyncio.sleep(5)
            books = await read_books(run, client, headers)
            checks = await reconcile(run, client, headers, books)
        return summary(run, checks, drained_s, time.monotonic() - begun)
    finally:
        for service in services.values():
            if not config.keep:
                service.stop()
        if not config.keep:
            infra.down()


if __name__ == "__main__":
    # The harness's own clients log every failed connection while the broker restarts: expected, not news.
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    sys.exit(0 if asyncio.run(main(parse_args())) else 1)
