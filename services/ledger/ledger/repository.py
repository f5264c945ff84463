"""All of the ledger's SQL. The hot paths (a consumed batch, a redeem) use set-based statements:
one locking SELECT for every account of the batch, executemany inserts and updates."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, fields
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, delete, func, or_, select, true, tuple_, union
from sqlalchemy.dialects.postgresql import insert

from ledger.domain import AccountState, HoldState, LotState, LotTotals, Policy, is_system
from ledger.models import Balance, Command, Entry, Hold, IdempotencyKey, Lot, Outbox, TenantPolicy, outbox_quarantine
from shared.db import AsyncSession, SessionT
from shared.outbox import Unpublishable, insert_quarantined
from shared.repository import RepositoryBase

_ACCOUNT_FIELDS = [f.name for f in fields(AccountState)]
_LOT_FIELDS = [f.name for f in fields(LotState) if f.name != "is_new"]
_HOLD_FIELDS = [f.name for f in fields(HoldState)]
_ENTRY_COLUMNS = [c.name for c in Entry.__table__.columns]


def _account(row: Any) -> AccountState:
    return AccountState(**{name: row[name] for name in _ACCOUNT_FIELDS})


class _Sql:
    """A fixed statement run on the session's own asyncpg connection (so inside its transaction),
    skipping SQLAlchemy's per-statement work: that was a good part of a redeem's CPU time."""

    def __init__(self, sql: str) -> None:
        self.names: list[str] = []

        def positional(match: re.Match[str]) -> str:
            if match[1] not in self.names:
                self.names.append(match[1])
            return f"${self.names.index(match[1]) + 1}"

        self.sql = re.sub(r"(?<!:):([a-z_]+)", positional, sql)

    async def fetch(self, repo: RepositoryBase[Any], params: dict[str, Any], *, begin: bool = True) -> list[Any]:
        driver = await repo.driver(begin=begin)
        rows: list[Any] = await driver.fetch(self.sql, *(params[name] for name in self.names))
        return rows


# The hot statements take whole columns as arrays (unnest): one fixed statement text, prepared once,
# whatever the batch size, instead of a freshly compiled multi-row VALUES list per batch.
_CREATE_ACCOUNTS = _Sql(
    """
    INSERT INTO ledger.balances (tenant_id, account_id, kind)
    SELECT :tenant, u.account_id, u.kind
    FROM unnest(CAST(:ids AS text[]), CAST(:kinds AS text[])) AS u(account_id, kind)
    ORDER BY u.account_id
    ON CONFLICT DO NOTHING
    """
)
_LOCK_ACCOUNTS = _Sql(
    f"""
    SELECT {", ".join(_ACCOUNT_FIELDS)} FROM ledger.balances
    WHERE tenant_id = :tenant AND account_id = ANY(CAST(:ids AS text[]))
    ORDER BY account_id
    FOR UPDATE
    """
)
_UPDATE_BALANCES = """
    UPDATE ledger.balances AS b
    SET available = u.available, pending = u.pending, held = u.held, lifetime_earned = u.lifetime_earned,
        redeemed = u.redeemed, expired = u.expired, last_seq = u.last_seq, last_hash = u.last_hash,
        updated_at = :now
    FROM unnest(
        CAST(:a_account_id AS text[]), CAST(:a_available AS bigint[]), CAST(:a_pending AS bigint[]),
        CAST(:a_held AS bigint[]), CAST(:a_lifetime_earned AS bigint[]), CAST(:a_redeemed AS bigint[]),
        CAST(:a_expired AS bigint[]), CAST(:a_last_seq AS int[]), CAST(:a_last_hash AS text[])
    ) AS u(account_id, available, pending, held, lifetime_earned, redeemed, expired, last_seq, last_hash)
    WHERE b.tenant_id = :tenant AND b.account_id = u.account_id
