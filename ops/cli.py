"""`loyalty`: the operator's command line (API keys, topics, migrations, sample events, the DLQ).

It sits above the services and composes them: a service's settings and key table are imported only when a
command names that service, so one service's missing configuration does not stop commands for another."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table as RichTable
from sqlalchemy import Table, select

from ledger.cli import app as ledger_app
from metrics.cli import app as metrics_app
from shared.auth import SCOPES, generate_key, revoke_key, store_key, validate_scopes
from shared.db import create_engine
from shared.events import PurchaseCompleted, PurchaseLine, make_event
from shared.kafka import EventProducer, ensure_topics
from shared.settings import ServiceSettings
from shared.topics import ALL_TOPICS, DLQ, PURCHASES

app = typer.Typer(help="Operate the loyalty platform.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys: bound to one tenant, with scopes.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(ledger_app, name="ledger")
app.add_typer(metrics_app, name="metrics")
console = Console()
err = Console(stderr=True)

SERVICES = ("ledger", "rules", "metrics")
ROOT = Path(__file__).resolve().parent.parent


def service_settings(service: str) -> ServiceSettings:
    match service:
        case "ledger":
            from ledger.config import settings as ledger

            return ledger
        case "rules":
            from rules.config import settings as rules

            return rules
        case "metrics":
            from metrics.config import settings as metrics

            return metrics
    raise typer.BadParameter(f"unknown service {service!r}; known: {list(SERVICES)}")


def service_keys_table(service: str) -> Table:
    match service:
        case "ledger":
            from ledger.models import api_keys as ledger

            return ledger
        case "rules":
            from rules.models import api_keys as rules

            return rules
        case "metrics":
            from metrics.models import api_keys as metrics

            return metrics
    raise typer.BadParameter(f"unknown service {service!r}; known: {list(SERVICES)}")


ServiceOpt = Annotated[list[str] | None, typer.Option("--service", "-s", help="Only these services (default: all)")]


def _services(selected: list[str] | None) -> list[str]:
    chosen = selected or list(SERVICES)
    unknown = sorted(set(chosen) - set(SERVICES))
    if unknown:
        raise typer.BadParameter(f"unknown services {unknown}; known: {list(SERVICES)}")
    return chosen


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="The tenant (loyalty programme) the key is bound to")],
    scope: Annotated[list[str], typer.Option("--scope", help=f"Repeatable; one of {sorted(SCOPES)}")],
    name: Annotated[str, typer.Option(help="Who or what uses the key")] = "unnamed",
    service: ServiceOpt = None,
) -> None:
    """Create a key and print it once; only its hash is stored."""
    try:
        scopes = validate_scopes(scope)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    key = generate_key()

    async def run() -> None:
        for svc in _services(service):
            engine = create_engine(service_settings(svc).database_url, pool_size=1)
            try:
                await store_key(engine, service_keys_table(svc), key, tenant_id=tenant, name=name, scopes=scopes)
            finally:
                await engine.dispose()

    asyncio.run(run())
    err.print(f"[green]created key {key.key_id}[/] for tenant [bold]{tenant}[/] with scopes {', '.join(scopes)}")
    err.print("Store it now: it is not shown again.")
    print(key.token)


@keys_app.command("list")
def keys_list(tenant: Annotated[str | None, typer.Option()] = None, service: ServiceOpt = None) -> None:
    """List keys (never their secrets)."""

    async def run() -> list[tuple[str, Any]]:
        rows: list[tuple[str, Any]] = []
        for svc in _services(service):
            table = service_keys_table(svc)
            engine = create_engine(service_settings(svc).database_url, pool_size=1)
            try:
                stmt = select(table).order_by(table.c.created_at)
                if tenant:
                    stmt = stmt.where(table.c.tenant_id == tenant)
                async with engine.connect() as conn:
                    rows.extend((svc, r) for r in (await conn.execute(stmt)).all())
            finally:
                await engine.dispose()
        return rows

    out = RichTable("service", "key id", "tenant", "name", "scopes", "created", "revoked")
    for svc, r in asyncio.run(run()):
        out.add_row(
            svc,
            r.key_id,
            r.tenant_id,
            r.name,
            ", ".join(r.scopes),
            r.created_at.isoformat(timespec="seconds"),
            r.revoked_at.isoformat(timespec="seconds") if r.revoked_at else "",
        )
    console.print(out)


@keys_app.command("revoke")
def keys_revoke(key_id: str, service: ServiceOpt = None) -> None:
    """Revoke a key in every service."""

    async def run() -> int:
        count = 0
        for svc in _services(service):
            engine = create_engine(service_settings(svc).database_url, pool_size=1)
            try:
                count += await revoke_key(engine, service_keys_table(svc), key_id)
            finally:
                await engine.dispose()
        return count

    if asyncio.run(run()) == 0:
        err.print(f"[red]no active key {key_id}[/]")
        raise typer.Exit(1)
    err.print(f"revoked {key_id}")


@app.command("topics")
def topics(service: Annotated[str, typer.Option(help="Whose settings to read")] = "ledger") -> None:
    """Create the platform's topics (idempotent)."""
    s = service_settings(service)
    specs = [replace(t, name=s.topic(t.name)) for t in ALL_TOPICS]
    created = asyncio.run(
        ensure_topics(
            s.kafka_bootstrap_servers,
            specs,
            replication_factor=s.topic_replication_factor,
            partitions_override=s.topic_partitions,
        )
    )
    err.print(f"created: {created or 'nothing, all topics exist'}")


