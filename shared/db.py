"""Async SQLAlchemy engine and session helpers. The boundary (a request or a consumed batch) owns the
transaction: it commits on success and rolls back on error; services only flush.

Two session types, for the type checker only (both are SQLAlchemy's `AsyncSession` at run time): a
function that only reads takes `AsyncReadSession`; one that writes takes `AsyncSession`, a kind of read
session, so it refuses the read session a read endpoint gets (`ReadSessionDep`) and accepts what
`transaction()` and the sessionmaker give."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Annotated, Any, NewType, TypeAlias, TypeVar, cast

from fastapi import Depends
from pydantic_core import from_json
from sqlalchemy import MetaData, text
from sqlalchemy.ext import asyncio as sa_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from starlette.requests import Request

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

AsyncReadSession: TypeAlias = sa_asyncio.AsyncSession
AsyncSession = NewType("AsyncSession", AsyncReadSession)
# A repository's session: its reads take any, its writes the write session (`self: Repo[AsyncSession]`).
SessionT = TypeVar("SessionT", bound=AsyncReadSession)


def make_metadata(schema: str) -> MetaData:
    return MetaData(schema=schema, naming_convention=NAMING_CONVENTION)


def create_engine(
    dsn: str,
    *,
    pool_size: int = 10,
    application_name: str = "loyalty",
    pre_ping: bool = True,
    plan_cache_mode: str = "auto",
) -> AsyncEngine:
    """`pre_ping` tests every connection on checkout (one extra round trip per request or batch); without
    it a connection the server dropped fails its first statement instead, which surfaces as a 500
    problem on a request and as a retried batch on a consumer."""
    return create_async_engine(
        dsn,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=pre_ping,
        # json/jsonb columns decoded by pydantic's parser: the same values as json.loads, at about half the
        # cost (consumers read thousands of JSON documents per batch).
        json_deserializer=from_json,
        connect_args={
            "server_settings": {
                "application_name": application_name,
                "timezone": "UTC",
                "plan_cache_mode": plan_cache_mode,
            }
        },
    )


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    # Its sessions may write; a read endpoint's is narrowed to `AsyncReadSession` by its dependency.
    return cast("async_sessionmaker[AsyncSession]", async_sessionmaker(engine, expire_on_commit=False, autoflush=False))


@asynccontextmanager
async def transaction(sessionmaker: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """One unit of work: commits when the block succeeds, rolls back when it raises."""
    async with sessionmaker() as session, session.begin():
        yield session


async def driver_connection(session: AsyncReadSession, *, begin: bool = True) -> Any:
    """The asyncpg connection under the session's transaction, for batch statements sent straight to the
    driver (array parameters, COPY). With `begin`, the transaction is open before they run."""
    # The session's connection is fixed for the life of its transaction: look it up once per transaction
    # rather than once per statement (`session.connection()` costs a greenlet switch and session work).
    transaction = session.sync_session.get_transaction()
    cached = session.info.get(_DRIVER_KEY)
    if transaction is not None and cached is not None and cached[0]() is transaction and transaction.is_active:
        adapter, driver = cached[1], cached[2]
    else:
        connection = await session.connection()
        raw = await connection.get_raw_connection()
        adapter, driver = raw.dbapi_connection, raw.driver_connection
        # A weak reference: a strong one from the session's info to its transaction would be a reference
        # cycle, leaving every request's session (~40 objects) to the cyclic collector, whose passes over
        # thousands of them stalled a server for 20-80 ms at a time.
        session.info[_DRIVER_KEY] = (weakref.ref(session.sync_session.get_transaction()), adapter, driver)
    # SQLAlchemy's asyncpg adapter sends BEGIN lazily, before its own first statement; a statement
    # sent straight to the driver must not run ahead of it in autocommit (its writes would not be part of
    # the transaction, its row locks gone at once).
    if begin and getattr(adapter, "_transaction", False) is None:
        await adapter._start_transaction()
    return driver


_DRIVER_KEY = "shared.db.driver"


async def warm_pool(engine: AsyncEngine, connections: int, *, timeout_s: float = 5.0) -> int:
    """Opens up to `connections` pooled connections at once and returns them to the pool; returns how many
    opened. A pool filled lazily makes the first burst of requests pay for the connects (a backend fork
    and the driver's set-up each), which shows as a latency spike long after start-up. A database that
    is down or unreachable is not fatal here and holds start-up for `timeout_s` at most: readiness
    reports it, and the pool connects once it is back."""

    async def connect(stack: AsyncExitStack) -> bool:
        try:
            await stack.enter_async_context(engine.connect())
        except Exception:  # down, refused, or still starting: readiness says so
            return False
        return True

    async with AsyncExitStack() as stack:
        attempts = [asyncio.ensure_future(connect(stack)) for _ in range(connections)]
        done, pending = await asyncio.wait(attempts, timeout=timeout_s)
        for attempt in pending:
            attempt.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return sum(attempt.result() for attempt in done)


async def ping(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("select 1"))


async def _request_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with transaction(request.state.sessionmaker) as session:
        yield session


async def _read_session(request: Request) -> AsyncIterator[AsyncReadSession]:
    async with request.state.sessionmaker() as session:
        yield session


# scope="function": the commit happens before the response is sent, so a 2xx means the write is durable.
SessionDep = Annotated[AsyncSession, Depends(_request_session, scope="function")]
ReadSessionDep = Annotated[AsyncReadSession, Depends(_read_session, scope="function")]
