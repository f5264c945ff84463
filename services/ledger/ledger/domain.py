"""Pure ledger rules: a `Book` holds the locked accounts, lots and holds of one database transaction and
turns operations into balanced postings. It never touches the database; the service loads what an
operation needs, calls the book, and persists what the book changed.

Every operation checks its invariants before it changes anything, so an operation that raises leaves
the book as it was and the other operations of the same batch can still be applied.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import re
import uuid
import zlib
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from ledger.errors import (
    CaptureExceedsHold,
    ClawbackExceedsEarn,
    HoldExpired,
    HoldNotActive,
    InsufficientPoints,
    InvalidAccount,
)

Bucket = Literal["available", "pending", "held"]
SYSTEM_PREFIX = "system:"
ISSUANCE = "system:issuance"
REDEMPTION = "system:redemption"
BREAKAGE = "system:breakage"
ADJUSTMENTS = "system:adjustments"
RECEIVABLE = "system:receivable"
SYSTEM_ACCOUNTS = (ISSUANCE, REDEMPTION, BREAKAGE, ADJUSTMENTS, RECEIVABLE)
GENESIS_HASH = "0" * 64
# Kinds whose customer postings count as redeemed: debits, and the credits of points a refunded
# redemption gives back (`redeem_return`), which count it down again.
REDEEMING_KINDS = frozenset({"redeem", "capture", "redeem_return"})

ExpiryRule = Literal["months_after_earn", "end_of_next_year", "never"]
ClawbackPolicy = Literal["receivable", "negative_balance"]


SYSTEM_SHARDS = 16


def shard(system_account: str, customer_id: str) -> str:
    """The shard of a system account that postings against `customer_id` go to.

    Every write of a tenant posts against a system account; one row for each would make every writer
    of the tenant queue on its lock (and its hash chain). Split by customer into `SYSTEM_SHARDS` rows
    (`system:redemption/07`), concurrent writers rarely meet; the account's balance is their sum."""
    return f"{system_account}/{zlib.crc32(customer_id.encode()) % SYSTEM_SHARDS:02d}"


def is_system(account_id: str) -> bool:
    return account_id.startswith(SYSTEM_PREFIX)


def check_customer_account(account_id: str) -> None:
    if is_system(account_id):
        raise InvalidAccount(account_id, f"is a system account; customer ids must not start with {SYSTEM_PREFIX!r}")


def add_months(moment: datetime, months: int) -> datetime:
    month_index = moment.month - 1 + months
    year, month = moment.year + month_index // 12, month_index % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


@dataclass(frozen=True)
class Policy:
    expiry_rule: ExpiryRule = "months_after_earn"
    expiry_months: int = 12
    clawback_policy: ClawbackPolicy = "receivable"
    hold_timeout_seconds: int = 900

    def expires_at(self, earned_at: datetime) -> datetime | None:
        if self.expiry_rule == "never":
            return None
        if self.expiry_rule == "end_of_next_year":
            return datetime(earned_at.year + 2, 1, 1, tzinfo=UTC)
        return add_months(earned_at, self.expiry_months)


_DURATION = re.compile(r"^(\d+)([dhm])$")


def parse_duration(text: str) -> timedelta:
    """`30d`, `12h`, `90m`: the windows partner apps ask about."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise ValueError("expected a number followed by d, h or m, e.g. 30d")
    amount, unit = int(match[1]), match[2]
    return {"d": timedelta(days=amount), "h": timedelta(hours=amount), "m": timedelta(minutes=amount)}[unit]


@dataclass
class AccountState:
    account_id: str
    available: int = 0
    pending: int = 0
    held: int = 0
    lifetime_earned: int = 0
    redeemed: int = 0
    expired: int = 0
    last_seq: int = 0
    last_hash: str | None = None

    @property
    def is_customer(self) -> bool:
        return not is_system(self.account_id)

    def bucket(self, name: Bucket) -> int:
        value: int = getattr(self, name)
        return value

    def apply(self, bucket: Bucket, kind: str, points: int) -> int:
        """Books one posting on the balances row; returns the bucket's balance after it."""
        after = self.bucket(bucket) + points
        setattr(self, bucket, after)
        if self.is_customer:
            if kind == "earn":
                self.lifetime_earned += points
            elif kind in REDEEMING_KINDS:
                self.redeemed -= points
            elif kind == "expire":
                self.expired -= points
        return after

    def check_available(self, points: int) -> None:
        if self.available < points:
            raise InsufficientPoints(self.account_id, requested=points, available=max(self.available, 0))


