"""The ledger's pure `Book` without a database: a hypothesis state machine drives random operations on a
few customers of one tenant, as the service would (a fresh book per operation over the same accounts,
lots and holds; system postings sealed at the end), and checks the ledger's invariants after every step
against a model of the balances kept here, independently of the code under test:

- double entry: every transaction's postings sum to zero, and so do all balances together;
- each bucket's balance is the sum of its entries, and matches the model;
- under the receivable policy no customer's available balance goes below zero;
- each account's hash chain is continuous (seq 1..n, each entry linked to its predecessor's hash) and
  replays to the same balances;
- lots never go negative; an account's open lots hold exactly its pending points and its available
  points above zero;
- an operation that is refused changes nothing, and one applied twice (maturing a lot, expiring it,
  closing a hold) changes nothing the second time.
"""

from __future__ import annotations

import copy
import hashlib
import json
import uuid
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ledger.domain import (
    ADJUSTMENTS,
    BREAKAGE,
    GENESIS_HASH,
    HASHED_FIELDS,
    ISSUANCE,
    RECEIVABLE,
    REDEMPTION,
    AccountState,
    Book,
    Bucket,
    ClawbackPolicy,
    HoldState,
    LotState,
    LotTotals,
    Meta,
    Policy,
    account_problems,
    replay,
)
from ledger.errors import (
    CaptureExceedsHold,
    ClawbackExceedsEarn,
    HoldExpired,
    HoldNotActive,
    InsufficientPoints,
    InvalidAccount,
    LedgerError,
)

CUSTOMERS = ("c-1", "c-2", "c-3")
BUCKETS: tuple[Bucket, ...] = ("available", "pending", "held")
POINTS = st.integers(1, 500)
CUSTOMER = st.sampled_from(CUSTOMERS)
PICK = st.integers(0, 10_000)  # an index into whatever the rule picks from (lots, holds)
# How much to take from an account: part of its available points, all of them, more, or any amount.
SHARE = st.tuples(st.sampled_from(["part", "all", "over", "any"]), POINTS)


def _points(available: int, share: tuple[str, int]) -> int:
    how, n = share
    if how == "part":
        return 1 + n % max(available, 1)
    if how == "all":
        return max(available, 1)
    return max(available, 0) + n if how == "over" else n


