"""The one repository base every service's repositories derive from (all SQL lives in repositories).

A repository wraps one session and is generic over its type (`shared.db.SessionT`): reads run on any
session, and a method that writes or locks declares `self: XRepository[AsyncSession]`, so the type checker
refuses it on the read session a read endpoint gets. Build one with `XRepository.from_session(session)`;
it is a thin view, cheap enough to make per call. Statements that SQLAlchemy would slow down (batches with
array parameters, COPY) go straight to the asyncpg connection under the session's transaction (`driver`)."""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Sequence
from typing import Any, Generic, Self, TypeVar

from sqlalchemy import Select

from shared.db import AsyncSession, SessionT, driver_connection

M = TypeVar("M")


class RepositoryBase(Generic[SessionT]):
    def __init__(self, session: SessionT) -> None:
        self.session = session

    @classmethod
    def from_session(cls, session: SessionT) -> Self:
        return cls(session)

    def driver(self, *, begin: bool = True) -> Awaitable[Any]:
        """The asyncpg connection under the session's transaction (`shared.db.driver_connection`); with
        `begin`, the transaction is open before a statement sent to it runs."""
        # Hands back driver_connection's own awaitable: no extra coroutine per statement.
        return driver_connection(self.session, begin=begin)

    async def get_all(self, statement: Select[M]) -> Sequence[M]:
        return (await self.session.execute(statement)).scalars().all()

    async def copy(
        self: RepositoryBase[AsyncSession],
        table: str,
        columns: Sequence[str],
        records: Iterable[Sequence[Any]],
        *,
        schema: str,
    ) -> None:
        """Appends rows with COPY, on the session's own connection (so in its transaction): several times
        faster than executemany, and half PostgreSQL's cost of INSERT ... SELECT FROM unnest(arrays). COPY
        has no ON CONFLICT: the caller writes only rows it knows are new (a duplicate fails the statement)."""
        driver = await self.driver()
        await driver.copy_records_to_table(table, schema_name=schema, columns=list(columns), records=records)