@dataclass
class LotState:
    lot_id: str
    account_id: str
    points: int
    remaining: int
    pending: bool
    matures_at: datetime | None
    expires_at: datetime | None
    created_at: datetime
    # What clawbacks took back of the credit this lot records (an earn's): never more than `points`.
    clawed_back: int = 0
    is_new: bool = False


@dataclass
class HoldState:
    hold_id: uuid.UUID
    account_id: str
    points: int
    captured: int
    status: str
    allocations: list[list[Any]]
    member_id: str | None
    reference: str | None
    expires_at: datetime
    created_at: datetime
    closed_at: datetime | None = None

    def check_active(self) -> None:
        if self.status != "active":
            raise HoldNotActive(str(self.hold_id), self.status)


@dataclass(frozen=True)
class Meta:
    """What every posting of one ledger transaction records about its origin."""

    kind: str
    source: str
    event_id: str | None = None
    member_id: str | None = None
    ruleset_id: str | None = None
    ruleset_version: int | None = None
    breakdown: list[dict[str, Any]] | None = None
    reason: str | None = None
    actor_key_id: str | None = None
    reference_id: str | None = None
    hold_id: uuid.UUID | None = None


HASHED_FIELDS = (
    "entry_id",
    "transaction_id",
    "tenant_id",
    "account_id",
    "seq",
    "bucket",
    "kind",
    "points",
    "balance_after",
    "source",
    "event_id",
    "member_id",
    "ruleset_id",
    "ruleset_version",
    "breakdown",
    "reason",
    "actor_key_id",
    "reference_id",
    "lot_id",
    "hold_id",
    "created_at",
    "prev_hash",
)


def _canonical(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"cannot hash a {type(value).__name__}")


