"""`loyalty ledger …`: verify hash chains and balances, run the periodic jobs by hand."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ledger import schemas
from ledger.anchors import read_anchors
from ledger.config import settings
from ledger.service import ledger_service
from ledger.tasks import run_tasks
from shared.db import create_engine, create_sessionmaker

app = typer.Typer(help="The points ledger: verification and periodic jobs.", no_args_is_help=True)
console = Console()


@app.command("verify")
def verify(
    tenant: Annotated[str, typer.Option(help="The programme to check")],
    account: Annotated[str | None, typer.Option(help="One account (default: every account of the tenant)")] = None,
) -> None:
    """Recompute hash chains and balances from the entries and check them against lots, holds, the system
    shards' ranges and the transactions' sums; exit 1 when anything does not match."""

    async def run() -> schemas.TenantVerification | schemas.Verification | None:
        engine = create_engine(settings.database_url, pool_size=1)
        try:
            async with create_sessionmaker(engine)() as session:
                anchors = await read_anchors(settings, tenant, account)
                if account is None:
                    return await ledger_service.verify_tenant(session, tenant, anchors=anchors)
                return await ledger_service.verify(session, tenant, account, anchors=anchors)
        finally:
            await engine.dispose()

    result = asyncio.run(run())
    if result is None or (isinstance(result, schemas.TenantVerification) and result.accounts == 0):
        console.print(f"[red]no accounts found for tenant {tenant}[/]")
        raise typer.Exit(1)
    if isinstance(result, schemas.Verification):
        rows, problems, summary = [result], [], f"{result.entries} entries"
    else:
        rows, problems = result.failed, result.problems
        summary = f"{result.accounts} accounts, {result.entries} entries, {len(result.failed)} with problems"
    table = Table("account", "entries", "status", "problems")
    for r in rows:
        table.add_row(r.account_id, str(r.entries), "ok" if r.ok else "[red]MISMATCH[/]", "\n".join(r.problems))
    if rows:
        console.print(table)
    for problem in problems:
        console.print(f"[red]tenant: {problem}[/]")
    console.print(f"{tenant}: {summary}: {'ok' if result.ok else '[red]MISMATCH[/]'}")
    if not result.ok:
        raise typer.Exit(1)


@app.command("run-tasks")
def run_tasks_command(
    now: Annotated[datetime | None, typer.Option(help="Pretend it is this moment (UTC); default: now")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Due lots or holds handled per job")] = 10_000,
    tenant: Annotated[str | None, typer.Option(help="Only this programme (default: all)")] = None,
) -> None:
    """Mature due pending points, expire due lots into breakage and release expired holds."""

    async def run() -> schemas.TaskRun:
        engine = create_engine(settings.database_url, pool_size=1)
        try:
            moment = None if now is None else now.replace(tzinfo=now.tzinfo or UTC)
            return await run_tasks(create_sessionmaker(engine), now=moment, limit=limit, tenant_id=tenant)
        finally:
            await engine.dispose()

    result = asyncio.run(run())
    console.print(
        f"matured {result.matured} lots, expired {result.expired} lots, released {result.holds_released} holds"
    )
