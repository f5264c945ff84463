"""The alembic env every service uses: online, async, versioned inside the service's own schema."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import MetaData, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine


def include_name(schema: str, name: str | None, type_: str) -> bool:
    """Autogenerate compares only the service's own schema, and never its alembic bookkeeping."""
    if type_ == "schema":
        return name == schema
    return not (type_ == "table" and name == "alembic_version")


def run_env(metadata: MetaData, default_url: str) -> None:
    config = context.config
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url") or default_url
    schema = metadata.schema
    assert schema, "each service keeps its tables in its own schema"

    def do_run(connection: Connection) -> None:
        connection.execute(text(f'create schema if not exists "{schema}"'))
        context.configure(
            connection=connection,
            target_metadata=metadata,
            version_table_schema=schema,
            include_schemas=True,
            include_name=lambda name, type_, parent: include_name(schema, name, type_),
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()

    async def run() -> None:
        engine = create_async_engine(url)
        async with engine.begin() as conn:
            await conn.run_sync(do_run)
        await engine.dispose()

    if context.is_offline_mode():
        raise SystemExit("offline migrations are not supported; run against a database")
    asyncio.run(run())


def upgrade(alembic_ini: str, database_url: str, revision: str = "head") -> None:
    """Applies a service's migrations programmatically (tests, `loyalty db migrate`)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config(alembic_ini)
    cfg.attributes["database_url"] = database_url
    command.upgrade(cfg, revision)