# The canonical form of the hash chain: exactly what json.dumps(..., default=_canonical, sort_keys=True,
# separators=(",", ":")) writes. One encoder for every call: json.dumps with options builds a new
# encoder each time, a measurable share of hashing thousands of entries per batch.
_CANONICAL = json.JSONEncoder(default=_canonical, sort_keys=True, separators=(",", ":"))


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 over the entry's stored fields, its predecessor's hash included (the chain link)."""
    # `default` only sees the non-JSON values (uuid, datetime): the hot path hashes thousands per batch.
    doc = _CANONICAL.encode([entry[name] for name in HASHED_FIELDS])
    return hashlib.sha256(doc.encode()).hexdigest()


@dataclass
class Book:
    tenant_id: str
    policy: Policy
    now: datetime
    accounts: dict[str, AccountState]
    lots: dict[str, LotState] = field(default_factory=dict)
    holds: dict[uuid.UUID, HoldState] = field(default_factory=dict)
    entries: list[dict[str, Any]] = field(default_factory=list)
    dirty_lots: set[str] = field(default_factory=set)
    dirty_holds: set[uuid.UUID] = field(default_factory=set)
    touched: set[str] = field(default_factory=set)
    unsealed: list[dict[str, Any]] = field(default_factory=list)

    # --- operations -------------------------------------------------------------------------------

    def earn(
        self, account_id: str, points: int, meta: Meta, *, lot_id: str | None, matures_at: datetime | None = None
    ) -> uuid.UUID:
        """Credits a new lot; `lot_id` defaults to the transaction id (what a clawback then names)."""
        check_customer_account(account_id)
        pending = matures_at is not None and matures_at > self.now
        bucket: Bucket = "pending" if pending else "available"
        txn = uuid.uuid4()
        lot_id = lot_id or str(txn)
        self._transaction(
            meta,
            [(shard(ISSUANCE, account_id), "available", -points, None), (account_id, bucket, points, lot_id)],
            txn=txn,
        )
        lot = self._credit_lot(lot_id, account_id, points, self.policy.expires_at(self.now), matures_at=matures_at)
        if not lot.pending:
            self._pay_debt(account_id, [lot], points)
        return txn

    def redeem(self, account_id: str, points: int, meta: Meta) -> uuid.UUID:
        self.account(account_id).check_available(points)
        self._consume(account_id, points)
        return self._transaction(
            meta, [(account_id, "available", -points, None), (shard(REDEMPTION, account_id), "available", points, None)]
        )

    def reserve(self, hold: HoldState, meta: Meta) -> uuid.UUID:
        self.account(hold.account_id).check_available(hold.points)
        hold.allocations = [[lot.lot_id, taken] for lot, taken in self._consume(hold.account_id, hold.points)]
        self.holds[hold.hold_id] = hold
        self.dirty_holds.add(hold.hold_id)
        return self._transaction(
            meta, [(hold.account_id, "available", -hold.points, None), (hold.account_id, "held", hold.points, None)]
        )

    def capture(self, hold: HoldState, points: int, meta: Meta) -> uuid.UUID:
        hold.check_active()
        # The timeout is checked here, not only by the task that releases expired holds later.
        if hold.expires_at <= self.now:
            raise HoldExpired(str(hold.hold_id), hold.expires_at.isoformat())
        if points > hold.points:
            raise CaptureExceedsHold(str(hold.hold_id), requested=points, held=hold.points)
        rest = hold.points - points
        # The allocations were taken earliest-expiry first; the capture keeps those, the rest goes back.
        restored = self._restore(hold.allocations, rest)
        self._close(hold, "captured", captured=points)
        txn = self._transaction(
            meta,
            [(hold.account_id, "held", -points, None), (shard(REDEMPTION, hold.account_id), "available", points, None)],
        )
        if rest:
            # A separate "release" transaction, so the redeemed counter only ever sees what was captured.
            self._transaction(
                replace(meta, kind="release"),
                [(hold.account_id, "held", -rest, None), (hold.account_id, "available", rest, None)],
            )
            self._pay_debt(hold.account_id, restored, rest)
        return txn

    def release(self, hold: HoldState, meta: Meta, *, status: Literal["voided", "expired"]) -> uuid.UUID:
        """Gives the held points back; a void after the hold's timeout releases it as expired, as the task
        would have (the points come back either way)."""
        hold.check_active()
        if status == "voided" and hold.expires_at <= self.now:
            status, meta = "expired", replace(meta, kind="hold_expired")
        restored = self._restore(hold.allocations, hold.points)
        self._close(hold, status, captured=0)
        txn = self._transaction(
            meta, [(hold.account_id, "held", -hold.points, None), (hold.account_id, "available", hold.points, None)]
        )
        # A clawback into debt may have come while the points were held: they pay it first, like any credit.
        self._pay_debt(hold.account_id, restored, hold.points)
        return txn

    def transfer(self, source: str, target: str, points: int, meta: Meta) -> uuid.UUID:
        check_customer_account(source)
        check_customer_account(target)
        if source == target:
            raise InvalidAccount(target, "is the source of the transfer; pick another account")
        self.account(source).check_available(points)
        taken = self._consume(source, points)
        txn = self._transaction(meta, [(source, "available", -points, None), (target, "available", points, None)])
        # The points keep their expiry dates: a transfer must not be a way to extend them.
        credited = [
            self._credit_lot(f"{txn}:{index}", target, amount, lot.expires_at)
            for index, (lot, amount) in enumerate(taken)
        ]
        self._pay_debt(target, credited, points)
        return txn

    def adjust(self, account_id: str, points: int, meta: Meta) -> uuid.UUID:
        check_customer_account(account_id)
        if points < 0:
            self.account(account_id).check_available(-points)
            self._consume(account_id, -points)
        txn = self._transaction(
            meta,
            [(account_id, "available", points, None), (shard(ADJUSTMENTS, account_id), "available", -points, None)],
        )
        if points > 0:
            self._pay_debt(
                account_id, [self._credit_lot(str(txn), account_id, points, self.policy.expires_at(self.now))], points
            )
        return txn

    def clawback(self, account_id: str, points: int, meta: Meta, *, original_lot_id: str) -> uuid.UUID:
        """Takes back at most what the original earn gave minus what clawbacks already took of it: pending
        points first, then available ones, each time from the original earn's lot first. What was already
        spent goes to the receivable account (the default policy), or drives the customer's available
        balance below zero (`negative_balance`)."""
        original = self.lots[original_lot_id]
        left = original.points - original.clawed_back
        if points > left:
            raise ClawbackExceedsEarn(original_lot_id, requested=points, earned=original.points, left=left)
        account = self.account(account_id)
        from_pending = min(points, account.pending)
        from_available = min(points - from_pending, max(account.available, 0))
        shortfall = points - from_pending - from_available
        self._consume(account_id, from_pending, pending=True, first=original_lot_id)
        self._consume(account_id, from_available, first=original_lot_id)
        postings: list[tuple[str, Bucket, int, str | None]] = []
        if from_pending:
            postings.append((account_id, "pending", -from_pending, original_lot_id))
        if from_available:
            postings.append((account_id, "available", -from_available, original_lot_id))
        postings.append((shard(ISSUANCE, account_id), "available", points, None))
        if shortfall:
            debtor = shard(RECEIVABLE, account_id) if self.policy.clawback_policy == "receivable" else account_id
            postings.append((debtor, "available", -shortfall, original_lot_id))
        original.clawed_back += points
        self.dirty_lots.add(original.lot_id)
        return self._transaction(meta, postings)

    def mature(self, lot: LotState, meta: Meta) -> uuid.UUID | None:
        if not lot.pending:
            return None
        lot.pending = False
        self.dirty_lots.add(lot.lot_id)
        if lot.remaining == 0:
            return None
        txn = self._transaction(
            meta,
            [
                (lot.account_id, "pending", -lot.remaining, lot.lot_id),
                (lot.account_id, "available", lot.remaining, lot.lot_id),
            ],
        )
        self._pay_debt(lot.account_id, [lot], lot.remaining)
        return txn

    def expire(self, lot: LotState, meta: Meta) -> uuid.UUID | None:
        if lot.pending or lot.remaining == 0 or lot.expires_at is None or lot.expires_at > self.now:
            return None
        points = lot.remaining
        lot.remaining = 0
        self.dirty_lots.add(lot.lot_id)
        return self._transaction(
            meta,
            [
                (lot.account_id, "available", -points, lot.lot_id),
                (shard(BREAKAGE, lot.account_id), "available", points, lot.lot_id),
            ],
        )

    def return_captured(self, hold: HoldState, points: int, meta: Meta, *, lot_prefix: str) -> uuid.UUID:
        """Gives back `points` of a captured hold (the order they paid part of was refunded): from the
        redemption account to available, in new lots that keep the expiry dates of the lots the hold took,
        the last taken first (a refund must not be a way to extend points)."""
        if hold.status != "captured":
            raise HoldNotActive(str(hold.hold_id), hold.status)
        txn = self._transaction(
            meta,
            [
                (shard(REDEMPTION, hold.account_id), "available", -points, None),
                (hold.account_id, "available", points, None),
            ],
        )
        credited: list[LotState] = []
        left = points
        for index, (lot_id, amount) in enumerate(reversed(hold.allocations)):
            if left == 0:
                break
            back = min(int(amount), left)
            left -= back
            expires_at = self.lots[str(lot_id)].expires_at
            credited.append(self._credit_lot(f"{lot_prefix}:{index}", hold.account_id, back, expires_at))
        assert left == 0, f"hold {hold.hold_id} gives back {left} points more than it took"
        self._pay_debt(hold.account_id, credited, points)
        return txn

    # --- helpers ----------------------------------------------------------------------------------

    def account(self, account_id: str) -> AccountState:
        return self.accounts[account_id]

    def _credit_lot(
        self,
        lot_id: str,
        account_id: str,
        points: int,
        expires_at: datetime | None,
        *,
        matures_at: datetime | None = None,
    ) -> LotState:
        pending = matures_at is not None and matures_at > self.now
        lot = LotState(lot_id, account_id, points, points, pending, matures_at, expires_at, self.now, is_new=True)
        self.lots[lot.lot_id] = lot
        self.dirty_lots.add(lot.lot_id)
        return lot

    def _pay_debt(self, account_id: str, lots: list[LotState], credited: int) -> None:
        # Under the negative_balance policy a credit (already posted) first pays off the debt the account had
        # before it, out of the lots it filled: only what the account holds above zero may sit in lots, so
        # lots never promise points the account does not have. Without a debt (always, under receivable)
        # nothing changes.
        debt = credited - self.account(account_id).available
        for lot in lots:
            if debt <= 0:
                return
            cut = min(lot.remaining, debt)
            lot.remaining -= cut
            self.dirty_lots.add(lot.lot_id)
            debt -= cut

    def _lots_of(self, account_id: str, *, pending: bool) -> list[LotState]:
        lots = [lot for lot in self.lots.values() if lot.account_id == account_id and lot.pending == pending]
        far = datetime.max.replace(tzinfo=UTC)
        return sorted(lots, key=lambda lot: (lot.expires_at or far, lot.created_at, lot.lot_id))

    def _consume(
        self, account_id: str, points: int, *, pending: bool = False, first: str | None = None
    ) -> list[tuple[LotState, int]]:
        """Takes `points` out of the account's lots, earliest expiry first (or lot `first` before all)."""
        lots = self._lots_of(account_id, pending=pending)
        if first is not None:
            lots.sort(key=lambda lot: lot.lot_id != first)
        taken: list[tuple[LotState, int]] = []
        left = points
        for lot in lots:
            if left == 0:
                break
            amount = min(lot.remaining, left)
            if amount:
                lot.remaining -= amount
                left -= amount
                taken.append((lot, amount))
                self.dirty_lots.add(lot.lot_id)
        # The bucket balance was checked before: lots always cover it, so a gap here is a bug.
        assert left == 0, f"lots of {account_id} short by {left} points"
        return taken

    def _restore(self, allocations: list[list[Any]], points: int) -> list[LotState]:
        """Gives the lots back what a hold took of them; returns those lots, in the order the hold took them."""
        left = points
        restored: list[LotState] = []
        for lot_id, amount in reversed(allocations):
            if left == 0:
                break
            back = min(int(amount), left)
            lot = self.lots[str(lot_id)]
            lot.remaining += back
            self.dirty_lots.add(lot.lot_id)
            restored.append(lot)
            left -= back
        restored.reverse()
        return restored

    def _close(self, hold: HoldState, status: str, *, captured: int) -> None:
        hold.status = status
        hold.captured = captured
        hold.closed_at = self.now
        self.dirty_holds.add(hold.hold_id)

    def _transaction(
        self, meta: Meta, postings: list[tuple[str, Bucket, int, str | None]], *, txn: uuid.UUID | None = None
    ) -> uuid.UUID:
        assert sum(p[2] for p in postings) == 0, f"unbalanced transaction {postings}"
        txn = txn or uuid.uuid4()
        for account_id, bucket, points, lot_id in postings:
            self._post(txn, account_id, bucket, points, meta, lot_id)
        return txn

    def _post(
        self, txn: uuid.UUID, account_id: str, bucket: Bucket, points: int, meta: Meta, lot_id: str | None
    ) -> None:
        entry: dict[str, Any] = {
            "entry_id": uuid.uuid4(),
            "transaction_id": txn,
            "tenant_id": self.tenant_id,
            "account_id": account_id,
            "bucket": bucket,
            "kind": meta.kind,
            "points": points,
            "source": meta.source,
            "event_id": meta.event_id,
            "member_id": meta.member_id,
            "ruleset_id": meta.ruleset_id,
            "ruleset_version": meta.ruleset_version,
            "breakdown": meta.breakdown,
            "reason": meta.reason,
            "actor_key_id": meta.actor_key_id,
            "reference_id": meta.reference_id,
            "lot_id": lot_id,
            "hold_id": meta.hold_id,
            "created_at": self.now,
        }
        self.entries.append(entry)
        if account_id in self.accounts:
            self._chain(entry)
        else:
            # A system account: no rule ever checks its balance, so the service locks it only at the
            # end (`seal`), keeping the time every writer of the tenant queues on it short.
            assert is_system(account_id), f"account {account_id} was not loaded"
            self.unsealed.append(entry)

    def _chain(self, entry: dict[str, Any]) -> None:
        account = self.accounts[entry["account_id"]]
        entry["balance_after"] = account.apply(entry["bucket"], entry["kind"], entry["points"])
        account.last_seq += 1
        entry["seq"] = account.last_seq
        entry["prev_hash"] = account.last_hash or GENESIS_HASH
        entry["hash"] = entry_hash(entry)
        account.last_hash = entry["hash"]
        self.touched.add(account.account_id)

    def unsealed_accounts(self) -> set[str]:
        return {entry["account_id"] for entry in self.unsealed}

    def seal(self, system_accounts: dict[str, AccountState]) -> None:
        """Books the postings on system accounts, now locked, in the order they were made."""
        self.accounts.update(system_accounts)
        for entry in self.unsealed:
            self._chain(entry)
        self.unsealed = []


