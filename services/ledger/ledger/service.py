from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel

from ledger import schemas
from ledger.anchors import Anchors
from ledger.domain import (
    SYSTEM_ACCOUNTS,
    SYSTEM_SHARDS,
    AccountState,
    Book,
    HoldState,
    LotState,
    LotTotals,
    Meta,
    Policy,
    account_problems,
    check_customer_account,
    is_system,
    replay,
)
from ledger.errors import (
    AccountNotFound,
    HoldNotFound,
    IdempotencyKeyReused,
    LedgerError,
    OriginalEarnNotFound,
)
from ledger.models import Balance
from ledger.repository import LedgerRepository
from shared.consumer import Inbound, Rejection
from shared.db import AsyncReadSession, AsyncSession
from shared.events import (
    ClawbackPoints,
    CloudEvent,
    EarnPoints,
    LedgerEntryPosted,
    PointsCommand,
    make_event,
    utcnow,
)
from shared.outbox import Claimed, Unpublishable, describe_error

log = logging.getLogger(__name__)


def _balance(account: AccountState) -> schemas.Balance:
    kind = "system" if is_system(account.account_id) else "customer"
    counters = asdict(account)
    del counters["last_seq"], counters["last_hash"]
    return schemas.Balance(kind=kind, **counters)


def entry_event(entry: dict[str, Any]) -> CloudEvent[Any]:
    """The CloudEvent of a stored entry; its id is the entry id, so a relayed duplicate is recognisable."""
    account_id = entry["account_id"]
    customer_id = None if is_system(account_id) else account_id
    data = LedgerEntryPosted(
        entry_id=str(entry["entry_id"]),
        transaction_id=str(entry["transaction_id"]),
        account_id=account_id,
        customer_id=customer_id,
        member_id=entry["member_id"],
        kind=entry["kind"],
        points=entry["points"],
        balance_after=entry["balance_after"],
        source=entry["source"],
        created_at=entry["created_at"],
        bucket=entry["bucket"],
        sequence=entry["seq"],
        entry_hash=entry["hash"],
        prev_hash=entry["prev_hash"],
        ruleset_id=entry["ruleset_id"],
        ruleset_version=entry["ruleset_version"],
        reference_id=entry["reference_id"],
    )
    return make_event(
        "ledger.entry.posted",
        data,
        tenant_id=entry["tenant_id"],
        source="loyalty/ledger",
        subject=customer_id or account_id,
        event_id=str(entry["entry_id"]),
        time=entry["created_at"],
    )


class LedgerOutbox:
    """The ledger's outbox as the shared relay reads it: each row names an entry, published as its
    `ledger.entry.posted` event on `topic`. A row whose event cannot be built (its entry is missing or
    does not validate) is handed back as unpublishable, with the entry id as its reference."""

    def __init__(self, topic: str) -> None:
        self.topic = topic

    async def claim(self, session: AsyncSession, limit: int) -> Claimed:
        claimed = Claimed()
        for row in await LedgerRepository.from_session(session).outbox_batch(limit):
            try:
                if row["entry_id"] is None:
                    raise LookupError(f"entry {row['outbox_entry_id']} does not exist")
                event = entry_event(row)
                message = (self.topic, event.key, event.to_bytes())
            except Exception as exc:  # whatever fails here is this row's fault, never the others'
                reference = str(row["outbox_entry_id"])
                claimed.unpublishable.append(
                    Unpublishable(row["outbox_id"], self.topic, "invalid", describe_error(exc), reference=reference)
                )
                continue
            claimed.ids.append(row["outbox_id"])
            claimed.messages.append(message)
        return claimed

    async def delete(self, session: AsyncSession, ids: Sequence[int]) -> None:
        await LedgerRepository.from_session(session).delete_outbox(ids)

    async def quarantine(self, session: AsyncSession, rows: Sequence[Unpublishable]) -> None:
        await LedgerRepository.from_session(session).quarantine_outbox(rows)

    async def oldest(self, session: AsyncReadSession) -> datetime | None:
        return await LedgerRepository.from_session(session).oldest_outbox_row()