def _hash(entry: dict[str, Any]) -> str:
    """The chain's hash, computed here: SHA-256 over the hashed fields, canonical JSON."""

    def canonical(value: Any) -> str:
        if isinstance(value, datetime):
            return value.astimezone(UTC).isoformat()
        assert isinstance(value, uuid.UUID)
        return str(value)

    doc = json.dumps([entry[name] for name in HASHED_FIELDS], default=canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(doc.encode()).hexdigest()


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = datetime(2026, 1, 15, 12, tzinfo=UTC)
        self.policy = Policy()
        self.accounts = {c: AccountState(c) for c in CUSTOMERS}
        self.lots: dict[str, LotState] = {}
        self.holds: dict[uuid.UUID, HoldState] = {}
        self.entries: list[dict[str, Any]] = []  # every entry posted, sealed
        # The model: balances per customer and bucket, and the net of each system account (all shards).
        self.model: dict[str, Counter[str]] = {c: Counter() for c in CUSTOMERS}
        self.system: Counter[str] = Counter()
        self.hold_points: dict[uuid.UUID, int] = {}  # the model's active holds
        self.clawed_back: Counter[str] = Counter()  # what clawbacks took back of each earn, by its lot id
        # Ids from a counter, and the book's own (transactions, entries) too: a failing run replays exactly.
        self.ids = 0
        self._uuids = mock.patch.object(uuid, "uuid4", self._uuid)
        self._uuids.start()

    def _uuid(self) -> uuid.UUID:
        self.ids += 1
        return uuid.UUID(int=self.ids)

    def teardown(self) -> None:
        self._uuids.stop()

    @initialize(clawback=st.sampled_from(["receivable", "negative_balance"]))
    def choose_policy(self, clawback: ClawbackPolicy) -> None:
        # A month's expiry, so that lots expire within a run.
        self.policy = Policy(expiry_months=1, clawback_policy=clawback)

    # --- plumbing ---------------------------------------------------------------------------------

    def _book(self) -> Book:
        """A book for one operation, over the state the service would load."""
        return Book("t-1", self.policy, self.now, self.accounts, lots=self.lots, holds=self.holds)

    def _save(self, book: Book) -> None:
        """What the service's `_save` does with the book: seal the system postings, keep the entries."""
        missing = {a: AccountState(a) for a in book.unsealed_accounts() if a not in self.accounts}
        book.seal(missing)
        assert not book.unsealed
        self.entries.extend(book.entries)

    def _snapshot(self) -> Any:
        return copy.deepcopy((self.accounts, self.lots, self.holds))

    def _refused(self, book: Book, error: type[LedgerError], operation: Any) -> None:
        """The operation raises `error` and leaves everything as it was."""
        before = self._snapshot()
        with pytest.raises(error):
            operation()
        assert book.entries == []
        assert book.unsealed == []
        assert self._snapshot() == before

    def _meta(self, kind: str, **fields: Any) -> Meta:
        return Meta(kind=kind, source="tests", **fields)

    # --- operations -------------------------------------------------------------------------------

    @rule(customer=CUSTOMER, points=POINTS, pending_days=st.none() | st.integers(1, 20))
    def earn(self, customer: str, points: int, pending_days: int | None) -> None:
        book = self._book()
        matures_at = None if pending_days is None else self.now + timedelta(days=pending_days)
        book.earn(customer, points, self._meta("earn"), lot_id=f"cmd-{self._uuid().int:06d}", matures_at=matures_at)
        self._save(book)
        self.model[customer]["pending" if pending_days else "available"] += points
        self.system[ISSUANCE] -= points

    @rule(days=st.integers(1, 20))
    def advance_time(self, days: int) -> None:
        self.now += timedelta(days=days)

    @rule(minutes=st.integers(1, 30))
    def advance_minutes(self, minutes: int) -> None:
        # Less than a day: holds (15 minutes) are captured or voided around their timeout.
        self.now += timedelta(minutes=minutes)

    @rule(pick=PICK)
    def mature(self, pick: int) -> None:
        due = [lot for lot in self.lots.values() if lot.pending and lot.matures_at and lot.matures_at <= self.now]
        if not due:
            return
        lot = due[pick % len(due)]
        moved = lot.remaining
        book = self._book()
        book.mature(lot, self._meta("mature"))
        self._save(book)
        model = self.model[lot.account_id]
        model["pending"] -= moved
        model["available"] += moved
        assert not lot.pending
        # Twice: nothing more happens.
        before = self._snapshot()
        again = self._book()
        assert again.mature(lot, self._meta("mature")) is None
        assert again.entries == []
        assert self._snapshot() == before

    @rule(pick=PICK)
    def expire(self, pick: int) -> None:
        if not self.lots:
            return
        lot = list(self.lots.values())[pick % len(self.lots)]
        due = not lot.pending and lot.expires_at is not None and lot.expires_at <= self.now
        points = lot.remaining if due else 0
        book = self._book()
        txn = book.expire(lot, self._meta("expire"))
        self._save(book)
        assert (txn is not None) == (points > 0)
        self.model[lot.account_id]["available"] -= points
        self.system[BREAKAGE] += points
        before = self._snapshot()
        again = self._book()
        assert again.expire(lot, self._meta("expire")) is None
        assert again.entries == []
        assert self._snapshot() == before

    @rule(customer=CUSTOMER, share=SHARE)
    def redeem(self, customer: str, share: tuple[str, int]) -> None:
        points = _points(self.model[customer]["available"], share)
        book = self._book()
        if self.model[customer]["available"] < points:
            self._refused(book, InsufficientPoints, lambda: book.redeem(customer, points, self._meta("redeem")))
            return
        book.redeem(customer, points, self._meta("redeem"))
        self._save(book)
        self.model[customer]["available"] -= points
        self.system[REDEMPTION] += points

    @rule(customer=CUSTOMER, share=SHARE)
    def hold(self, customer: str, share: tuple[str, int]) -> None:
        points = _points(self.model[customer]["available"], share)
        hold = HoldState(
            hold_id=self._uuid(),
            account_id=customer,
            points=points,
            captured=0,
            status="active",
            allocations=[],
            member_id=None,
            reference=None,
            expires_at=self.now + timedelta(minutes=15),
            created_at=self.now,
        )
        book = self._book()
        meta = self._meta("hold", hold_id=hold.hold_id)
        if self.model[customer]["available"] < points:
            self._refused(book, InsufficientPoints, lambda: book.reserve(hold, meta))
            return
        book.reserve(hold, meta)
        self._save(book)
        self.model[customer]["available"] -= points
        self.model[customer]["held"] += points
        self.hold_points[hold.hold_id] = points

    def _a_hold(self, pick: int) -> HoldState:
        holds = sorted(self.holds)
        return self.holds[holds[pick % len(holds)]]

    @precondition(lambda self: self.holds)
    @rule(pick=PICK, extra=st.integers(-500, 2))
    def capture(self, pick: int, extra: int) -> None:
        hold = self._a_hold(pick)
        book = self._book()
        meta = self._meta("capture", hold_id=hold.hold_id)
        if hold.hold_id not in self.hold_points:
            self._refused(book, HoldNotActive, lambda: book.capture(hold, 1, meta))
            return
        held = self.hold_points[hold.hold_id]
        points = max(held + extra, 1)
        if hold.expires_at <= self.now:
            self._refused(book, HoldExpired, lambda: book.capture(hold, points, meta))
            return
        if points > held:
            self._refused(book, CaptureExceedsHold, lambda: book.capture(hold, points, meta))
            return
        book.capture(hold, points, meta)
        self._save(book)
        model = self.model[hold.account_id]
        model["held"] -= held
        model["available"] += held - points
        self.system[REDEMPTION] += points
        del self.hold_points[hold.hold_id]
        assert (hold.status, hold.captured) == ("captured", points)
        # Twice: refused, nothing changes.
        again = self._book()
        self._refused(again, HoldNotActive, lambda: again.capture(hold, points, meta))

    @precondition(lambda self: self.holds)
    @rule(pick=PICK, status=st.sampled_from(["voided", "expired"]))
    def release(self, pick: int, status: Any) -> None:
        hold = self._a_hold(pick)
        book = self._book()
        meta = self._meta("void", hold_id=hold.hold_id)
        if hold.hold_id not in self.hold_points:
            self._refused(book, HoldNotActive, lambda: book.release(hold, meta, status=status))
            return
        expired = hold.expires_at <= self.now
        book.release(hold, meta, status=status)
        self._save(book)
        held = self.hold_points.pop(hold.hold_id)
        self.model[hold.account_id]["held"] -= held
        self.model[hold.account_id]["available"] += held
        # A void after the timeout releases the hold as expired, as the task would.
        assert hold.status == ("expired" if expired else status)
        if status == "voided":
            assert {e["kind"] for e in book.entries} == {"hold_expired" if expired else "void"}
        again = self._book()
        self._refused(again, HoldNotActive, lambda: again.release(hold, meta, status=status))

    @rule(source=CUSTOMER, to=CUSTOMER, share=SHARE)
    def transfer(self, source: str, to: str, share: tuple[str, int]) -> None:
        target, points = to, _points(self.model[source]["available"], share)
        book = self._book()
        meta = self._meta("transfer")
        if source == target:
            self._refused(book, InvalidAccount, lambda: book.transfer(source, target, points, meta))
            return
        if self.model[source]["available"] < points:
            self._refused(book, InsufficientPoints, lambda: book.transfer(source, target, points, meta))
            return
        book.transfer(source, target, points, meta)
        self._save(book)
        self.model[source]["available"] -= points
        self.model[target]["available"] += points

    @rule(customer=CUSTOMER, share=SHARE, debit=st.booleans())
    def adjust(self, customer: str, share: tuple[str, int], debit: bool) -> None:
        points = -_points(self.model[customer]["available"], share) if debit else share[1]
        book = self._book()
        meta = self._meta("adjustment")
        if points < 0 and self.model[customer]["available"] < -points:
            self._refused(book, InsufficientPoints, lambda: book.adjust(customer, points, meta))
            return
        book.adjust(customer, points, meta)
        self._save(book)
        self.model[customer]["available"] += points
        self.system[ADJUSTMENTS] -= points

    @rule(pick=PICK, share=SHARE)
    def clawback(self, pick: int, share: tuple[str, int]) -> None:
        # The original earn: any lot an earn created (named by its command id), as the service requires.
        originals = sorted(lot_id for lot_id in self.lots if lot_id.startswith("cmd-"))
        if not originals:
            return
        original = self.lots[originals[pick % len(originals)]]
        customer = original.account_id
        model = self.model[customer]
        points = _points(model["pending"] + max(model["available"], 0), share)
        left = original.points - self.clawed_back[original.lot_id]
        book = self._book()
        meta = self._meta("clawback")
        if points > left:
            lot_id = original.lot_id
            self._refused(
                book, ClawbackExceedsEarn, lambda: book.clawback(customer, points, meta, original_lot_id=lot_id)
            )
            return
        self.clawed_back[original.lot_id] += points
        from_pending = min(points, model["pending"])
        from_available = min(points - from_pending, max(model["available"], 0))
        shortfall = points - from_pending - from_available
        book.clawback(customer, points, meta, original_lot_id=original.lot_id)
        self._save(book)
        model["pending"] -= from_pending
        model["available"] -= from_available
        self.system[ISSUANCE] += points
        if self.policy.clawback_policy == "receivable":
            self.system[RECEIVABLE] -= shortfall
        else:
            model["available"] -= shortfall

    # --- invariants -------------------------------------------------------------------------------

    @invariant()
    def double_entry(self) -> None:
        by_transaction: dict[uuid.UUID, int] = defaultdict(int)
        for entry in self.entries:
            by_transaction[entry["transaction_id"]] += entry["points"]
        assert all(total == 0 for total in by_transaction.values()), by_transaction
        assert sum(a.available + a.pending + a.held for a in self.accounts.values()) == 0

    @invariant()
    def balances_match_the_model_and_the_entries(self) -> None:
        per_bucket: dict[tuple[str, str], int] = defaultdict(int)
        for entry in self.entries:
            per_bucket[(entry["account_id"], entry["bucket"])] += entry["points"]
        for account_id, account in self.accounts.items():
            for bucket in BUCKETS:
                assert account.bucket(bucket) == per_bucket[(account_id, bucket)], (account_id, bucket)
        for customer in CUSTOMERS:
            account = self.accounts[customer]
            assert (account.available, account.pending, account.held) == tuple(self.model[customer][b] for b in BUCKETS)
            assert account.pending >= 0
            assert account.held >= 0
            if self.policy.clawback_policy == "receivable":
                assert account.available >= 0, "no overdraft under the receivable policy"
        system: Counter[str] = Counter()
        for account_id, account in self.accounts.items():
            if account_id.startswith("system:"):
                assert account.pending == account.held == 0
                system[account_id.rsplit("/", 1)[0]] += account.available
        assert {k: v for k, v in system.items() if v} == {k: v for k, v in self.system.items() if v}

    @invariant()
    def hash_chains_are_continuous(self) -> None:
        by_account: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for entry in self.entries:
            by_account[entry["account_id"]].append(entry)
        for account_id, account in self.accounts.items():
            chain = sorted(by_account[account_id], key=lambda e: e["seq"])
            assert [e["seq"] for e in chain] == list(range(1, len(chain) + 1))
            previous = GENESIS_HASH
            for entry in chain:
                assert entry["prev_hash"] == previous
                assert entry["hash"] == _hash(entry)
                previous = entry["hash"]
            assert (account.last_seq, account.last_hash or GENESIS_HASH) == (len(chain), previous)
            replayed, problems = replay(account_id, chain)
            assert problems == []
            assert [replayed.bucket(b) for b in BUCKETS] == [account.bucket(b) for b in BUCKETS]
            assert (replayed.lifetime_earned, replayed.redeemed, replayed.expired) == (
                account.lifetime_earned,
                account.redeemed,
                account.expired,
            )

    @invariant()
    def lots_cover_the_balances(self) -> None:
        assert all(0 <= lot.remaining <= lot.points for lot in self.lots.values() if lot.lot_id.startswith("cmd-"))
        assert all(lot.remaining >= 0 for lot in self.lots.values())
        for customer in CUSTOMERS:
            account = self.accounts[customer]
            lots = [lot for lot in self.lots.values() if lot.account_id == customer]
            assert sum(lot.remaining for lot in lots if lot.pending) == account.pending
            available_lots = sum(lot.remaining for lot in lots if not lot.pending)
            # What the account holds above zero (under negative_balance, a debt is paid before lots fill).
            assert available_lots == max(account.available, 0)

    @invariant()
    def system_shards_stay_in_their_range(self) -> None:
        # Issuance only gives (a clawback returns at most what its earn took), redemption and breakage
        # only receive, receivable only owes.
        for account_id, account in self.accounts.items():
            base = account_id.rsplit("/", 1)[0]
            if base in (ISSUANCE, RECEIVABLE):
                assert account.available <= 0, account_id
            elif base in (REDEMPTION, BREAKAGE):
                assert account.available >= 0, account_id
        for lot_id, clawed in self.clawed_back.items():
            assert clawed == self.lots[lot_id].clawed_back <= self.lots[lot_id].points

    @invariant()
    def verify_finds_nothing(self) -> None:
        # What `verify` checks besides the chain, over the state the service would read.
        for account_id, account in self.accounts.items():
            lots = [lot for lot in self.lots.values() if lot.account_id == account_id]
            totals = LotTotals(
                available=sum(lot.remaining for lot in lots if not lot.pending),
                pending=sum(lot.remaining for lot in lots if lot.pending),
            )
            held = sum(h.points for h in self.holds.values() if h.account_id == account_id and h.status == "active")
            assert account_problems(account, totals, held) == [], account_id

    @invariant()
    def holds_match_the_model(self) -> None:
        active = {h.hold_id: h.points for h in self.holds.values() if h.status == "active"}
        assert active == self.hold_points
        for hold in self.holds.values():
            assert sum(int(taken) for _, taken in hold.allocations) == hold.points


TestLedgerBook = LedgerMachine.TestCase
TestLedgerBook.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_an_account_tampered_with_is_caught_by_the_chain_check() -> None:
    # The chain check above can fail: an entry changed after the fact no longer matches its hash.
    book = Book("t-1", Policy(), datetime(2026, 1, 1, tzinfo=UTC), {"c-1": AccountState("c-1")})
    book.earn("c-1", 10, Meta(kind="earn", source="tests"), lot_id="cmd-1")
    book.earn("c-1", 5, Meta(kind="earn", source="tests"), lot_id="cmd-2")
    chain = [e for e in book.entries if e["account_id"] == "c-1"]
    assert replay("c-1", chain)[1] == []
    chain[0]["points"] = 11
    assert _hash(chain[0]) != chain[0]["hash"]
    assert replay("c-1", chain)[1]


def test_a_hold_released_after_a_clawback_into_debt_leaves_no_lot_above_the_balance() -> None:
    # Under the negative_balance policy lots should never promise points the account does not have
    # (`Book._settle_debt`). A hold's release puts its points back into its lots without settling the
    # debt, so those points can later expire (into breakage) or be spent although the balance is zero.
    now = datetime(2026, 1, 1, tzinfo=UTC)
    accounts = {"c-1": AccountState("c-1")}
    book = Book("t-1", Policy(clawback_policy="negative_balance"), now, accounts)
    book.earn("c-1", 100, Meta(kind="earn", source="tests"), lot_id="cmd-1")
    hold = HoldState(uuid.uuid4(), "c-1", 100, 0, "active", [], None, None, now + timedelta(minutes=15), now)
    book.reserve(hold, Meta(kind="hold", source="tests"))
    book.clawback("c-1", 100, Meta(kind="clawback", source="tests"), original_lot_id="cmd-1")
    book.release(hold, Meta(kind="void", source="tests"), status="voided")
    assert accounts["c-1"].available == 0
    assert book.lots["cmd-1"].remaining == 0


def test_the_rest_of_a_partial_capture_after_a_clawback_into_debt_pays_the_debt_first() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    accounts = {"c-1": AccountState("c-1")}
    book = Book("t-1", Policy(clawback_policy="negative_balance"), now, accounts)
    book.earn("c-1", 100, Meta(kind="earn", source="tests"), lot_id="cmd-1")
    hold = HoldState(uuid.uuid4(), "c-1", 100, 0, "active", [], None, None, now + timedelta(minutes=15), now)
    book.reserve(hold, Meta(kind="hold", source="tests"))
    book.clawback("c-1", 70, Meta(kind="clawback", source="tests"), original_lot_id="cmd-1")
    book.capture(hold, 40, Meta(kind="redeem", source="tests"))
    # 60 points come back against a debt of 70: the balance is -10 and no lot promises anything.
    assert accounts["c-1"].available == -10
    assert book.lots["cmd-1"].remaining == 0


def _book(policy: Policy, now: datetime) -> tuple[Book, dict[str, AccountState]]:
    accounts = {"c-1": AccountState("c-1")}
    return Book("t-1", policy, now, accounts), accounts


def test_a_clawback_takes_back_at_most_what_its_earn_gave() -> None:
    # The finding: three clawbacks of 100 and one of 1,000,000 against a 100-point earn were all accepted.
    book, accounts = _book(Policy(), datetime(2026, 1, 1, tzinfo=UTC))
    book.earn("c-1", 100, Meta(kind="earn", source="tests"), lot_id="cmd-1")
    book.earn("c-1", 500, Meta(kind="earn", source="tests"), lot_id="cmd-2")
    book.clawback("c-1", 60, Meta(kind="clawback", source="tests"), original_lot_id="cmd-1")
    book.clawback("c-1", 40, Meta(kind="clawback", source="tests"), original_lot_id="cmd-1")
    for points in (1, 100, 1_000_000):
        with pytest.raises(ClawbackExceedsEarn, match="it gave 100, 100 were clawed back already, 0 are left"):
            book.clawback("c-1", points, Meta(kind="clawback", source="tests"), original_lot_id="cmd-1")
    # The other earn's points are the customer's; the earn's own lot paid the clawbacks.
    assert accounts["c-1"].available == 500
    assert (book.lots["cmd-1"].remaining, book.lots["cmd-2"].remaining) == (0, 500)
    assert book.lots["cmd-1"].clawed_back == 100
    book.seal({a: AccountState(a) for a in book.unsealed_accounts()})
    issuance = [e for e in book.entries if e["account_id"].startswith(ISSUANCE)]
    assert sum(e["points"] for e in issuance) == -500  # never more taken back than issued


def test_a_hold_cannot_be_captured_after_its_timeout_and_a_void_releases_it_as_expired() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    book, accounts = _book(Policy(), now)
    book.earn("c-1", 100, Meta(kind="earn", source="tests"), lot_id="cmd-1")
    hold = HoldState(uuid.uuid4(), "c-1", 60, 0, "active", [], None, None, now + timedelta(minutes=15), now)
    book.reserve(hold, Meta(kind="hold", source="tests"))
    late = Book("t-1", Policy(), now + timedelta(minutes=15), accounts, lots=book.lots, holds=book.holds)
    with pytest.raises(HoldExpired):
        late.capture(hold, 60, Meta(kind="capture", source="tests"))
    assert (hold.status, accounts["c-1"].held, late.entries) == ("active", 60, [])
    late.release(hold, Meta(kind="void", source="tests"), status="voided")
    assert (hold.status, accounts["c-1"].available, accounts["c-1"].held) == ("expired", 100, 0)
    assert {e["kind"] for e in late.entries} == {"hold_expired"}


class TestAccountProblems:
    """The checks `verify` adds to the chain, on states the Book never produces (tampered or legacy data)."""

    def test_a_customer_whose_lots_or_holds_disagree_with_its_balances(self) -> None:
        account = AccountState("c-1", available=100, pending=20, held=30)
        assert account_problems(account, LotTotals(100, 20), 30) == []
        assert account_problems(account, LotTotals(150, 20, ("cmd-9",)), 0) == [
            "lots outside 0 <= remaining, clawed_back <= points: cmd-9",
            "open lots hold 150 available points, the balance is 100",
            "active holds hold 0 points, the balance is 30",
        ]
        # In debt (negative_balance), lots hold nothing: the finding's transfer left them above the balance.
        debtor = AccountState("c-2", available=-40)
        assert account_problems(debtor, LotTotals(0, 0), 0) == []
        assert account_problems(debtor, LotTotals(25, 0), 0) == [
            "open lots hold 25 available points, the balance is -40"
        ]

    def test_a_system_shard_outside_its_range(self) -> None:
        # The finding: the receivable shard at -999,700 is in range, issuance above zero is not.
        assert account_problems(AccountState(f"{RECEIVABLE}/03", available=-999_700), LotTotals(), 0) == []
        assert account_problems(AccountState(f"{ISSUANCE}/03", available=300), LotTotals(), 0) == [
            "available is 300; system:issuance is at most 0"
        ]
        assert account_problems(AccountState(f"{BREAKAGE}/15", available=-1), LotTotals(), 0) == [
            "available is -1; system:breakage is at least 0"
        ]
        for bad in (f"{REDEMPTION}/16", f"{REDEMPTION}/7", "system:bonus/01", f"{REDEMPTION}"):
            assert account_problems(AccountState(bad), LotTotals(), 0) == [
                "not a shard of a system account (system:<name>/00 to /15)"
            ], bad
        assert account_problems(AccountState(f"{ADJUSTMENTS}/00", available=-5, held=5), LotTotals(), 0) == [
            "a system account holds pending 0 and held 5, not 0"
        ]


def test_a_two_lot_transfer_into_an_account_in_debt_pays_the_debt_once_over_both_lots() -> None:
    # The finding: each lot was capped against the whole new balance, so the lots held more than the balance.
    now = datetime(2026, 1, 1, tzinfo=UTC)
    accounts = {"c-1": AccountState("c-1"), "c-2": AccountState("c-2")}
    book = Book("t-1", Policy(clawback_policy="negative_balance"), now, accounts)
    book.earn("c-1", 100, Meta(kind="earn", source="tests"), lot_id="cmd-1")
    book.redeem("c-1", 100, Meta(kind="redeem", source="tests"))
    book.clawback("c-1", 100, Meta(kind="clawback", source="tests"), original_lot_id="cmd-1")  # c-1 owes 100
    book.earn("c-2", 80, Meta(kind="earn", source="tests"), lot_id="cmd-2")
    later = Book("t-1", book.policy, now + timedelta(days=40), accounts, lots=book.lots)
    later.earn("c-2", 70, Meta(kind="earn", source="tests"), lot_id="cmd-3")
    later.transfer("c-2", "c-1", 150, Meta(kind="transfer", source="tests"))
    assert accounts["c-1"].available == 50
    into = [lot for lot in later.lots.values() if lot.account_id == "c-1" and lot.lot_id != "cmd-1"]
    assert sorted(lot.points for lot in into) == [70, 80]
    assert sum(lot.remaining for lot in into) == 50  # not 80 + 50: the debt of 100 is paid once
    assert account_problems(accounts["c-1"], LotTotals(available=50), 0) == []