"""
_SAVE_ACCOUNTS = _Sql(_UPDATE_BALANCES)
_CLAIM_COMMANDS = _Sql(
    """
    INSERT INTO ledger.commands (tenant_id, command_id, kind)
    SELECT * FROM unnest(CAST(:tenants AS text[]), CAST(:ids AS text[]), CAST(:kinds AS text[]))
    ON CONFLICT DO NOTHING
    RETURNING tenant_id, command_id
    """
)
_ENTRY_TYPES = {
    "entry_id": "uuid",
    "transaction_id": "uuid",
    "hold_id": "uuid",
    "seq": "int",
    "ruleset_version": "int",
    "points": "bigint",
    "balance_after": "bigint",
    "created_at": "timestamptz",
}
_COPY_THRESHOLD = 64
_HOLD_TYPES = {
    "hold_id": "uuid",
    "points": "bigint",
    "captured": "bigint",
    "allocations": "text",
    "expires_at": "timestamptz",
    "created_at": "timestamptz",
    "closed_at": "timestamptz",
}
# New holds are inserted, changed ones (capture, void, expiry) get their status; one statement for any number.
_UPSERT_HOLDS = f"""
    INSERT INTO ledger.holds (tenant_id, {", ".join(_HOLD_FIELDS)})
    SELECT :tenant, {", ".join("u.allocations::jsonb" if c == "allocations" else f"u.{c}" for c in _HOLD_FIELDS)}
    FROM unnest({", ".join(f"CAST(:h_{c} AS {_HOLD_TYPES.get(c, 'text')}[])" for c in _HOLD_FIELDS)})
        AS u({", ".join(_HOLD_FIELDS)})
    ON CONFLICT (tenant_id, hold_id) DO UPDATE
    SET status = EXCLUDED.status, captured = EXCLUDED.captured, closed_at = EXCLUDED.closed_at