@dataclass(slots=True)
class PendingResponse:
    """The Idempotency-Key a REST write answers under, handed by `idempotent` to the write: a plain posting
    stores its response in the statement that writes its entries and sets `stored` to it, so that
    `idempotent` does not store it a second time."""

    api_key_id: str
    key: str
    status_code: int
    stored: BaseModel | None = None


class LedgerService:
    # --- the booking machinery every write goes through ------------------------------------------

    async def _lock(
        self, session: AsyncSession, tenant_id: str, wanted: set[str], *, create: set[str]
    ) -> dict[str, AccountState]:
        repo = LedgerRepository.from_session(session)
        locked = await repo.lock_accounts(tenant_id, wanted)
        # Accounts are created only when missing, so the hot path (they exist) costs one statement.
        creatable = {a for a in wanted - locked.keys() if a in create}
        if creatable:
            await repo.create_accounts(tenant_id, creatable)
            locked.update(await repo.lock_accounts(tenant_id, creatable))
        for account_id in sorted(wanted - locked.keys()):
            raise AccountNotFound(account_id)
        return locked

    async def _open(
        self,
        session: AsyncSession,
        tenant_id: str,
        accounts: Iterable[str],
        *,
        now: datetime | None,
        create: Iterable[str] = (),
        lots_of: Iterable[str] = (),
        lot_ids: Iterable[str] = (),
        policy: bool = True,
    ) -> Book:
        """Locks the customer accounts (creating `create` on the fly) and loads the lots.

        Lock order, everywhere: a tenant's customer accounts by id, then its holds, then its system
        accounts by id (in `_save`); tenants of a batch one after the other, by id. `policy=False`
        skips reading the tenant's policy, for operations that never consult it."""
        repo = LedgerRepository.from_session(session)
        locked = await self._lock(session, tenant_id, set(accounts), create=set(create))
        tenant_policy = await repo.policy(tenant_id) if policy else Policy()
        book = Book(tenant_id, tenant_policy, now or utcnow(), locked)
        for lot in await repo.lots(tenant_id, open_in=lots_of, lot_ids=lot_ids):
            book.lots[lot.lot_id] = lot
        return book

    async def _save(
        self, session: AsyncSession, book: Book, respond: Callable[[], tuple[str, str, int, str]] | None = None
    ) -> bool:
        """Writes the book. `respond`, called once the entries are sealed, gives the idempotency key's
        response (API key id, key, status, body) to store with them; returns whether it was stored."""
        repo = LedgerRepository.from_session(session)
        changed = await repo.save_lots(
            book.tenant_id, (book.lots[i] for i in sorted(book.dirty_lots)), defer_changed=True
        )
        # From here on the tenant's system accounts are locked: as few statements as possible follow.
        system = book.unsealed_accounts()
        if system:
            book.seal(await self._lock(session, book.tenant_id, system, create=system))
        stored = await repo.post(
            book.tenant_id,
            book.entries,
            (book.accounts[a] for a in sorted(book.touched)),
            book.now,
            lots=changed,
            holds=[book.holds[i] for i in sorted(book.dirty_holds)],
            response=respond() if respond is not None and book.entries else None,
        )
        book.entries, book.touched, book.dirty_lots, book.dirty_holds = [], set(), set(), set()
        return stored

    async def _post(
        self,
        session: AsyncSession,
        book: Book,
        txn: uuid.UUID,
        account_id: str,
        pending: PendingResponse | None = None,
    ) -> schemas.Posted:
        posted = [e for e in book.entries if e["transaction_id"] == txn]
        result: list[schemas.Posted] = []

        def respond() -> tuple[str, str, int, str]:
            # The entries are sealed now (seq and hash): the response is final before the statement runs.
            entries = [schemas.Entry.model_validate(e) for e in posted]
            result.append(
                schemas.Posted(transaction_id=txn, balance=_balance(book.account(account_id)), entries=entries)
            )
            assert pending is not None
            return pending.api_key_id, pending.key, pending.status_code, result[0].model_dump_json()

        # `_save` seals the system postings in place: they get their seq and hash.
        if pending is None:
            await self._save(session, book)
        elif await self._save(session, book, respond):
            pending.stored = result[0]
            return result[0]
        if result:  # built, but too many entries to be stored with them: `idempotent` stores it
            return result[0]
        entries = [schemas.Entry.model_validate(e) for e in posted]
        return schemas.Posted(transaction_id=txn, balance=_balance(book.account(account_id)), entries=entries)

    # --- REST writes ------------------------------------------------------------------------------

    async def idempotent(
        self,
        session: AsyncSession,
        *,
        tenant_id: str,
        api_key_id: str,
        key: str,
        fingerprint: str,
        status_code: int,
        operation: Callable[[PendingResponse], Awaitable[BaseModel]],
    ) -> tuple[int, bytes]:
        """Runs a write once per Idempotency-Key of the calling API key (`api_key_id`): a repeat with the
        same request gets the stored response; the same key sent by another API key of the tenant is a
        request of its own. `operation` gets the key's pending response, to pass to the write as its
        `pending`.

        Returns the status and the JSON body, serialised once for both the client and the store."""
        repo = LedgerRepository.from_session(session)
        request_hash = hashlib.sha256(fingerprint.encode()).hexdigest()
        if await repo.claim_idempotency_key(tenant_id, api_key_id, key, request_hash):
            # A plain posting stores its response in the statement that writes its entries (`_post`),
            # saving a round trip while the system accounts are locked; anything else is stored here.
            pending = PendingResponse(api_key_id, key, status_code)
            response = await operation(pending)
            body = response.model_dump_json()
            if pending.stored is not response:
                await repo.store_response(tenant_id, api_key_id, key, status_code, body)
            return status_code, body.encode()
        stored = await repo.get_idempotency_key(tenant_id, api_key_id, key)
        assert stored is not None, "the conflicting row exists, or the insert would have succeeded"
        assert stored.status_code is not None
        assert stored.response is not None
        if stored.request_hash != request_hash:
            raise IdempotencyKeyReused(key)
        return stored.status_code, json.dumps(stored.response).encode()

    async def earn(
        self,
        session: AsyncSession,
        tenant_id: str,
        account_id: str,
        body: schemas.EarnCreate,
        *,
        source: str,
        actor_key_id: str | None = None,
        now: datetime | None = None,
        pending: PendingResponse | None = None,
    ) -> schemas.Posted:
        check_customer_account(account_id)
        book = await self._open(session, tenant_id, [account_id], now=now, create=[account_id])
        meta = Meta(kind="earn", source=source, member_id=body.member_id, reason=body.reason, actor_key_id=actor_key_id)
        txn = book.earn(account_id, body.points, meta, lot_id=None, matures_at=body.matures_at)
        return await self._post(session, book, txn, account_id, pending)

    async def clawback(
        self,
        session: AsyncSession,
        tenant_id: str,
        account_id: str,
        body: schemas.ClawbackCreate,
        *,
        source: str,
        actor_key_id: str | None = None,
        now: datetime | None = None,
        pending: PendingResponse | None = None,
    ) -> schemas.Posted:
        book = await self._open(
            session,
            tenant_id,
            [account_id],
            now=now,
            lots_of=[account_id],
            lot_ids=[body.original_earn],
        )
        original = book.lots.get(body.original_earn)
        if original is None or original.account_id != account_id:
            raise OriginalEarnNotFound(body.original_earn)
        meta = Meta(
            kind="clawback",
            source=source,
            reason=body.reason,
            actor_key_id=actor_key_id,
            reference_id=body.original_earn,
        )
        txn = book.clawback(account_id, body.points, meta, original_lot_id=original.lot_id)
        return await self._post(session, book, txn, account_id, pending)

    async def redeem(
        self,
        session: AsyncSession,
        tenant_id: str,
        account_id: str,
        body: schemas.RedeemCreate,
        *,
        source: str,
        actor_key_id: str | None = None,
        now: datetime | None = None,
        pending: PendingResponse | None = None,
    ) -> schemas.Posted:
        book = await self._open(session, tenant_id, [account_id], now=now, lots_of=[account_id], policy=False)
        meta = Meta(
            kind="redeem",
            source=source,
            member_id=body.member_id,
            reference_id=body.reference,
            actor_key_id=actor_key_id,
        )
        txn = book.redeem(account_id, body.points, meta)
        return await self._post(session, book, txn, account_id, pending)

    @staticmethod
    def _hold(
        book: Book,
        account_id: str,
        points: int,
        *,
        member_id: str | None,
        reference: str | None,
        timeout_s: int,
        source: str,
        actor_key_id: str | None,
    ) -> tuple[HoldState, uuid.UUID]:
        """A new active hold of `points` on the account, reserved in the book: the hold and its transaction."""
        hold = HoldState(
            hold_id=uuid.uuid4(),
            account_id=account_id,
            points=points,
            captured=0,
            status="active",
            allocations=[],
            member_id=member_id,
            reference=reference,
            expires_at=book.now + timedelta(seconds=timeout_s),
            created_at=book.now,
        )
        meta = Meta(
            kind="hold",
            source=source,
            member_id=member_id,
            reference_id=reference,
            actor_key_id=actor_key_id,
            hold_id=hold.hold_id,
        )
        return hold, book.reserve(hold, meta)

    async def reserve(
        self,
        session: AsyncSession,
        tenant_id: str,
        account_id: str,
        body: schemas.HoldCreate,
        *,
        source: str,
        actor_key_id: str | None = None,
        now: datetime | None = None,
        pending: PendingResponse | None = None,
    ) -> schemas.HoldPosted:
        book = await self._open(session, tenant_id, [account_id], now=now, lots_of=[account_id])
        hold, txn = self._hold(
            book,
            account_id,
            body.points,
            member_id=body.member_id,
            reference=body.reference,
            timeout_s=body.timeout_seconds or book.policy.hold_timeout_seconds,
            source=source,
            actor_key_id=actor_key_id,
        )
        posted = await self._post(session, book, txn, account_id, pending)
        return schemas.HoldPosted(**posted.model_dump(), hold=schemas.Hold.model_validate(hold, from_attributes=True))

    async def _hold_book(
        self, session: AsyncSession, tenant_id: str, hold_id: uuid.UUID, *, now: datetime | None
    ) -> tuple[Book, HoldState]:
        repo = LedgerRepository.from_session(session)
        found = await repo.get_hold(tenant_id, hold_id)
        if found is None:
            raise HoldNotFound(str(hold_id))
        lot_ids = [str(lot_id) for lot_id, _ in found.allocations]
        book = await self._open(session, tenant_id, [found.account_id], now=now, lot_ids=lot_ids, policy=False)
        await repo.lock_hold(tenant_id, hold_id)
        # Re-read under the account lock: a concurrent capture or void may have closed it meanwhile.
        hold = await repo.get_hold(tenant_id, hold_id)
        assert hold is not None
        book.holds[hold.hold_id] = hold
        return book, hold

    async def capture(
        self,
        session: AsyncSession,
        tenant_id: str,
        hold_id: uuid.UUID,
        body: schemas.HoldCapture,
        *,
        source: str,
        actor_key_id: str | None = None,
        now: datetime | None = None,
        pending: PendingResponse | None = None,
    ) -> schemas.HoldPosted:
        book, hold = await self._hold_book(session, tenant_id, hold_id, now=now)
        meta = Meta(
            kind="capture",
            source=source,
            member_id=hold.member_id,
            reference_id=hold.reference,
            actor_key_id=actor_key_id,
            hold_id=hold.hold_id,
        )
        txn = book.capture(hold, body.points or hold.points, meta)
        return await self._hold_posted(session, book, txn, hold, pending)

    async def void(
        self,
        session: AsyncSession,
        tenant_id: str,
        hold_id: uuid.UUID,
        *,
        source: str,
        actor_key_id: str | None = None,
        now: datetime | None = None,
        pending: PendingResponse | None = None,
    ) -> schemas.HoldPosted:
        book, hold = await self._hold_book(session, tenant_id, hold_id, now=now)
        meta = Meta(kind="void", source=source, actor_key_id=actor_key_id, hold_id=hold.hold_id)
        txn = book.release(hold, meta, status="voided")
        return await self._hold_posted(session, book, txn, hold, pending)

    async def _hold_posted(
        self, session: AsyncSession, book: Book, txn: uuid.UUID, hold: HoldState, pending: PendingResponse | None
    ) -> schemas.HoldPosted:
        posted = await self._post(session, book, txn, hold.account_id, pending)
        return schemas.HoldPosted(**posted.model_dump(), hold=schemas.Hold.model_validate(hold, from_attributes=True))

    async def transfer(
        self,
        session: AsyncSession,
        tenant_id: str,
        account_id: str,
        body: schemas.TransferCreate,
        *,
        source: str,
        actor_key_id: str | None = None,
        now: datetime | None = None,
        pending: PendingResponse | None = None,
    ) -> schemas.Posted:
        target = body.to_account_id
        check_customer_account(target)
        book = await self._open(
            session, tenant_id, [account_id, target], now=now, create=[target], lots_of=[account_id]
        )
        meta = Meta(kind="transfer", source=source, reason=body.reason, actor_key_id=actor_key_id)
        txn = book.transfer(account_id, target, body.points, meta)
        return await self._post(session, book, txn, account_id, pending)

    async def adjust(
        self,
        session: AsyncSession,
        tenant_id: str,
        account_id: str,
        body: schemas.AdjustmentCreate,
        *,
        source: str,
        actor_key_id: str,
        now: datetime | None = None,
        pending: PendingResponse | None = None,
    ) -> schemas.Posted:
        check_customer_account(account_id)
        book = await self._open(session, tenant_id, [account_id], now=now, create=[account_id], lots_of=[account_id])
        meta = Meta(kind="adjustment", source=source, reason=body.reason, actor_key_id=actor_key_id)
        txn = book.adjust(account_id, body.points, meta)
        return await self._post(session, book, txn, account_id, pending)

    async def set_policy(
        self, session: AsyncSession, tenant_id: str, body: schemas.PolicyUpdate, *, now: datetime | None = None
    ) -> schemas.Policy:
        await LedgerRepository.from_session(session).set_policy(tenant_id, Policy(**body.model_dump()), now or utcnow())
        return schemas.Policy(**body.model_dump())

    # --- Kafka points commands --------------------------------------------------------------------

    async def handle_commands(
        self, session: AsyncSession, batch: Sequence[Inbound[PointsCommand]], *, now: datetime | None = None
    ) -> list[Rejection]:
        """Applies a consumed batch in this one transaction: the command id makes each one post once."""
        repo = LedgerRepository.from_session(session)
        claimed = await repo.claim_commands([(m.event.tenantid, m.event.data.command_id, m.event.type) for m in batch])
        by_tenant: dict[str, list[Inbound[PointsCommand]]] = defaultdict(list)
        for message in batch:
            key = (message.event.tenantid, message.event.data.command_id)
            if key in claimed:
                claimed.discard(key)  # a duplicate inside the batch is applied once as well
                by_tenant[message.event.tenantid].append(message)
        rejections: list[Rejection] = []
        now = now or utcnow()
        # Tenants in a fixed order, accounts sorted inside each: the same lock order as every writer.
        for tenant_id in sorted(by_tenant):
            rejections.extend(await self._apply_commands(session, tenant_id, by_tenant[tenant_id], now))
        await repo.release_commands([(r.message.event.tenantid, r.message.event.data.command_id) for r in rejections])
        return rejections

    async def _apply_commands(
        self, session: AsyncSession, tenant_id: str, messages: list[Inbound[PointsCommand]], now: datetime
    ) -> list[Rejection]:
        customers: set[str] = set()
        clawbacks: list[ClawbackPoints] = []
        rejections: list[Rejection] = []
        valid: list[Inbound[PointsCommand]] = []
        for message in messages:
            data = message.event.data
            if is_system(data.customer_id):
                rejections.append(Rejection(message, f"customer id {data.customer_id!r} names a system account"))
                continue
            customers.add(data.customer_id)
            if isinstance(data, ClawbackPoints):
                clawbacks.append(data)
            valid.append(message)
        if not valid:
            return rejections
        book = await self._open(
            session,
            tenant_id,
            customers,
            now=now,
            create=customers,
            lots_of={c.customer_id for c in clawbacks},
            lot_ids={c.original_command_id for c in clawbacks},
        )
        for message in valid:
            try:
                self._apply_command(book, message)
            except LedgerError as exc:
                rejections.append(Rejection(message, f"{type(exc).__name__}: {exc.message}"))
        await self._save(session, book)
        return rejections

    def _apply_command(self, book: Book, message: Inbound[PointsCommand]) -> None:
        data = message.event.data
        if isinstance(data, EarnPoints):
            meta = Meta(
                kind="earn",
                source=f"command:{data.command_id}",
                event_id=data.source_event_id,
                member_id=data.member_id,
                ruleset_id=data.ruleset_id,
                ruleset_version=data.ruleset_version,
                breakdown=[award.model_dump() for award in data.breakdown] or None,
                reason=data.reason,
            )
            book.earn(data.customer_id, data.points, meta, lot_id=data.command_id, matures_at=data.matures_at)
            return
        original = book.lots.get(data.original_command_id)
        if original is None or original.account_id != data.customer_id:
            raise OriginalEarnNotFound(data.original_command_id)
        meta = Meta(
            kind="clawback",
            source=f"command:{data.command_id}",
            event_id=data.source_event_id,
            reason=data.reason,
            reference_id=data.original_command_id,
        )
        book.clawback(data.customer_id, data.points, meta, original_lot_id=original.lot_id)

    # --- periodic tasks ---------------------------------------------------------------------------

    async def run_tasks(
        self,
        session: AsyncSession,
        *,
        now: datetime | None = None,
        limit: int = 1000,
        tenant_id: str | None = None,
    ) -> schemas.TaskRun:
        """Matures due pending lots, expires due lots into breakage, releases expired holds (of one
        tenant, or of all)."""
        now = now or utcnow()
        repo = LedgerRepository.from_session(session)
        maturing = await repo.due_lots(now, maturing=True, limit=limit, tenant_id=tenant_id)
        matured = await self._lot_task(session, maturing, now, "mature")
        expiring = await repo.due_lots(now, maturing=False, limit=limit, tenant_id=tenant_id)
        expired = await self._lot_task(session, expiring, now, "expire")
        released = 0
        for hold_tenant, hold_id in await repo.due_holds(now, limit, tenant_id):
            book, hold = await self._hold_book(session, hold_tenant, hold_id, now=now)
            if hold.status == "active":
                book.release(hold, Meta(kind="hold_expired", source="task:holds", hold_id=hold_id), status="expired")
                await self._save(session, book)
                released += 1
        return schemas.TaskRun(matured=matured, expired=expired, holds_released=released)

    async def due_tenants(self, session: AsyncReadSession, *, now: datetime) -> list[str]:
        return await LedgerRepository.from_session(session).due_tenants(now)

    async def _lot_task(self, session: AsyncSession, due: list[tuple[str, str]], now: datetime, kind: str) -> int:
        by_tenant: dict[str, list[str]] = defaultdict(list)
        for tenant_id, lot_id in due:
            by_tenant[tenant_id].append(lot_id)
        done = 0
        repo = LedgerRepository.from_session(session)
        for tenant_id, lot_ids in sorted(by_tenant.items()):
            accounts = {lot.account_id for lot in await repo.lots(tenant_id, lot_ids=lot_ids)}
            book = await self._open(session, tenant_id, accounts, now=now, lot_ids=lot_ids)
            for lot_id in lot_ids:
                lot: LotState = book.lots[lot_id]
                meta = Meta(kind=kind, source=f"task:{kind}", reference_id=lot_id)
                txn = book.mature(lot, meta) if kind == "mature" else book.expire(lot, meta)
                done += txn is not None
            await self._save(session, book)
        return done

    # --- reads ------------------------------------------------------------------------------------

    async def get_balance(
        self, session: AsyncReadSession, tenant_id: str, account_id: str, *, as_of: datetime | None = None
    ) -> schemas.Balance | None:
        repo = LedgerRepository.from_session(session)
        if account_id in SYSTEM_ACCOUNTS:
            return await self._system_balance(session, tenant_id, account_id, as_of=as_of)
        row = await repo.balance_row(tenant_id, account_id)
        if row is None:
            return None
        if as_of is None:
            return schemas.Balance.model_validate(row)
        return await self._balance_as_of(session, tenant_id, account_id, [account_id], as_of)

    async def _balance_as_of(
        self, session: AsyncReadSession, tenant_id: str, account_id: str, rows: list[str], as_of: datetime
    ) -> schemas.Balance:
        # A past balance is answered from the entries, which are the record; the row only knows "now".
        state = AccountState(account_id)
        for r in await LedgerRepository.from_session(session).balance_as_of(tenant_id, rows, as_of):
            state.apply(r.bucket, r.kind, int(r.points))
        return _balance(state).model_copy(update={"as_of": as_of})

    async def _system_balance(
        self, session: AsyncReadSession, tenant_id: str, account_id: str, *, as_of: datetime | None
    ) -> schemas.Balance | None:
        """A system account's balance: the sum of its shards."""
        shards = [f"{account_id}/{i:02d}" for i in range(SYSTEM_SHARDS)]
        rows = await LedgerRepository.from_session(session).balance_rows(tenant_id, shards)
        if not rows:
            return None
        if as_of is not None:
            return await self._balance_as_of(session, tenant_id, account_id, shards, as_of)
        total = AccountState(account_id)
        for row in rows:
            for bucket in ("available", "pending", "held"):
                setattr(total, bucket, total.bucket(bucket) + getattr(row, bucket))
        return _balance(total)

    async def list_accounts(
        self, session: AsyncReadSession, tenant_id: str, *, kind: str | None, cursor: str | None, limit: int
    ) -> schemas.Page[schemas.Balance]:
        rows = await LedgerRepository.from_session(session).list_accounts(
            tenant_id, kind=kind, after=cursor, limit=limit + 1
        )
        items = [schemas.Balance.model_validate(r) for r in rows[:limit]]
        return schemas.Page[schemas.Balance](
            items=items, next_cursor=items[-1].account_id if len(rows) > limit else None
        )

    async def history(
        self,
        session: AsyncReadSession,
        tenant_id: str,
        account_id: str,
        *,
        kinds: Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        cursor: int | None = None,
        limit: int = 50,
    ) -> schemas.Page[schemas.Entry] | None:
        repo = LedgerRepository.from_session(session)
        if await repo.get_balance(tenant_id, account_id) is None:
            return None
        rows = await repo.history(
            tenant_id, account_id, kinds=kinds, since=since, until=until, before_seq=cursor, limit=limit + 1
        )
        items = [schemas.Entry.model_validate(r) for r in rows[:limit]]
        return schemas.Page[schemas.Entry](items=items, next_cursor=str(items[-1].seq) if len(rows) > limit else None)

    async def get_command(
        self, session: AsyncReadSession, tenant_id: str, command_id: str
    ) -> schemas.AppliedCommand | None:
        command = await LedgerRepository.from_session(session).get_command(tenant_id, command_id)
        return None if command is None else schemas.AppliedCommand.model_validate(command)

    async def get_hold(self, session: AsyncReadSession, tenant_id: str, hold_id: uuid.UUID) -> schemas.Hold | None:
        hold = await LedgerRepository.from_session(session).get_hold(tenant_id, hold_id)
        return None if hold is None else schemas.Hold.model_validate(hold, from_attributes=True)

    async def expiring(
        self,
        session: AsyncReadSession,
        tenant_id: str,
        account_id: str,
        *,
        within: timedelta,
        now: datetime | None = None,
    ) -> schemas.Expiring | None:
        repo = LedgerRepository.from_session(session)
        if await repo.get_balance(tenant_id, account_id) is None:
            return None
        until = (now or utcnow()) + within
        lots = [
            schemas.ExpiringLot(expires_at=r.expires_at, points=int(r.points))
            for r in await repo.expiring(tenant_id, account_id, until)
        ]
        return schemas.Expiring(account_id=account_id, until=until, points=sum(lot.points for lot in lots), lots=lots)

    async def liability(self, session: AsyncReadSession, tenant_id: str) -> schemas.Liability:
        row = await LedgerRepository.from_session(session).liability(tenant_id)
        available, pending, held = int(row.available), int(row.pending), int(row.held)
        return schemas.Liability(
            tenant_id=tenant_id,
            available=available,
            pending=pending,
            held=held,
            outstanding=available + pending + held,
            accounts=int(row.accounts),
        )

    async def adjustments(
        self, session: AsyncReadSession, tenant_id: str, *, account_id: str | None, cursor: datetime | None, limit: int
    ) -> schemas.Page[schemas.Entry]:
        rows = await LedgerRepository.from_session(session).entries_of_kind(
            tenant_id, "adjustment", account_id=account_id, before=cursor, limit=limit + 1
        )
        items = [schemas.Entry.model_validate(r) for r in rows[:limit]]
        more = len(rows) > limit
        return schemas.Page[schemas.Entry](items=items, next_cursor=items[-1].created_at.isoformat() if more else None)

    async def get_policy(self, session: AsyncReadSession, tenant_id: str) -> schemas.Policy:
        return schemas.Policy(**asdict(await LedgerRepository.from_session(session).policy(tenant_id)))

    async def verify(
        self, session: AsyncReadSession, tenant_id: str, account_id: str, *, anchors: Anchors | None = None
    ) -> schemas.Verification | None:
        """Replays the account's hash chain and balances from its entries, and checks them against its
        lots and holds (a customer), its id and range (a system shard), the transactions it took part
        in (each sums to zero) and, given `anchors`, the chain head last anchored outside the database."""
        repo = LedgerRepository.from_session(session)
        row = await repo.get_balance(tenant_id, account_id)
        if row is None:
            return None
        lots = (await repo.lot_totals(tenant_id, account_id)).get(account_id, LotTotals())
        held = (await repo.active_held(tenant_id, account_id)).get(account_id, 0)
        unbalanced = _unbalanced(await repo.unbalanced_transactions(tenant_id, account_id))
        return await self._verify_account(session, tenant_id, row, lots, held, unbalanced, anchors)

    async def _verify_account(
        self,
        session: AsyncReadSession,
        tenant_id: str,
        row: Balance,
        lots: LotTotals,
        held: int,
        problems: list[str],
        anchors: Anchors | None,
    ) -> schemas.Verification:
        account_id = row.account_id
        entries = await LedgerRepository.from_session(session).all_entries(tenant_id, account_id)
        state, replayed = replay(account_id, entries)
        anchored, against_anchor = (None, []) if anchors is None else anchors.check(account_id, entries)
        problems = [*replayed, *against_anchor, *problems]
        stored = AccountState(**{f: getattr(row, f) for f in asdict(state)})
        for name, value in asdict(state).items():
            if getattr(stored, name) != value:
                problems.append(f"balances row: {name} is {getattr(stored, name)!r}, the entries give {value!r}")
        problems.extend(account_problems(stored, lots, held))
        return schemas.Verification(
            account_id=account_id,
            entries=len(entries),
            ok=not problems,
            problems=problems,
            anchored_seq=None if against_anchor else anchored,
        )

    async def verify_tenant(
        self, session: AsyncReadSession, tenant_id: str, *, anchors: Anchors | None = None
    ) -> schemas.TenantVerification:
        """Verifies every account of the tenant, and the books as a whole: every transaction sums to zero,
        so do all balances, and no lot or hold belongs to an account without a balances row."""
        repo = LedgerRepository.from_session(session)
        rows = await repo.tenant_balances(tenant_id)
        lots = await repo.lot_totals(tenant_id, None)
        held = await repo.active_held(tenant_id, None)
        results = [
            await self._verify_account(
                session, tenant_id, row, lots.pop(row.account_id, LotTotals()), held.pop(row.account_id, 0), [], anchors
            )
            for row in rows
        ]
        problems = _unbalanced(await repo.unbalanced_transactions(tenant_id, None))
        total = sum(row.available + row.pending + row.held for row in rows)
        if total:
            problems.append(f"the balances sum to {total}, not 0")
        for account_id in sorted({*lots, *held}):
            problems.append(f"lots or holds of {account_id!r}, which has no balances row")
        failed = [r for r in results if not r.ok]
        return schemas.TenantVerification(
            tenant_id=tenant_id,
            accounts=len(results),
            entries=sum(r.entries for r in results),
            ok=not problems and not failed,
            problems=problems,
            failed=failed,
        )


def _unbalanced(transactions: list[tuple[uuid.UUID, int]]) -> list[str]:
    return [f"transaction {txn} sums to {total}, not 0" for txn, total in sorted(transactions)]


ledger_service = LedgerService()
