import uuid
from datetime import datetime
from typing import Annotated, Any, Generic, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ledger.domain import ClawbackPolicy, ExpiryRule
from shared.events import MAX_POINTS, NO_NUL, Identifier, PositivePoints, Text, UtcDatetime

T = TypeVar("T")


def _nonzero(value: int) -> int:
    if value == 0:
        raise ValueError("an adjustment of 0 points changes nothing")
    return value


class Write(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EarnCreate(Write):
    points: PositivePoints
    member_id: Identifier | None = None
    matures_at: UtcDatetime | None = Field(default=None, description="Pending until then (the return window)")
    reason: Text | None = None


class ClawbackCreate(Write):
    original_earn: Identifier = Field(
        description="The earn to take points back from: its transaction id, or the command id of a Kafka earn"
    )
    points: PositivePoints
    reason: Text | None = None


class RedeemCreate(Write):
    points: PositivePoints
    member_id: Identifier | None = None
    reference: Identifier | None = Field(default=None, description="The partner's order or reward id")


class HoldCreate(Write):
    points: PositivePoints
    member_id: Identifier | None = None
    reference: Identifier | None = None
    timeout_seconds: Annotated[int, Field(gt=0, le=30 * 86400)] | None = Field(
        default=None, description="Default: the programme's hold timeout"
    )


class HoldCapture(Write):
    points: PositivePoints | None = Field(default=None, description="Default: the whole hold")


class TransferCreate(Write):
    to_account_id: Identifier
    points: PositivePoints
    reason: Text | None = None


class AdjustmentCreate(Write):
    points: Annotated[int, Field(strict=True, ge=-MAX_POINTS, le=MAX_POINTS), AfterValidator(_nonzero)]
    reason: Annotated[str, Field(min_length=3, max_length=2000, pattern=NO_NUL)]


class PolicyUpdate(Write):
    expiry_rule: ExpiryRule = "months_after_earn"
    expiry_months: Annotated[int, Field(ge=1, le=120)] = 12
    clawback_policy: ClawbackPolicy = Field(
        default="receivable",
        description="receivable: a customer never goes below zero, spent points are booked on "
        "system:receivable; negative_balance: the customer's available balance goes negative",
    )
    hold_timeout_seconds: Annotated[int, Field(gt=0, le=30 * 86400)] = 900


class Policy(PolicyUpdate):
    model_config = ConfigDict(from_attributes=True)


class Balance(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    account_id: str
    kind: str
    available: int
    pending: int
    held: int
    lifetime_earned: int
    redeemed: int
    expired: int
    as_of: datetime | None = None


class Entry(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    entry_id: uuid.UUID
    transaction_id: uuid.UUID
    account_id: str
    seq: int
    bucket: str
    kind: str
    points: int
    balance_after: int = Field(description="The bucket's balance after this entry")
    source: str
    event_id: str | None
    member_id: str | None
    ruleset_id: str | None
    ruleset_version: int | None
    breakdown: list[dict[str, Any]] | None
    reason: str | None
    actor_key_id: str | None
    reference_id: str | None
    lot_id: str | None
    hold_id: uuid.UUID | None
    created_at: datetime
    prev_hash: str
    hash: str


class Posted(BaseModel):
    """The outcome of a write: the ledger transaction and the account's balances after it."""

    transaction_id: uuid.UUID
    balance: Balance
    entries: list[Entry]


class Hold(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    hold_id: uuid.UUID
    account_id: str
    points: int
    captured: int
    status: str
    member_id: str | None
    reference: str | None
    expires_at: datetime
    created_at: datetime
    closed_at: datetime | None


class HoldPosted(Posted):
    hold: Hold


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null on the last page")


class ExpiringLot(BaseModel):
    expires_at: datetime
    points: int


class Expiring(BaseModel):
    account_id: str
    until: datetime
    points: int
    lots: list[ExpiringLot]


class Liability(BaseModel):
    tenant_id: str
    available: int
    pending: int
    held: int
    outstanding: int = Field(description="available + pending + held: points the programme may still have to honour")
    accounts: int


class Verification(BaseModel):
    account_id: str
    entries: int
    ok: bool
    problems: list[str]
    anchored_seq: int | None = Field(
        default=None,
        description="The seq of the chain head last anchored outside the database and found intact; entries "
        "after it are covered by the hash chain alone (null: not anchored yet)",
    )


class TenantVerification(BaseModel):
    tenant_id: str
    accounts: int = Field(description="accounts checked")
    entries: int = Field(description="entries replayed")
    ok: bool
    problems: list[str] = Field(description="what the tenant's books contradict as a whole")
    failed: list[Verification] = Field(description="the accounts with problems")


class AppliedCommand(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    command_id: str
    kind: str = Field(description="points.earn or points.clawback")
    received_at: datetime = Field(validation_alias="created_at")


class TaskRun(BaseModel):
    matured: int
    expired: int
    holds_released: int
