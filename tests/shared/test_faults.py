"""Which errors are outages (retried, never blamed on a message) and which are the input's; and a real
database fault: a connection the server terminated is classed as an outage and leaves the pool."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError, NodeNotReadyError, RequestTimedOutError
from sqlalchemy import text
from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_dbapi
from sqlalchemy.exc import DBAPIError, IntegrityError

from shared.consumer import RetryLater, is_transient
from shared.db import create_engine
from shared.faults import is_infrastructure_error, sqlstate
from tests.conftest import database_url

E = asyncpg.exceptions


def wrapped(error: Exception, cls: type[DBAPIError] = DBAPIError) -> DBAPIError:
    """The driver error as SQLAlchemy's asyncpg dialect raises it (its adapter error, caused by the driver's)."""
    adapted = AsyncAdapt_asyncpg_dbapi.Error(str(error), error)  # type: ignore[no-untyped-call]
    adapted.__cause__ = error
    return cls("select 1", None, adapted)


OUTAGES = [
    E.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    E.ConnectionFailureError("connection failure"),
    E._base.InterfaceError("connection is closed"),
    E.CannotConnectNowError("the database system is starting up"),
    E.AdminShutdownError("terminating connection due to administrator command"),
    E.CrashShutdownError("terminating connection because of crash of another server process"),
    E.QueryCanceledError("canceling statement due to statement timeout"),
    E.DeadlockDetectedError("deadlock detected"),
    E.SerializationError("could not serialize access due to concurrent update"),
    E.TooManyConnectionsError("sorry, too many clients already"),
    ConnectionRefusedError(111, "Connection refused"),
    ConnectionResetError(104, "Connection reset by peer"),
    TimeoutError(),
    KafkaConnectionError("no broker"),
    NodeNotReadyError("node not ready"),
    RequestTimedOutError(),
]
INPUT_FAULTS = [
    E.UniqueViolationError("duplicate key value violates unique constraint"),
    E.NumericValueOutOfRangeError("numeric field overflow"),
    E.InvalidTextRepresentationError("invalid input syntax for type integer"),
    E._base.InterfaceError("the server expects 70000 arguments for this query, 2 were passed"),
    ValueError("cannot handle this one"),
    KeyError("customer"),
    MessageSizeTooLargeError(),
]


class TestClassification:
    @pytest.mark.parametrize("error", OUTAGES, ids=lambda e: type(e).__name__)
    def test_outages_raw_or_wrapped_by_sqlalchemy(self, error: Exception) -> None:
        assert is_infrastructure_error(error)
        assert is_transient(error)
        if isinstance(error, E.PostgresError | E._base.InterfaceError):
            assert is_infrastructure_error(wrapped(error))

    @pytest.mark.parametrize("error", INPUT_FAULTS, ids=lambda e: type(e).__name__)
    def test_faults_of_the_input_raw_or_wrapped(self, error: Exception) -> None:
        assert not is_infrastructure_error(error)
        assert not is_transient(error)
        if isinstance(error, E.PostgresError):
            assert not is_infrastructure_error(wrapped(error, IntegrityError))

    def test_the_sqlstate_is_read_through_the_wrapping(self) -> None:
        assert sqlstate(wrapped(E.AdminShutdownError("x"))) == "57P01"
        assert sqlstate(ValueError("x")) is None

    def test_an_outage_behind_a_service_error_is_an_outage(self) -> None:
        error = RuntimeError("posting failed")
        error.__cause__ = wrapped(E.SerializationError("could not serialize access"))
        assert is_infrastructure_error(error)

    def test_a_passing_conflict_is_retried_but_is_no_outage(self) -> None:
        assert is_transient(RetryLater("order recorded concurrently"))
        assert not is_infrastructure_error(RetryLater("order recorded concurrently"))


@pytest.mark.db
class TestRealDatabaseFaults:
    async def test_a_cancelled_statement_is_an_outage(self) -> None:
        engine = create_engine(database_url("rules"), pool_size=1)
        try:
            async with engine.connect() as conn:
                await conn.execute(text("set statement_timeout = 10"))
                with pytest.raises(DBAPIError) as raised:
                    await conn.execute(text("select pg_sleep(2)"))
            assert sqlstate(raised.value) == "57014"
            assert is_infrastructure_error(raised.value)
        finally:
            await engine.dispose()

    @pytest.mark.parametrize("when", ["idle", "mid-statement"])
    async def test_a_terminated_connection_is_an_outage_and_the_retry_gets_a_fresh_one(self, when: str) -> None:
        # Without pre-ping, so that the terminated connection itself meets the next statement.
        engine = create_engine(database_url("rules"), pool_size=1, pre_ping=False)
        admin = create_engine(database_url("rules"), pool_size=1)

        async def terminate(pid: int, delay_s: float) -> None:
            await asyncio.sleep(delay_s)
            async with admin.connect() as conn:
                # Our own pooled connection only (same role): the server shuts it down (57P01).
                await conn.execute(text("select pg_terminate_backend(:pid, 5000)"), {"pid": pid})

        try:
            async with engine.connect() as conn:
                victim = (await conn.execute(text("select pg_backend_pid()"))).scalar_one()
            if when == "idle":
                await terminate(victim, 0)
                statement = "select 1"
            else:
                killing = asyncio.create_task(terminate(victim, 0.3))
                statement = "select pg_sleep(5)"
            with pytest.raises(DBAPIError) as raised:
                async with engine.connect() as conn:
                    await conn.execute(text(statement))
            if when == "mid-statement":
                await killing
            assert is_infrastructure_error(raised.value)
            assert raised.value.connection_invalidated, "the broken connection leaves the pool"
            async with engine.connect() as conn:
                assert (await conn.execute(text("select pg_backend_pid()"))).scalar_one() != victim
        finally:
            await engine.dispose()
            await admin.dispose()