@app.command("migrate")
def migrate(service: ServiceOpt = None) -> None:
    """Apply each service's alembic migrations to its database."""
    from shared.migrations import upgrade

    for svc in _services(service):
        upgrade(str(ROOT / "services" / svc / "alembic.ini"), service_settings(svc).database_url)
        err.print(f"{svc}: at head")


@app.command("sample")
def sample(
    count: Annotated[int, typer.Option(min=1)] = 20,
    tenant: Annotated[str, typer.Option()] = "demo",
    customers: Annotated[int, typer.Option(min=1)] = 5,
) -> None:
    """Publish sample purchase events to loyalty.purchases.v1."""
    s = service_settings("rules")
    rng = random.Random(42)
    categories = [("FAST-100", "fasteners"), ("TOOL-220", "tools"), ("SAFE-310", "safety"), ("PACK-400", "packaging")]
    events = []
    now = datetime.now(UTC)
    for i in range(count):
        sku, category = rng.choice(categories)
        qty = Decimal(rng.randint(1, 20))
        price = Decimal(rng.randint(500, 20000)) / 100
        net = qty * price
        data = PurchaseCompleted(
            order_id=f"SO-{uuid.uuid4().hex[:10]}",
            customer_id=f"cust-{rng.randint(1, customers):03d}",
            member_id=f"buyer-{rng.randint(1, 3)}",
            channel=rng.choice(["webshop", "erp", "sales_rep"]),
            currency="EUR",
            net_amount=net,
            gross_amount=(net * Decimal("1.21")).quantize(Decimal("0.01")),
            lines=[PurchaseLine(sku=sku, category=category, quantity=qty, unit_price=price)],
            ordered_at=now - timedelta(minutes=count - i),
        )
        events.append(make_event("purchase.completed", data, tenant_id=tenant, source="loyalty-cli/sample"))

    async def run() -> None:
        producer = EventProducer(s.kafka_bootstrap_servers, client_id="loyalty-cli")
        await producer.start()
        try:
            await producer.publish_many(s.topic(PURCHASES), events)
        finally:
            await producer.stop()

    asyncio.run(run())
    err.print(f"published {len(events)} purchase.completed events for tenant {tenant} to {s.topic(PURCHASES)}")


@app.command("dlq")
def dlq(limit: Annotated[int, typer.Option(min=1)] = 20, service: Annotated[str, typer.Option()] = "ledger") -> None:
    """Show the newest dead letters with their reasons."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from shared.consumer import DeadLetter

    s = service_settings(service)

    async def run() -> list[DeadLetter]:
        topic = s.topic(DLQ)
        consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap_servers, enable_auto_commit=False)
        await consumer.start()
        try:
            cluster = await consumer._client.fetch_all_metadata()  # the public API only knows assigned topics
            parts = [TopicPartition(topic, p) for p in cluster.partitions_for_topic(topic) or ()]
            if not parts:
                return []
            consumer.assign(parts)
            ends = await consumer.end_offsets(parts)
            for tp in parts:
                consumer.seek(tp, max(ends[tp] - limit, 0))
            out: list[DeadLetter] = []
            while True:
                positions = [await consumer.position(tp) for tp in parts]
                if all(pos >= ends[tp] for pos, tp in zip(positions, parts, strict=True)):
                    break
                for records in (await consumer.getmany(timeout_ms=1000)).values():
                    out.extend(DeadLetter.from_record(r) for r in records)
            return out[-limit:]
        finally:
            await consumer.stop()

    table = RichTable("source", "reason", "bytes")
    for d in asyncio.run(run()):
        preview = (d.value or b"")[:60]
        table.add_row(
            f"{d.source_topic}[{d.source_partition}]@{d.source_offset}",
            d.reason,
            json.dumps(preview.decode(errors="replace")),
        )
    console.print(table)


if __name__ == "__main__":
    app()
