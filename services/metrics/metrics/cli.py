"""`loyalty metrics …`: rebuild a tenant's aggregates from the topics."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.console import Console

from metrics.config import settings
from metrics.rebuild import rebuild

app = typer.Typer(help="The KPI aggregates.", no_args_is_help=True)
console = Console()


@app.command("rebuild")
def rebuild_command(tenant: Annotated[str, typer.Option(help="The programme to rebuild")]) -> None:
    """Delete the tenant's aggregates and replay the input topics from the beginning into fresh ones."""
    replayed = asyncio.run(rebuild(settings, tenant))
    for topic, count in sorted(replayed.events.items()):
        console.print(f"{topic}: {count} events")
    console.print(f"refused again (already in the DLQ): {replayed.refused}")