# The side of zero each system account stays on: issuance only gives (clawbacks return at most what it
# gave), redemption and breakage only receive, receivable only owes; adjustments go either way.
SYSTEM_RANGE = {ISSUANCE: -1, REDEMPTION: 1, BREAKAGE: 1, RECEIVABLE: -1}


@dataclass(frozen=True)
class LotTotals:
    """An account's lots as verify sees them: what the open ones hold, and the ids of impossible ones."""

    available: int = 0
    pending: int = 0
    invalid: tuple[str, ...] = ()


def account_problems(account: AccountState, lots: LotTotals, held_by_holds: int) -> list[str]:
    """What an account's balances contradict besides its own entries: a customer's lots and holds, a
    system shard's id and range."""
    problems: list[str] = []
    if is_system(account.account_id):
        base, _, index = account.account_id.rpartition("/")
        if base not in SYSTEM_ACCOUNTS or not (len(index) == 2 and index.isdigit() and int(index) < SYSTEM_SHARDS):
            problems.append(f"not a shard of a system account (system:<name>/00 to /{SYSTEM_SHARDS - 1:02d})")
        side = SYSTEM_RANGE.get(base, 0)
        if account.available * side < 0:
            bound = "at most 0" if side < 0 else "at least 0"
            problems.append(f"available is {account.available}; {base} is {bound}")
        if account.pending or account.held:
            problems.append(f"a system account holds pending {account.pending} and held {account.held}, not 0")
        return problems
    if lots.invalid:
        problems.append(f"lots outside 0 <= remaining, clawed_back <= points: {', '.join(lots.invalid)}")
    if lots.available != max(account.available, 0):
        problems.append(f"open lots hold {lots.available} available points, the balance is {account.available}")
    if lots.pending != account.pending:
        problems.append(f"pending lots hold {lots.pending} points, the balance is {account.pending}")
    if held_by_holds != account.held:
        problems.append(f"active holds hold {held_by_holds} points, the balance is {account.held}")
    return problems


def replay(account_id: str, entries: list[dict[str, Any]]) -> tuple[AccountState, list[str]]:
    """Recomputes an account's balances and hash chain from its entries; returns the mismatches found."""
    state = AccountState(account_id)
    problems: list[str] = []
    for entry in entries:
        seq = entry["seq"]
        if seq != state.last_seq + 1:
            problems.append(f"entry {seq}: sequence gap after {state.last_seq}")
        if entry["prev_hash"] != (state.last_hash or GENESIS_HASH):
            problems.append(f"entry {seq}: prev_hash does not match the previous entry's hash")
        if entry_hash(entry) != entry["hash"]:
            problems.append(f"entry {seq}: content does not match its hash")
        after = state.apply(entry["bucket"], entry["kind"], entry["points"])
        if entry["balance_after"] != after:
            problems.append(f"entry {seq}: balance_after {entry['balance_after']} != recomputed {after}")
        state.last_seq = seq
        state.last_hash = entry["hash"]
    return state, problems
