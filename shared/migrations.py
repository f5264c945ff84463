"""The alembic env every service uses: online, async, versioned inside the service's own schema.

Migrations run as the schema's owner role (`*_DATABASE_OWNER_URL`); after them, the env grants the
service role (the user of `*_DATABASE_URL`) what it needs and nothing more: usage of the schema and
SELECT, INSERT, UPDATE, DELETE on its tables, minus UPDATE and DELETE on the append-only tables the
service names, and read-only on the alembic bookkeeping. Not being the owner, the service role can run no
DDL on the schema: it cannot drop a trigger, alter or truncate a table. The grants are re-applied on every
run, so tables added by any later migration get them too.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence

from alembic import context
from sqlalchemy import MetaData, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

_ROLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def include_name(schema: str, name: str | None, type_: str) -> bool:
    """Autogenerate compares only the service's own schema, and never its alembic bookkeeping."""
    if type_ == "schema":
        return name == schema
    return not (type_ == "table" and name == "alembic_version")


def grant_service_role(connection: Connection, schema: str, role: str, *, append_only: Sequence[str] = ()) -> None:
    """Gives the service role row access to the schema's tables (append-only ones: INSERT and SELECT)."""
    if not _ROLE.fullmatch(role) or not all(_ROLE.fullmatch(t) for t in (schema, *append_only)):
        raise SystemExit(f"refusing to grant to {role!r} on {schema!r}: not a plain identifier")
    if connection.execute(text("select current_user")).scalar_one() == role:
        return  # one role for everything (an external database set up that way): nothing to separate
    for statement in (
        f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"',
        f'REVOKE ALL ON ALL TABLES IN SCHEMA "{schema}" FROM "{role}"',
        f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{schema}" TO "{role}"',
        f'GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA "{schema}" TO "{role}"',
        f'REVOKE INSERT, UPDATE, DELETE ON "{schema}".alembic_version FROM "{role}"',
        *(f'REVOKE UPDATE, DELETE ON "{schema}"."{table}" FROM "{role}"' for table in append_only),
    ):
        connection.execute(text(statement))


def run_env(metadata: MetaData, default_url: str, *, service_role: str | None, append_only: Sequence[str] = ()) -> None:
    """`default_url`: the owner's URL (`settings.migration_url`); `service_role`: the role to grant to."""
    config = context.config
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url") or default_url
    role = config.attributes.get("service_role", service_role)
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
            if role:
                grant_service_role(connection, schema, role, append_only=append_only)

    async def run() -> None:
        engine = create_async_engine(url)
        async with engine.begin() as conn:
            await conn.run_sync(do_run)
        await engine.dispose()

    if context.is_offline_mode():
        raise SystemExit("offline migrations are not supported; run against a database")
    asyncio.run(run())


def upgrade(alembic_ini: str, database_url: str, revision: str = "head", *, service_role: str | None = None) -> None:
    """Applies a service's migrations programmatically (tests, `loyalty migrate`) as the owner role of
    `database_url`, granting `service_role` its rows."""
    from alembic import command
    from alembic.config import Config

    cfg = Config(alembic_ini)
    cfg.attributes["database_url"] = database_url
    cfg.attributes["service_role"] = service_role
    command.upgrade(cfg, revision)
