"""`loyalty metrics …` (and `python -m metrics.cli …`, what the service's CLV schedule runs): rebuild a tenant's
aggregates from the topics, fit its predictive CLV."""

from __future__ import annotations

import asyncio
from datetime import date
from typing import Annotated

import typer
from rich.console import Console

from metrics import schemas
from metrics.clv import FitError
from metrics.config import settings
from metrics.rebuild import rebuild
from metrics.tasks import fit_clv
from shared.db import create_engine, create_sessionmaker

app = typer.Typer(help="The KPI aggregates and the predictive CLV.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)


@app.command("rebuild")
def rebuild_command(tenant: Annotated[str, typer.Option(help="The programme to rebuild")]) -> None:
    """Delete the tenant's aggregates and replay the input topics from the beginning into fresh ones."""
    replayed = asyncio.run(rebuild(settings, tenant))
    for topic, count in sorted(replayed.events.items()):
        console.print(f"{topic}: {count} events")
    console.print(f"refused again (already in the DLQ): {replayed.refused}")


@app.command("fit-clv")
def fit_clv_command(
    tenant: Annotated[str, typer.Option(help="The programme to fit")],
    as_of: Annotated[str | None, typer.Option(help="Observation day YYYY-MM-DD (default: today, UTC)")] = None,
) -> None:
    """Fit the tenant's BG/NBD and Gamma-Gamma models on its orders and store every customer's prediction."""
    try:
        day = None if as_of is None else date.fromisoformat(as_of)
    except ValueError as exc:
        raise typer.BadParameter(f"--as-of: {exc}") from exc

    async def run() -> schemas.ClvFit:
        engine = create_engine(settings.database_url, pool_size=1, application_name="metrics-clv-fit")
        try:
            return await fit_clv(create_sessionmaker(engine), tenant, as_of=day)
        finally:
            await engine.dispose()

    try:
        fit = asyncio.run(run())
    except FitError as exc:
        err.print(f"[red]no fit for tenant {tenant}:[/] {exc}")
        raise typer.Exit(1) from exc
    console.print(fit.model_dump_json(indent=2))


if __name__ == "__main__":
    app()
