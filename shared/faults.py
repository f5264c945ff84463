"""Which errors are the infrastructure's (an outage: retry the same work later) rather than the input's.

`is_infrastructure_error` is the one classification every loop that retries (the consumer runner, the
outbox relays) uses: database or broker unreachable, a connection the server dropped, a deadlock or
serialization failure, a cancelled query. Such errors are retried with back-off, never blamed on a
message. Anything else is treated as a fault of the work at hand.

A pooled connection that the server dropped or shut down needs nothing more: SQLAlchemy's asyncpg
dialect invalidates a connection whose driver connection is closed (`connection_invalidated`), so the
retry checks out a fresh one, with or without pre-ping (tests/shared/test_faults.py shows both cases).
"""

from __future__ import annotations

from typing import Literal

import asyncpg
from aiokafka.errors import (
    InvalidTimestampError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)
from sqlalchemy import exc as sa_exc

# SQLSTATE classes of outages: 08 connection exception, 40 transaction rollback (deadlock, serialization
# failure), 53 insufficient resources (too many connections, out of memory, disk full), 57P operator
# intervention (admin or crash shutdown, cannot connect now), plus 57014 query_canceled.
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "40", "53", "57P", "57014")

# The driver's connection errors (class 08: ConnectionDoesNotExistError, ConnectionFailureError...).
_DRIVER_CONNECTION_ERRORS = asyncpg.exceptions.PostgresConnectionError
# Broker errors that are one record's own (it is too large, its timestamp is refused), not the broker's,
# with the fixed reason code a relay quarantines such a record under.
RecordRefusal = Literal["too_large", "refused"]
_RECORD_REFUSALS: dict[type[KafkaError], RecordRefusal] = {
    MessageSizeTooLargeError: "too_large",
    RecordListTooLargeError: "too_large",
    RecordTooLargeError: "too_large",
    InvalidTimestampError: "refused",
}


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE an error carries: asyncpg's own, or that of the driver error SQLAlchemy wraps."""
    for candidate in _chain(exc):
        code = getattr(candidate, "sqlstate", None)
        if isinstance(code, str) and code:
            return code
    return None


def record_refusal(exc: BaseException) -> RecordRefusal | None:
    """The reason code when the broker refused one record for what it is (never worth retrying); None for
    anything else."""
    return next((reason for kind, reason in _RECORD_REFUSALS.items() if isinstance(exc, kind)), None)


def is_infrastructure_error(exc: BaseException) -> bool:
    """An outage of the database or broker: retrying the same work later can succeed."""
    for candidate in _chain(exc):
        if _is_outage(candidate):
            return True
    return False


def _is_outage(exc: BaseException) -> bool:
    if isinstance(exc, KafkaError):
        return record_refusal(exc) is None
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
