"""Which errors are the infrastructure's (an outage: retry the same work later) rather than the input's.

`is_infrastructure_error` is the one classification every loop that retries (the consumer runner, the
outbox relays) uses: database or broker unreachable, a connection the server dropped, a deadlock or
serialization failure, a cancelled query. Such errors are retried with back-off, never blamed on a
message. Anything else is treated as a fault of the work at hand.

`drop_broken_connections(engine)` makes SQLAlchemy discard (invalidate) a pooled connection that
failed with a connection-level SQLSTATE, so that the retry gets a fresh one even without pre-ping.
"""

from __future__ import annotations

import asyncpg
from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine

# SQLSTATE classes of outages: 08 connection exception, 40 transaction rollback (deadlock, serialization
# failure), 53 insufficient resources (too many connections, out of memory, disk full), 57P operator
# intervention (admin or crash shutdown, cannot connect now), plus 57014 query_canceled.
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "40", "53", "57P", "57014")
# Of those, the ones after which the connection itself is gone.
_CONNECTION_LOST_PREFIXES = ("08", "57P")

# The driver's connection errors (class 08: ConnectionDoesNotExistError, ConnectionFailureError...).
_DRIVER_CONNECTION_ERRORS = asyncpg.exceptions.PostgresConnectionError
# Broker errors that are one message's own (it is too large), not the broker's.
_KAFKA_MESSAGE_ERRORS = (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError)


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE an error carries: asyncpg's own, or that of the driver error SQLAlchemy wraps."""
    for candidate in _chain(exc):
        code = getattr(candidate, "sqlstate", None)
        if isinstance(code, str) and code:
            return code
    return None


def is_infrastructure_error(exc: BaseException) -> bool:
    """An outage of the database or broker: retrying the same work later can succeed."""
    for candidate in _chain(exc):
        if _is_outage(candidate):
            return True
    return False


def _is_outage(exc: BaseException) -> bool:
    if isinstance(exc, KafkaError):
        return not isinstance(exc, _KAFKA_MESSAGE_ERRORS)
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, OSError | TimeoutError | sa_exc.TimeoutError | _DRIVER_CONNECTION_ERRORS):
        return True  # OSError covers ConnectionError (refused, reset) raised while connecting
    if isinstance(exc, asyncpg.exceptions.InterfaceError) and "connection" in str(exc) and "closed" in str(exc):
        return True  # "connection is closed", "the underlying connection is closed"
    code = getattr(exc, "sqlstate", None)
    return isinstance(code, str) and code.startswith(_TRANSIENT_SQLSTATE_PREFIXES)


def _chain(exc: BaseException, depth: int = 6) -> list[BaseException]:
    """The error, what SQLAlchemy wraps (`orig`) and its explicit causes, a few levels deep."""
    out: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(out) < depth and current not in out:
        out.append(current)
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__
    return out


def _mark_lost_connection(context: ExceptionContext) -> None:
    code = sqlstate(context.original_exception)
    if code is not None and code.startswith(_CONNECTION_LOST_PREFIXES):
        context.is_disconnect = True
    elif isinstance(context.original_exception, _DRIVER_CONNECTION_ERRORS | OSError):
        context.is_disconnect = True


def drop_broken_connections(engine: AsyncEngine) -> None:
    """Invalidate a pooled connection (and the pool's older ones) on a connection-level failure."""
    if not event.contains(engine.sync_engine, "handle_error", _mark_lost_connection):
        event.listen(engine.sync_engine, "handle_error", _mark_lost_connection)