"""
_SAVE_HOLDS = _Sql(_UPSERT_HOLDS)
_INSERT_ENTRIES = _Sql(
    f"""
    WITH holds AS ({_UPSERT_HOLDS}
    ), entry AS (
        INSERT INTO ledger.entries ({", ".join(_ENTRY_COLUMNS)})
        SELECT {", ".join("u.breakdown::jsonb" if c == "breakdown" else f"u.{c}" for c in _ENTRY_COLUMNS)}
        FROM unnest({", ".join(f"CAST(:{c} AS {_ENTRY_TYPES.get(c, 'text')}[])" for c in _ENTRY_COLUMNS)})
            AS u({", ".join(_ENTRY_COLUMNS)})
    ), outbox AS (
        INSERT INTO ledger.outbox (entry_id) SELECT unnest(CAST(:entry_id AS uuid[]))
    ), lots AS (
        UPDATE ledger.lots AS l SET remaining = u.remaining, pending = u.pending, clawed_back = u.clawed_back
        FROM unnest(
            CAST(:lot_ids AS text[]), CAST(:lot_remaining AS bigint[]), CAST(:lot_pending AS boolean[]),
            CAST(:lot_clawed_back AS bigint[])
        ) AS u(lot_id, remaining, pending, clawed_back)
        WHERE l.tenant_id = :tenant AND l.lot_id = u.lot_id
    ), response AS (
        UPDATE ledger.idempotency_keys SET status_code = :status, response = CAST(:response AS text)::jsonb
        WHERE tenant_id = :tenant AND api_key_id = :api_key_id AND key = :idempotency_key
    )
    """
    + _UPDATE_BALANCES
)
_LOTS = _Sql(
    """
    SELECT lot_id, account_id, points, remaining, pending, matures_at, expires_at, created_at, clawed_back
    FROM ledger.lots
    WHERE tenant_id = :tenant
      AND ((account_id = ANY(CAST(:accounts AS text[])) AND remaining > 0) OR lot_id = ANY(CAST(:ids AS text[])))
    """
)
_CLAIM_KEY = _Sql(
    """
    INSERT INTO ledger.idempotency_keys (tenant_id, api_key_id, key, request_hash)
    VALUES (:tenant, :api_key_id, :key, :hash)
    ON CONFLICT DO NOTHING RETURNING key
    """
)
_STORE_RESPONSE = _Sql(
    """
    UPDATE ledger.idempotency_keys SET status_code = :status, response = CAST(:response AS text)::jsonb
    WHERE tenant_id = :tenant AND api_key_id = :api_key_id AND key = :key
    """
)
_BALANCE = _Sql("SELECT * FROM ledger.balances WHERE tenant_id = :tenant AND account_id = :account")
_OUTBOX_BATCH = _Sql(
    f"""
    WITH claimed AS (
        SELECT id, entry_id FROM ledger.outbox ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED
    )
    SELECT claimed.id AS outbox_id, claimed.entry_id AS outbox_entry_id, {", ".join(f"e.{c}" for c in _ENTRY_COLUMNS)}
    FROM claimed LEFT JOIN ledger.entries AS e ON e.entry_id = claimed.entry_id
    ORDER BY claimed.id
    """
)
_DELETE_OUTBOX = _Sql("DELETE FROM ledger.outbox WHERE id = ANY(CAST(:ids AS bigint[]))")
_OLDEST_OUTBOX = _Sql("SELECT created_at FROM ledger.outbox ORDER BY id LIMIT 1")
_SAVE_LOTS = _Sql(
    """
    UPDATE ledger.lots AS l SET remaining = u.remaining, pending = u.pending, clawed_back = u.clawed_back
    FROM unnest(
        CAST(:ids AS text[]), CAST(:remaining AS bigint[]), CAST(:pending AS boolean[]), CAST(:clawed_back AS bigint[])
    ) AS u(lot_id, remaining, pending, clawed_back)
    WHERE l.tenant_id = :tenant AND l.lot_id = u.lot_id
    """
)


def _hold_columns(holds: Sequence[HoldState]) -> dict[str, list[Any]]:
    """The holds as the `h_`-prefixed column arrays `_UPSERT_HOLDS` takes."""
    columns: dict[str, list[Any]] = {f"h_{name}": [] for name in _HOLD_FIELDS}
    for hold in holds:
        for name in _HOLD_FIELDS:
            value = getattr(hold, name)
            columns[f"h_{name}"].append(json.dumps(value) if name == "allocations" else value)
    return columns


class LedgerRepository(RepositoryBase[SessionT]):
    # --- accounts and balances --------------------------------------------------------------------

    async def create_accounts(self: LedgerRepository[AsyncSession], tenant_id: str, account_ids: Iterable[str]) -> None:
        ids = sorted(set(account_ids))
        if ids:
            kinds = ["system" if is_system(a) else "customer" for a in ids]
            await _CREATE_ACCOUNTS.fetch(self, {"tenant": tenant_id, "ids": ids, "kinds": kinds})

    async def lock_accounts(
        self: LedgerRepository[AsyncSession], tenant_id: str, account_ids: Iterable[str]
    ) -> dict[str, AccountState]:
        # Rows are locked in account id order: two transactions over overlapping accounts cannot deadlock.
        rows = await _LOCK_ACCOUNTS.fetch(self, {"tenant": tenant_id, "ids": sorted(set(account_ids))})
        return {row["account_id"]: _account(row) for row in rows}

    async def balance_row(self, tenant_id: str, account_id: str) -> dict[str, Any] | None:
        # One row, one statement: no transaction needed (saves BEGIN and ROLLBACK on the hottest read).
        rows = await _BALANCE.fetch(self, {"tenant": tenant_id, "account": account_id}, begin=False)
        return dict(rows[0]) if rows else None

    async def get_balance(self, tenant_id: str, account_id: str) -> Balance | None:
        return await self.session.get(Balance, (tenant_id, account_id))

    async def list_accounts(
        self, tenant_id: str, *, kind: str | None, after: str | None, limit: int
    ) -> Sequence[Balance]:
        stmt = select(Balance).where(Balance.tenant_id == tenant_id).order_by(Balance.account_id).limit(limit)
        if kind is not None:
            stmt = stmt.where(Balance.kind == kind)
        if after is not None:
            stmt = stmt.where(Balance.account_id > after)
        return await self.get_all(stmt)

    async def balance_as_of(self, tenant_id: str, account_ids: Sequence[str], as_of: datetime) -> list[Any]:
        stmt = (
            select(Entry.bucket, Entry.kind, func.sum(Entry.points).label("points"))
            .where(Entry.tenant_id == tenant_id, Entry.account_id.in_(account_ids), Entry.created_at <= as_of)
            .group_by(Entry.bucket, Entry.kind)
        )
        return list((await self.session.execute(stmt)).all())

    async def balance_rows(self, tenant_id: str, account_ids: Sequence[str]) -> Sequence[Balance]:
        stmt = select(Balance).where(Balance.tenant_id == tenant_id, Balance.account_id.in_(account_ids))
        return await self.get_all(stmt)

    async def liability(self, tenant_id: str) -> Any:
        stmt = select(
            func.coalesce(func.sum(Balance.available), 0).label("available"),
            func.coalesce(func.sum(Balance.pending), 0).label("pending"),
            func.coalesce(func.sum(Balance.held), 0).label("held"),
            func.count().label("accounts"),
        ).where(Balance.tenant_id == tenant_id, Balance.kind == "customer")
        return (await self.session.execute(stmt)).one()

    # --- entries and the outbox -------------------------------------------------------------------

    async def post(
        self: LedgerRepository[AsyncSession],
        tenant_id: str,
        entries: Sequence[dict[str, Any]],
        accounts: Iterable[AccountState],
        now: datetime,
        *,
        lots: Sequence[LotState] = (),
        holds: Sequence[HoldState] = (),
        response: tuple[str, str, int, str] | None = None,
    ) -> bool:
        """Writes the entries, their outbox rows and the accounts' new balances, plus the `lots` changed
        (`save_lots(..., defer_changed=True)` left them), the `holds` new or changed, and the idempotency
        key's `response` (API key id, key, status, body). Returns whether the response was stored (it is,
        with a handful of entries)."""
        balances: dict[str, Any] = {"tenant": tenant_id, "now": now, **{f"a_{n}": [] for n in _ACCOUNT_FIELDS}}
        for account in accounts:
            for name in _ACCOUNT_FIELDS:
                balances[f"a_{name}"].append(getattr(account, name))
        # The driver's jsonb codec takes text (SQLAlchemy serialises JSON itself on its normal path).
        records = [
            tuple(json.dumps(e[c]) if c == "breakdown" and e[c] is not None else e[c] for c in _ENTRY_COLUMNS)
            for e in entries
        ]
        held = _hold_columns(holds)
        if not entries or len(entries) > _COPY_THRESHOLD:
            await self._save_changed_lots(tenant_id, lots)
            if holds:
                await _SAVE_HOLDS.fetch(self, {"tenant": tenant_id, **held})
            if entries:
                await self.copy("entries", _ENTRY_COLUMNS, records, schema="ledger")
                await self.copy("outbox", ["entry_id"], [(e["entry_id"],) for e in entries], schema="ledger")
                await _SAVE_ACCOUNTS.fetch(self, balances)
            return False
        # A handful of entries (a REST write): one statement for everything (the lots it changed and the
        # stored response included), because the tenant's system accounts stay locked until the commit;
        # COPY only pays off for big batches.
        columns = {name: [record[i] for record in records] for i, name in enumerate(_ENTRY_COLUMNS)}
        api_key_id, key, status, body = response if response is not None else (None, None, None, None)
        extra = {
            "lot_ids": [lot.lot_id for lot in lots],
            "lot_remaining": [lot.remaining for lot in lots],
            "lot_pending": [lot.pending for lot in lots],
            "lot_clawed_back": [lot.clawed_back for lot in lots],
            "api_key_id": api_key_id,
            "idempotency_key": key,
            "status": status,
            "response": body,
        }
        await _INSERT_ENTRIES.fetch(self, {**columns, **balances, **held, **extra})
        return response is not None

    def _entries(self, tenant_id: str, account_id: str) -> Select[Entry]:
        return select(Entry).where(Entry.tenant_id == tenant_id, Entry.account_id == account_id)

    async def history(
        self,
        tenant_id: str,
        account_id: str,
        *,
        kinds: Sequence[str] | None,
        since: datetime | None,
        until: datetime | None,
        before_seq: int | None,
        limit: int,
    ) -> Sequence[Entry]:
        stmt = self._entries(tenant_id, account_id).order_by(Entry.seq.desc()).limit(limit)
        if kinds:
            stmt = stmt.where(Entry.kind.in_(kinds))
        if since is not None:
            stmt = stmt.where(Entry.created_at >= since)
        if until is not None:
            stmt = stmt.where(Entry.created_at < until)
        if before_seq is not None:
            stmt = stmt.where(Entry.seq < before_seq)
        return await self.get_all(stmt)

    async def all_entries(self, tenant_id: str, account_id: str) -> list[dict[str, Any]]:
        stmt = select(Entry.__table__).where(Entry.tenant_id == tenant_id, Entry.account_id == account_id)
        rows = await self.session.execute(stmt.order_by(Entry.seq))
        return [dict(row._mapping) for row in rows]

    async def entries_of_kind(
        self, tenant_id: str, kind: str, *, account_id: str | None, before: datetime | None, limit: int
    ) -> Sequence[Entry]:
        stmt = (
            select(Entry)
            .where(Entry.tenant_id == tenant_id, Entry.kind == kind, ~Entry.account_id.startswith("system:"))
            .order_by(Entry.created_at.desc())
            .limit(limit)
        )
        if account_id is not None:
            stmt = stmt.where(Entry.account_id == account_id)
        if before is not None:
            stmt = stmt.where(Entry.created_at < before)
        return await self.get_all(stmt)

    # --- verification ---------------------------------------------------------------------------

    async def unbalanced_transactions(self, tenant_id: str, account_id: str | None) -> list[tuple[uuid.UUID, int]]:
        """The transactions (of the tenant, or those touching one account) whose postings do not sum to 0."""
        stmt = select(Entry.transaction_id, func.sum(Entry.points)).where(Entry.tenant_id == tenant_id)
        if account_id is not None:
            touching = select(Entry.transaction_id).where(Entry.tenant_id == tenant_id, Entry.account_id == account_id)
            stmt = stmt.where(Entry.transaction_id.in_(touching))
        stmt = stmt.group_by(Entry.transaction_id).having(func.sum(Entry.points) != 0)
        return [(row[0], int(row[1])) for row in await self.session.execute(stmt)]

    async def lot_totals(self, tenant_id: str, account_id: str | None) -> dict[str, LotTotals]:
        invalid = or_(Lot.remaining < 0, Lot.remaining > Lot.points, Lot.clawed_back < 0, Lot.clawed_back > Lot.points)
        stmt = select(
            Lot.account_id,
            func.coalesce(func.sum(Lot.remaining).filter(~Lot.pending), 0),
            func.coalesce(func.sum(Lot.remaining).filter(Lot.pending), 0),
            func.array_remove(func.array_agg(Lot.lot_id).filter(invalid), None),
        ).where(Lot.tenant_id == tenant_id)
        if account_id is not None:
            stmt = stmt.where(Lot.account_id == account_id)
        rows = await self.session.execute(stmt.group_by(Lot.account_id))
        return {row[0]: LotTotals(int(row[1]), int(row[2]), tuple(sorted(row[3] or ()))) for row in rows}

    async def active_held(self, tenant_id: str, account_id: str | None) -> dict[str, int]:
        stmt = select(Hold.account_id, func.sum(Hold.points)).where(
            Hold.tenant_id == tenant_id, Hold.status == "active"
        )
        if account_id is not None:
            stmt = stmt.where(Hold.account_id == account_id)
        return {row[0]: int(row[1]) for row in await self.session.execute(stmt.group_by(Hold.account_id))}

    async def chain_heads(
        self, *, since: datetime | None, after: tuple[str, str] | None, limit: int
    ) -> list[tuple[str, str, int, str]]:
        """(tenant, account, last seq, last hash) of the chains changed since `since`, by tenant and account,
        after `after`. No index on updated_at: one would cost every balance update its HOT update."""
        stmt = select(Balance.tenant_id, Balance.account_id, Balance.last_seq, Balance.last_hash).where(
            Balance.last_seq > 0
        )
        if since is not None:
            stmt = stmt.where(Balance.updated_at >= since)
        if after is not None:
            stmt = stmt.where(tuple_(Balance.tenant_id, Balance.account_id) > after)
        stmt = stmt.order_by(Balance.tenant_id, Balance.account_id).limit(limit)
        return [(r[0], r[1], int(r[2]), str(r[3])) for r in await self.session.execute(stmt)]

    async def tenant_balances(self, tenant_id: str) -> Sequence[Balance]:
        return await self.get_all(select(Balance).where(Balance.tenant_id == tenant_id).order_by(Balance.account_id))

    async def outbox_batch(self: LedgerRepository[AsyncSession], limit: int) -> list[dict[str, Any]]:
        # SKIP LOCKED lets several relays (replicas) drain the outbox without waiting on each other. A row
        # whose entry is missing comes back with the entry's columns null (so it can be quarantined).
        rows = await _OUTBOX_BATCH.fetch(self, {"limit": limit})
        out = []
        for row in rows:
            entry = dict(row)
            if isinstance(entry["breakdown"], str):  # the driver hands jsonb over as text
                entry["breakdown"] = json.loads(entry["breakdown"])
            out.append(entry)
        return out

    async def delete_outbox(self: LedgerRepository[AsyncSession], ids: Sequence[int]) -> None:
        # One fixed statement (an array parameter) instead of an IN list compiled per batch.
        await _DELETE_OUTBOX.fetch(self, {"ids": list(ids)})

    async def oldest_outbox_row(self) -> datetime | None:
        rows = await _OLDEST_OUTBOX.fetch(self, {})
        return rows[0]["created_at"] if rows else None

    async def quarantine_outbox(self: LedgerRepository[AsyncSession], rows: Sequence[Unpublishable]) -> None:
        await insert_quarantined(self.session, outbox_quarantine, rows)

    async def outbox_size(self) -> int:
        return int((await self.session.execute(select(func.count()).select_from(Outbox))).scalar_one())

    # --- lots and holds ---------------------------------------------------------------------------

    async def lots(self, tenant_id: str, *, open_in: Iterable[str] = (), lot_ids: Iterable[str] = ()) -> list[LotState]:
        accounts, ids = sorted(set(open_in)), sorted(set(lot_ids))
        if not accounts and not ids:
            return []
        rows = await _LOTS.fetch(self, {"tenant": tenant_id, "accounts": accounts, "ids": ids})
        return [LotState(**dict(row)) for row in rows]

    async def save_lots(
        self: LedgerRepository[AsyncSession], tenant_id: str, lots: Iterable[LotState], *, defer_changed: bool = False
    ) -> list[LotState]:
        """Inserts the new lots and updates the changed ones; with `defer_changed`, returns the changed
        ones unwritten instead, for `post` to write in its own statement."""
        new: list[LotState] = []
        changed: list[LotState] = []
        for lot in lots:
            (new if lot.is_new else changed).append(lot)
            lot.is_new = False
        if new:
            records = [(tenant_id, *(getattr(lot, n) for n in _LOT_FIELDS)) for lot in new]
            await self.copy("lots", ["tenant_id", *_LOT_FIELDS], records, schema="ledger")
        if defer_changed:
            return changed
        await self._save_changed_lots(tenant_id, changed)
        return []

    async def _save_changed_lots(
        self: LedgerRepository[AsyncSession], tenant_id: str, changed: Sequence[LotState]
    ) -> None:
        if changed:
            params = {
                "tenant": tenant_id,
                "ids": [lot.lot_id for lot in changed],
                "remaining": [lot.remaining for lot in changed],
                "pending": [lot.pending for lot in changed],
                "clawed_back": [lot.clawed_back for lot in changed],
            }
            await _SAVE_LOTS.fetch(self, params)

    async def expiring(self, tenant_id: str, account_id: str, until: datetime) -> list[Any]:
        stmt = (
            select(Lot.expires_at, func.sum(Lot.remaining).label("points"))
            .where(
                Lot.tenant_id == tenant_id,
                Lot.account_id == account_id,
                Lot.remaining > 0,
                ~Lot.pending,
                Lot.expires_at <= until,
            )
            .group_by(Lot.expires_at)
            .order_by(Lot.expires_at)
        )
        return list((await self.session.execute(stmt)).all())

    async def due_lots(
        self, now: datetime, *, maturing: bool, limit: int, tenant_id: str | None
    ) -> list[tuple[str, str]]:
        if maturing:
            where = [Lot.pending, Lot.matures_at <= now]
        else:
            where = [Lot.remaining > 0, ~Lot.pending, Lot.expires_at <= now]
        if tenant_id is not None:
            where.append(Lot.tenant_id == tenant_id)
        stmt = select(Lot.tenant_id, Lot.lot_id).where(*where).order_by(Lot.tenant_id, Lot.lot_id).limit(limit)
        return [(row.tenant_id, row.lot_id) for row in await self.session.execute(stmt)]

    async def due_tenants(self, now: datetime) -> list[str]:
        """The tenants with a lot to mature or expire, or a hold to release, at `now`."""
        lots = select(Lot.tenant_id).where(
            or_(and_(Lot.pending, Lot.matures_at <= now), and_(Lot.remaining > 0, ~Lot.pending, Lot.expires_at <= now))
        )
        holds = select(Hold.tenant_id).where(Hold.status == "active", Hold.expires_at <= now)
        stmt = union(lots, holds).order_by("tenant_id")
        return list((await self.session.execute(stmt)).scalars())

    async def get_hold(self, tenant_id: str, hold_id: uuid.UUID) -> HoldState | None:
        stmt = select(*(getattr(Hold, name) for name in _HOLD_FIELDS)).where(
            Hold.tenant_id == tenant_id, Hold.hold_id == hold_id
        )
        row = (await self.session.execute(stmt)).first()
        return None if row is None else HoldState(**row._asdict())

    async def lock_hold(self: LedgerRepository[AsyncSession], tenant_id: str, hold_id: uuid.UUID) -> None:
        # The hold row is locked after its account: the same order as every other writer.
        await self.session.execute(
            select(Hold.hold_id).where(Hold.tenant_id == tenant_id, Hold.hold_id == hold_id).with_for_update()
        )

    async def due_holds(self, now: datetime, limit: int, tenant_id: str | None) -> list[tuple[str, uuid.UUID]]:
        stmt = (
            select(Hold.tenant_id, Hold.hold_id)
            .where(Hold.status == "active", Hold.expires_at <= now)
            .where(Hold.tenant_id == tenant_id if tenant_id is not None else true())
            .order_by(Hold.tenant_id, Hold.hold_id)
            .limit(limit)
        )
        return [(row.tenant_id, row.hold_id) for row in await self.session.execute(stmt)]

    # --- idempotency ------------------------------------------------------------------------------

    async def claim_commands(
        self: LedgerRepository[AsyncSession], rows: Sequence[tuple[str, str, str]]
    ) -> set[tuple[str, str]]:
        """Inserts (tenant, command id, kind) rows; returns the (tenant, command id) pairs that were new."""
        if not rows:
            return set()
        tenants, ids, kinds = (list(column) for column in zip(*rows, strict=True))
        result = await _CLAIM_COMMANDS.fetch(self, {"tenants": tenants, "ids": ids, "kinds": kinds})
        return {(row["tenant_id"], row["command_id"]) for row in result}

    async def get_command(self, tenant_id: str, command_id: str) -> Command | None:
        return await self.session.get(Command, (tenant_id, command_id))

    async def release_commands(self: LedgerRepository[AsyncSession], keys: Sequence[tuple[str, str]]) -> None:
        if keys:
            await self.session.execute(delete(Command).where(tuple_(Command.tenant_id, Command.command_id).in_(keys)))

    async def claim_idempotency_key(
        self: LedgerRepository[AsyncSession], tenant_id: str, api_key_id: str, key: str, request_hash: str
    ) -> bool:
        # A concurrent request with the same key waits here on the unique index until the first one
        # commits (then it finds the stored response) or rolls back (then it proceeds itself).
        params = {"tenant": tenant_id, "api_key_id": api_key_id, "key": key, "hash": request_hash}
        return bool(await _CLAIM_KEY.fetch(self, params))

    async def get_idempotency_key(self, tenant_id: str, api_key_id: str, key: str) -> IdempotencyKey | None:
        return await self.session.get(IdempotencyKey, (tenant_id, api_key_id, key))

    async def store_response(
        self: LedgerRepository[AsyncSession], tenant_id: str, api_key_id: str, key: str, status_code: int, response: str
    ) -> None:
        params = {
            "tenant": tenant_id,
            "api_key_id": api_key_id,
            "key": key,
            "status": status_code,
            "response": response,
        }
        await _STORE_RESPONSE.fetch(self, params)

    # --- policies ---------------------------------------------------------------------------------

    async def policy(self, tenant_id: str) -> Policy:
        row = await self.session.get(TenantPolicy, tenant_id)
        if row is None:
            return Policy()
        return Policy(
            expiry_rule=row.expiry_rule,  # type: ignore[arg-type]
            expiry_months=row.expiry_months,
            clawback_policy=row.clawback_policy,  # type: ignore[arg-type]
            hold_timeout_seconds=row.hold_timeout_seconds,
        )

    async def set_policy(self: LedgerRepository[AsyncSession], tenant_id: str, policy: Policy, now: datetime) -> None:
        values = {**asdict(policy), "updated_at": now}
        stmt = insert(TenantPolicy).values(tenant_id=tenant_id, **values)
        await self.session.execute(stmt.on_conflict_do_update(index_elements=[TenantPolicy.tenant_id], set_=values))
