"""Each service's alembic history matches its models, so no schema change ships without a migration."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData
from sqlalchemy.engine import Connection

from shared.db import create_engine
from shared.migrations import include_name
from tests.conftest import database_url

pytestmark = pytest.mark.db


@pytest.mark.parametrize("service", ["ledger", "rules", "metrics"])
async def test_models_match_migrations(service: str) -> None:
    metadata: MetaData = __import__(f"{service}.models", fromlist=["Base"]).Base.metadata
    engine = create_engine(database_url(service), pool_size=1)

    def diff(conn: Connection) -> list[object]:
        schema = metadata.schema or ""
        context = MigrationContext.configure(
            conn,
            opts={
                "target_metadata": metadata,
                "include_schemas": True,
                "compare_type": True,
                "include_name": lambda name, type_, parent: include_name(schema, name, type_),
            },
        )
        return list(compare_metadata(context, metadata))

    try:
        async with engine.connect() as conn:
            differences = await conn.run_sync(diff)
    finally:
        await engine.dispose()
    assert differences == [], f"{service}: models and migrations differ: {differences}"
