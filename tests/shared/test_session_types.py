"""shared.db's session types, checked by mypy itself: a function that writes refuses the read session a read
endpoint gets, a function that reads accepts both, and a repository's writing methods need the write
session. Pure: mypy runs on a snippet, no database."""

from __future__ import annotations

from pathlib import Path

from mypy import api

CONFIG = Path(__file__).resolve().parents[2] / "pyproject.toml"

SNIPPET = """
from shared.db import AsyncReadSession, AsyncSession
from ledger.repository import LedgerRepository
from metrics.repository import AggregatesRepository, KpiRepository
from rules.repository import OutboxRepository


async def writes(session: AsyncSession) -> None: ...


async def reads(session: AsyncReadSession) -> None: ...


async def endpoint(read: AsyncReadSession, write: AsyncSession) -> None:
    await reads(read)
    await reads(write)
    await writes(write)
    await LedgerRepository.from_session(read).policy("t")
    await LedgerRepository.from_session(write).store_response("t", "k", 201, "{}")
    await writes(read)  # line 20
    await LedgerRepository.from_session(read).store_response("t", "k", 201, "{}")  # line 21
"""

# Every service's repositories derive from shared.repository.RepositoryBase: `from_session` gives the
# subclass, reads take either session, and writes (the service's own and the base's COPY) the write session.
BASE_SNIPPET = """
from datetime import date
from decimal import Decimal
from sqlalchemy import select
from shared.db import AsyncReadSession, AsyncSession
from ledger.models import Balance
from ledger.repository import LedgerRepository
from metrics.repository import AggregatesRepository, KpiRepository
from rules.repository import OutboxRepository


async def endpoint(read: AsyncReadSession, write: AsyncSession) -> None:
    ledger: LedgerRepository[AsyncReadSession] = LedgerRepository.from_session(read)
    outbox: OutboxRepository[AsyncSession] = OutboxRepository.from_session(write)
    balances: list[Balance] = list(await ledger.get_all(select(Balance)))
    await KpiRepository.from_session(read).days("t", date(2026, 1, 1), date(2026, 1, 2))
    await outbox.add([])
    await outbox.copy("outbox", ["id"], [], schema="rules")
    await OutboxRepository.from_session(read).oldest()
    await OutboxRepository.from_session(read).add([])  # line 20
    await AggregatesRepository.from_session(read).add_cells({})  # line 21
    await ledger.copy("entries", ["entry_id"], [], schema="ledger")  # line 22
"""


def _errors(snippet: str) -> list[str]:
    stdout, stderr, _ = api.run(["--config-file", str(CONFIG), "--no-error-summary", "-c", snippet])
    assert not stderr, stderr
    return [line for line in stdout.splitlines() if ": error:" in line]


class TestSessionTypes:
    def test_writing_with_a_read_session_is_a_type_error_and_nothing_else_is(self) -> None:
        errors = _errors(SNIPPET)
        assert len(errors) == 2, errors
        assert errors[0].startswith("<string>:20:"), errors
        assert (
            'incompatible type "sqlalchemy.ext.asyncio.session.AsyncSession"; expected "shared.db.AsyncSession"'
            in (errors[0])
        )
        assert errors[1].startswith("<string>:21:"), errors
        assert 'Invalid self argument "LedgerRepository[AsyncSession]"' in errors[1], errors

    def test_every_service_repository_takes_the_base_session_rules(self) -> None:
        errors = _errors(BASE_SNIPPET)
        assert [e.split(":")[1] for e in errors] == ["20", "21", "22"], errors
        assert 'Invalid self argument "OutboxRepository[AsyncSession]"' in errors[0], errors
        assert 'Invalid self argument "AggregatesRepository[AsyncSession]"' in errors[1], errors
        assert 'Invalid self argument "LedgerRepository[AsyncSession]" to attribute function "copy"' in errors[2], (
            errors
        )
