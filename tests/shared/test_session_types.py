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


async def writes(session: AsyncSession) -> None: ...


async def reads(session: AsyncReadSession) -> None: ...


async def endpoint(read: AsyncReadSession, write: AsyncSession) -> None:
    await reads(read)
    await reads(write)
    await writes(write)
    await LedgerRepository.from_session(read).policy("t")
    await LedgerRepository.from_session(write).store_response("t", "k", 201, "{}")
    await writes(read)  # line 18
    await LedgerRepository.from_session(read).store_response("t", "k", 201, "{}")  # line 19
"""


def _errors(snippet: str) -> list[str]:
    stdout, stderr, _ = api.run(["--config-file", str(CONFIG), "--no-error-summary", "-c", snippet])
    assert not stderr, stderr
    return [line for line in stdout.splitlines() if ": error:" in line]


class TestSessionTypes:
    def test_writing_with_a_read_session_is_a_type_error_and_nothing_else_is(self) -> None:
        errors = _errors(SNIPPET)
        assert len(errors) == 2, errors
        assert errors[0].startswith("<string>:18:"), errors
        assert (
            'incompatible type "sqlalchemy.ext.asyncio.session.AsyncSession"; expected "shared.db.AsyncSession"'
            in (errors[0])
        )
        assert errors[1].startswith("<string>:19:"), errors
        assert 'Invalid self argument "LedgerRepository[AsyncSession]"' in errors[1], errors
