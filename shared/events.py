"""CloudEvents 1.0 envelope (structured JSON mode) and the versioned payload models of every event type.

The envelope's `type` names the event (`purchase.completed`), the `dataversion` extension its payload
version; together they select the payload model from `EVENT_TYPES`. Money is Decimal with an ISO 4217
currency, points are integers, times are timezone-aware UTC.

Bounds every producer's input meets (the JSON Schemas show them): money is finite, 0 to `MAX_MONEY` with
at most `MONEY_PLACES` decimals (it fits the Numeric(18, 4) columns); unit prices are finite, 0 to
`MAX_MONEY`, quantities finite, above 0 and up to `MAX_QUANTITY`; points commands carry 1 to `MAX_POINTS`
(the ledger's REST bound); a time lies from `EARLIEST` to before `LATEST` (anything else, the edges of
Python's range included, is a validation error); identifiers and texts hold no NUL. What depends on
settings or on the message around the event (future skew, the Kafka key) is checked by `shared.contract`.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from datetime import UTC, date, datetime
from decimal import Context, Decimal, Inexact, InvalidOperation
from typing import Annotated, Any, Generic, Literal, TypeAlias, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

SPEC_VERSION = "1.0"


MAX_MONEY = Decimal(10**12)
MONEY_PLACES = 4  # ISO 4217's most minor-unit digits
MAX_QUANTITY = Decimal(10**9)
MAX_POINTS = 10**12
# Lines of one purchase or refund: rule conditions run once per line, so their number bounds the work.
MAX_LINES = 1000

# Times outside these are refused: Python's own edges (where date arithmetic overflows, and which the
# database driver maps to -infinity/infinity, returned as naive datetimes) are far from any real event.
EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)
LATEST = datetime(9000, 1, 1, tzinfo=UTC)


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("timestamp must carry a timezone (UTC)")
    try:
        utc = value.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+01:00, 9999-12-31T23:59:59-01:00: no such UTC time
        utc = None
    if utc is None or not EARLIEST <= utc < LATEST:
        raise ValueError(f"timestamp must lie from {EARLIEST.date()} to before {LATEST.date()} (UTC)")
    return utc


_STRICT = Context(prec=40, traps=[Inexact, InvalidOperation])


def _decimal(*, gt: int | None = None, ge: int | None = None, le: Decimal, places: int) -> tuple[Any, Any]:
    """A bounded, finite Decimal with at most `places` decimals: the Field with the bounds (checked by
    pydantic, shown in the JSON Schemas) and the validator of the decimals."""
    scale = Decimal(1).scaleb(-places)

    def at_most_places(value: Decimal) -> Decimal:
        # On the hot path (~15 values per purchase): str() is the cheapest look at the exponent there is.
        text = str(value)
        dot = text.find(".")
        if "E" not in text and (dot < 0 or len(text) - dot - 1 <= places):
            return value
        # "19.990000", "0E-999999", "1E+3": the same value with its exponent in range (the database driver
        # cannot encode exponents like those), or an error when digits would be lost.
        try:
            return value.quantize(scale, context=_STRICT)
        except (Inexact, InvalidOperation):
            raise ValueError(f"at most {places} decimal places") from None

    low = f"more than {gt}" if gt is not None else f"at least {ge}"
    bounds = Field(
        gt=gt,
        ge=ge,
        le=le,
        allow_inf_nan=False,
        description=f"A finite decimal (a string, best), {low} and at most {le}, with at most {places} decimals",
    )
    return bounds, AfterValidator(at_most_places)


_MONEY = _decimal(ge=0, le=MAX_MONEY, places=MONEY_PLACES)

UtcDatetime = Annotated[datetime, AfterValidator(_utc)]
# Decimal travels as a JSON string so no float rounding can creep in between services. `Amount` is any
# such decimal (a total, a report's sum); `Money` is one amount a producer sends, within the bounds.
Amount = Annotated[Decimal, PlainSerializer(lambda d: str(d), return_type=str, when_used="json")]
Money = Annotated[Amount, _MONEY[0], _MONEY[1]]
# Unit prices and quantities reach no column and only feed a line's arithmetic (rounded to 28 digits):
# bounded and finite, their decimals are not checked (B2B unit prices go finer than a currency's minor
# unit, and the check costs on every line of every purchase).
UnitPrice = Annotated[
    Amount,
    Field(ge=0, le=MAX_MONEY, allow_inf_nan=False, description=f"A finite decimal, at least 0 and at most {MAX_MONEY}"),
]
Quantity = Annotated[
    Decimal,
    Field(
        gt=0, le=MAX_QUANTITY, allow_inf_nan=False, description=f"A finite decimal, more than 0, at most {MAX_QUANTITY}"
    ),
]
Currency = Annotated[str, Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code")]
MAX_IDENTIFIER = 200
# What caused a ledger entry: a short prefix ("request:", "command:", "task:") and an Identifier, so a
# 200-character Idempotency-Key or command id fits (the entries' source column has the same length).
MAX_SOURCE = MAX_IDENTIFIER + 50
# PostgreSQL text cannot hold NUL; a pattern also refuses a lone surrogate (which no encoder takes).
NO_NUL = r"^[^\x00]*$"
Identifier = Annotated[str, Field(min_length=1, max_length=MAX_IDENTIFIER, pattern=NO_NUL)]
EntrySource = Annotated[str, Field(min_length=1, max_length=MAX_SOURCE)]
Text = Annotated[str, Field(pattern=NO_NUL)]
# One bound for every way points enter the ledger: its REST writes and the Kafka commands.
PositivePoints = Annotated[int, Field(strict=True, gt=0, le=MAX_POINTS)]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Payload(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- purchases (loyalty.purchases.v1) -------------------------------------------------------------


class PurchaseLine(Payload):
    sku: Identifier
    category: Identifier
    quantity: Quantity
    unit_price: UnitPrice
    discount: Money = Decimal("0")
    gift_card: bool = False
    shipping: bool = False

    @model_validator(mode="after")
    def _not_negative(self) -> PurchaseLine:
        # A line's net (quantity x unit price - discount) is what earns points: it is never negative.
        if self.discount and self.discount > self.quantity * self.unit_price:
            raise ValueError("discount exceeds the line's quantity x unit_price")
        return self


class PurchaseCompleted(Payload):
    order_id: Identifier
    customer_id: Identifier = Field(description="The B2B customer (company)")
    member_id: Identifier | None = Field(default=None, description="The person who bought")
    channel: Literal["webshop", "erp", "sales_rep"]
    currency: Currency
    net_amount: Money
    gross_amount: Money
    lines: list[PurchaseLine] = Field(default_factory=list, max_length=MAX_LINES)
    ordered_at: UtcDatetime | None = None


class RefundedLine(Payload):
    sku: Identifier
    quantity: Quantity
    amount: Money


class PurchaseRefunded(Payload):
    refund_id: Identifier
    original_order_id: Identifier
    customer_id: Identifier
    currency: Currency
    amount: Money | None = Field(default=None, description="Refunded net amount, when not per line")
    lines: list[RefundedLine] = Field(default_factory=list, max_length=MAX_LINES)


# --- engagement (loyalty.engagement.v1) -----------------------------------------------------------


class ReviewPosted(Payload):
    review_id: Identifier
    customer_id: Identifier
    member_id: Identifier | None = None
    sku: Identifier | None = None
    rating: Annotated[int, Field(ge=1, le=5)]


class ReferralConverted(Payload):
    referral_id: Identifier
    customer_id: Identifier = Field(description="The referrer")
    referred_customer_id: Identifier
    member_id: Identifier | None = None


class SurveyAnswered(Payload):
    survey_id: Identifier
    customer_id: Identifier
    member_id: Identifier | None = None
    nps: Annotated[int, Field(ge=0, le=10)] | None = None
    effort_score: Annotated[int, Field(ge=1, le=7)] | None = None


class EventAttended(Payload):
    attendance_id: Identifier
    customer_id: Identifier
    member_id: Identifier | None = None
    event_name: Identifier


MAX_WALLET_DAYS = 3660


class WalletEstimated(Payload):
    """A customer's estimated total spend in the category over [period_start, period_end), from an ERP or an
    account manager: our net revenue of that period / the estimate is the share of wallet. A later estimate
    of the same customer and period replaces an earlier one."""

    customer_id: Identifier
    member_id: Identifier | None = None
    period_start: date
    period_end: date = Field(description="Exclusive")
    estimated_spend: Money
    currency: Currency

    @model_validator(mode="after")
    def _period(self) -> WalletEstimated:
        if not EARLIEST.date() <= self.period_start < self.period_end < LATEST.date():
            raise ValueError("period_start must be before period_end, both from 1900-01-01 to before 9000-01-01")
        if (self.period_end - self.period_start).days > MAX_WALLET_DAYS:
            raise ValueError(f"the period spans at most {MAX_WALLET_DAYS} days")
        return self


class CustomEngagement(Payload):
    """An engagement type that a ruleset declares (`type` = `custom.<name>`)."""

    model_config = ConfigDict(frozen=True, extra="allow")
    customer_id: Identifier
    member_id: Identifier | None = None


# --- points commands (loyalty.points-commands.v1) -------------------------------------------------


class RuleAward(Payload):
    rule_id: Identifier
    points: Annotated[int, Field(ge=-MAX_POINTS, le=MAX_POINTS)]
    explanation: Text


class EarnPoints(Payload):
    command_id: Identifier
    customer_id: Identifier
    member_id: Identifier | None = None
    points: PositivePoints
    source_event_id: Identifier
    matures_at: UtcDatetime | None = Field(default=None, description="Pending until then")
    ruleset_id: Identifier | None = None
    ruleset_version: int | None = None
    reason: Text | None = None
    # Last: the rules service writes the breakdown's JSON once, for its award row, and appends it here.
    breakdown: list[RuleAward] = Field(default_factory=list)


class ClawbackPoints(Payload):
    command_id: Identifier
    customer_id: Identifier
    original_command_id: Identifier
    points: PositivePoints
    source_event_id: Identifier
    reason: Text | None = None


# --- ledger entries (loyalty.ledger-entries.v1) ---------------------------------------------------


class LedgerEntryPosted(Payload):
    entry_id: Identifier
    transaction_id: Identifier
    account_id: Identifier
    customer_id: Identifier | None = None
    member_id: Identifier | None = None
    kind: Identifier
    points: int
    balance_after: int
    source: EntrySource | None = Field(
        default=None, description="What caused the entry: request:<Idempotency-Key>, command:<command id>, task:<job>"
    )
    created_at: UtcDatetime
    bucket: Literal["available", "pending", "held"] | None = Field(default=None, description="Which balance moved")
    sequence: int | None = Field(default=None, description="The entry's position in its account's hash chain")
    entry_hash: str | None = None
    prev_hash: str | None = None
    ruleset_id: Identifier | None = None
    ruleset_version: int | None = None
    reference_id: Identifier | None = Field(default=None, description="The original earn, hold reference, lot")


# --- chain anchors (loyalty.ledger-anchors.v1) ----------------------------------------------------

Sha256Hex = Annotated[str, Field(pattern="^[0-9a-f]{64}$")]


class ChainAnchored(Payload):
    """The head of one ledger account's hash chain, signed with a key the ledger's database does not hold."""

    account_id: Identifier
    sequence: int = Field(ge=1, le=2**31 - 1, description="The seq of the account's last entry when anchored")
    entry_hash: Sha256Hex = Field(description="That entry's hash (which covers every entry before it)")
    signed_at: UtcDatetime
    signature: Sha256Hex = Field(description="HMAC-SHA256 over tenant, account, sequence, hash and signed_at")


# --- customers (loyalty.customers.v1) -------------------------------------------------------------


class TierChanged(Payload):
    customer_id: Identifier
    # A default, because envelopes are serialised without None fields: a first tier must still decode.
    previous_tier: Text | None = None
    tier: Text
    reason: Text
    ruleset_id: Identifier | None = None
    ruleset_version: int | None = None


# The metrics service's value segments (its docs/segments.md defines them).
SegmentName: TypeAlias = Literal["ambassador", "loyal_passive", "price_shopper", "at_risk", "leaver", "new"]


class SegmentChanged(Payload):
    customer_id: Identifier
    previous_segment: SegmentName | None = None
    segment: SegmentName
    reason: Text


# --- rewards (loyalty.rewards.v1) -----------------------------------------------------------------


class RedemptionChanged(Payload):
    """A redemption order changed: reserved, confirmed, cancelled, expired, refunded (points given back for
    a refunded order) or its coupon consumed. `state` is the order's state after the change."""

    order_id: Identifier = Field(description="The redemption order")
    customer_id: Identifier
    member_id: Identifier | None = None
    reward_id: Identifier
    reward_kind: Literal["gift", "privilege", "discount", "coupon"]
    change: Literal["reserved", "confirmed", "cancelled", "expired", "refunded", "coupon_consumed"]
    state: Literal["reserved", "confirmed", "cancelled", "expired", "refunded"]
    points: PositivePoints = Field(description="The points the order costs")
    points_returned: Annotated[int, Field(ge=0, le=MAX_POINTS)] = Field(
        default=0, description="Points given back so far (refunds of the order the discount was used on)"
    )
    value: Money | None = Field(default=None, description="Money value of the reward (a discount's money off)")
    currency: Currency | None = None
    purchase_order_id: Identifier | None = Field(default=None, description="The webshop order a discount is for")
    occurred_at: UtcDatetime


# type -> {dataversion -> payload model}
EVENT_TYPES: dict[str, dict[int, type[Payload]]] = {
    "purchase.completed": {1: PurchaseCompleted},
    "purchase.refunded": {1: PurchaseRefunded},
    "review.posted": {1: ReviewPosted},
    "referral.converted": {1: ReferralConverted},
    "survey.answered": {1: SurveyAnswered},
    "event.attended": {1: EventAttended},
    "wallet.estimated": {1: WalletEstimated},
    "points.earn": {1: EarnPoints},
    "points.clawback": {1: ClawbackPoints},
    "ledger.entry.posted": {1: LedgerEntryPosted},
    "ledger.chain.anchored": {1: ChainAnchored},
    "tier.changed": {1: TierChanged},
    "segment.changed": {1: SegmentChanged},
    "redemption.changed": {1: RedemptionChanged},
}
CUSTOM_TYPE_PREFIX = "custom."

P = TypeVar("P", bound=Payload)


class CloudEvent(BaseModel, Generic[P]):
    """CloudEvents 1.0 structured-mode envelope; `tenantid` and `dataversion` are extension attributes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    specversion: Literal["1.0"] = "1.0"
    id: Identifier = Field(default_factory=lambda: str(uuid.uuid4()))
    source: Identifier
    type: Identifier
    time: UtcDatetime = Field(default_factory=utcnow)
    subject: Identifier | None = Field(default=None, description="The customer id")
    datacontenttype: Literal["application/json"] = "application/json"
    tenantid: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
    dataversion: Annotated[int, Field(ge=1)] = 1
    data: P

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in EVENT_TYPES and not value.startswith(CUSTOM_TYPE_PREFIX):
            raise ValueError(f"unknown event type {value!r}")
        return value

    @property
    def key(self) -> bytes:
        """The partition key `tenant:customer`, so one customer's events stay in order."""
        return f"{self.tenantid}:{self.subject or ''}".encode()

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


AnyEvent = CloudEvent[Any]


class EventDecodeError(ValueError):
    """The bytes are not a valid event; the message says why, for the DLQ, and `code` names the kind of
    fault with one of a few fixed words (a metric label): not_json, invalid, wrong_topic, empty."""

    def __init__(self, message: str, *, code: str = "invalid") -> None:
        super().__init__(message)
        self.code = code


def payload_model(event_type: str, version: int) -> type[Payload]:
    if event_type.startswith(CUSTOM_TYPE_PREFIX):
        return CustomEngagement
    versions = EVENT_TYPES.get(event_type)
    if versions is None:
        raise EventDecodeError(f"unknown event type {event_type!r}")
    model = versions.get(version)
    if model is None:
        raise EventDecodeError(f"unsupported dataversion {version} for {event_type!r} (known: {sorted(versions)})")
    return model


def carries(types: frozenset[str], event_type: str) -> bool:
    """Whether a topic carrying `types` accepts `event_type` (`custom.` in `types` admits every custom type)."""
    return event_type in types or (event_type.startswith(CUSTOM_TYPE_PREFIX) and CUSTOM_TYPE_PREFIX in types)


# pydantic keeps parametrised generics in a weak cache: without a strong reference `CloudEvent[Model]` is
# rebuilt (~100 µs) whenever it was collected, and even a cache hit costs ~1 µs. Every payload model's
# envelope is built once, here.
_ENVELOPES: dict[type[Payload], Any] = {}


def envelope_class(model: type[Payload]) -> Any:
    """`CloudEvent[model]`, built once per payload model."""
    envelope = _ENVELOPES.get(model)
    if envelope is None:
        envelope = _ENVELOPES[model] = CloudEvent[model]  # type: ignore[valid-type]
    return envelope


# Where a structured-mode event names its type and payload version. Only a guess of which model to try
# first: the validated event must carry exactly that type and version, or the full path decides.
_TYPE_GUESS = re.compile(rb'"type"\s*:\s*"([a-z0-9._-]{1,200})"')
_VERSION_GUESS = re.compile(rb'"dataversion"\s*:\s*([0-9]{1,9})\s*[,}]')


def _decode_fast(raw: bytes) -> CloudEvent[Any] | None:
    """Validates the bytes in one pass (pydantic parses the JSON itself, ~2x cheaper than json.loads and
    validating the dict). None when the guess does not hold; then `decode_event`'s full path runs."""
    found = _TYPE_GUESS.search(raw)
    if found is None:
        return None
    event_type = found.group(1).decode()
    version_found = _VERSION_GUESS.search(raw)
    if version_found is None and b'"dataversion"' in raw:
        return None  # not a plain integer: the full path says what is wrong with it
    version = int(version_found.group(1)) if version_found else 1
    try:
        event: CloudEvent[Any] = envelope_class(payload_model(event_type, version)).model_validate_json(raw)
    except Exception:  # any failure (a validator's OverflowError too): the full path says what is wrong
        return None
    # The model is chosen by (type, dataversion) alone: when the validated event has the guessed pair,
    # the full path would have chosen the same model for the same document.
    if event.type != event_type or event.dataversion != version:
        return None
    return event


def decode_event(raw: bytes | None, *, allowed_types: frozenset[str] | None = None) -> CloudEvent[Any]:
    """Parse and validate one structured-mode CloudEvent; raises EventDecodeError with the reason.

    Any failure on the way is the input's: hostile bytes raise more than JSONDecodeError (RecursionError
    on deep nesting, ValueError on integers of over 4,300 digits, OverflowError at the datetime edges)."""
    if raw is None:
        raise EventDecodeError("empty message (tombstone)", code="empty")
    event = _decode_fast(raw)
    if event is not None:
        if allowed_types is not None and not carries(allowed_types, event.type):
            raise EventDecodeError(f"event type {event.type!r} does not belong on this topic", code="wrong_topic")
        return event
    # The full path: every problem gets its precise reason.
    try:
        doc = json.loads(raw)
    except RecursionError as exc:
        raise EventDecodeError("not JSON: nested too deeply", code="not_json") from exc
    except Exception as exc:
        raise EventDecodeError(f"not JSON: {exc}", code="not_json") from exc
    if not isinstance(doc, dict):
        raise EventDecodeError("not a CloudEvent: the JSON document is not an object")
    event_type = doc.get("type")
    if not isinstance(event_type, str):
        raise EventDecodeError("not a CloudEvent: missing 'type'")
    if allowed_types is not None and not carries(allowed_types, event_type):
        raise EventDecodeError(f"event type {event_type!r} does not belong on this topic", code="wrong_topic")
    version = doc.get("dataversion", 1)
    if not isinstance(version, int):
        raise EventDecodeError("'dataversion' must be an integer")
    model = payload_model(event_type, version)
    try:
        validated: CloudEvent[Any] = envelope_class(model).model_validate(doc)
    except ValidationError as exc:
        raise EventDecodeError(f"invalid {_shown(event_type)} v{version}: {_summarise(exc)}") from exc
    except Exception as exc:  # a validator's own failure (OverflowError, RecursionError...)
        raise EventDecodeError(f"invalid {_shown(event_type)} v{version}: {type(exc).__name__}: {exc}") from exc
    return validated


def _summarise(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(_shown(str(p)) for p in e['loc']) or '<root>'}: {e['msg']}"
        for e in exc.errors(include_url=False, include_input=False)[:10]
    )


def _shown(text: str) -> str:
    """Text of the input as a reason may quote it: as is when plain, else escaped (a lone surrogate, say,
    could not be encoded in a DLQ header or a response)."""
    return text if text.isascii() and text.isprintable() else repr(text)


def make_event(
    event_type: str,
    data: Payload,
    *,
    tenant_id: str,
    source: str,
    subject: str | None = None,
    event_id: str | None = None,
    time: datetime | None = None,
) -> CloudEvent[Any]:
    fields: dict[str, Any] = {"type": event_type, "source": source, "tenantid": tenant_id, "data": data}
    if subject is None:
        subject = getattr(data, "customer_id", None)
    fields["subject"] = subject
    if event_id is not None:
        fields["id"] = event_id
    if time is not None:
        fields["time"] = time
    event: CloudEvent[Any] = envelope_class(type(data))(**fields)
    return event


# The payloads each topic carries, as types: a handler of a topic's batches gets `Inbound[<its union>]`
# (shared.consumer), which holds because the runner admits only `TOPIC_EVENT_TYPES` below (a test checks
# that each union has exactly the payload models of its topic's types).
PurchasesPayload: TypeAlias = PurchaseCompleted | PurchaseRefunded
EngagementPayload: TypeAlias = (
    ReviewPosted | ReferralConverted | SurveyAnswered | EventAttended | WalletEstimated | CustomEngagement
)
PointsCommand: TypeAlias = EarnPoints | ClawbackPoints
LedgerEntriesPayload: TypeAlias = LedgerEntryPosted
CustomersPayload: TypeAlias = TierChanged | SegmentChanged
RewardsPayload: TypeAlias = RedemptionChanged

# Which event types each topic carries; a consumer dead-letters anything else it finds there.
TOPIC_EVENT_TYPES: dict[str, frozenset[str]] = {
    "loyalty.purchases.v1": frozenset({"purchase.completed", "purchase.refunded"}),
    "loyalty.engagement.v1": frozenset(
        {
            "review.posted",
            "referral.converted",
            "survey.answered",
            "event.attended",
            "wallet.estimated",
            CUSTOM_TYPE_PREFIX,
        }
    ),
    "loyalty.points-commands.v1": frozenset({"points.earn", "points.clawback"}),
    "loyalty.ledger-entries.v1": frozenset({"ledger.entry.posted"}),
    "loyalty.customers.v1": frozenset({"tier.changed", "segment.changed"}),
    "loyalty.rewards.v1": frozenset({"redemption.changed"}),
}


# The longest business id the tracking rows hold (shared.tracking); a longer composite one is hashed.
MAX_BUSINESS_ID = 200


def business_id(event: CloudEvent[Any]) -> tuple[str, str] | None:
    """The business id an event names, as (field, value): processed once per tenant, whatever the event's id
    (shared.tracking refuses a second event naming it). None for a purchase (each service goes by its order
    id its own way), for a wallet estimate (a later one replaces it), for custom engagement (no id) and for a
    partial refund of a redemption order (an order may have several)."""
    data = event.data
    if isinstance(data, RedemptionChanged):
        return _redemption_change(data)
    if isinstance(data, PurchaseRefunded):
        return ("refund_id", data.refund_id)
    if isinstance(data, ReviewPosted):
        return ("review_id", data.review_id)
    if isinstance(data, ReferralConverted):
        return ("referral_id", data.referral_id)
    if isinstance(data, EventAttended):
        return ("attendance_id", data.attendance_id)
    if isinstance(data, SurveyAnswered):
        # A survey is answered by many: what counts once is one respondent's answer. JSON: ids may hold
        # any character, and no two triples may read the same.
        answer = json.dumps([data.survey_id, data.customer_id, data.member_id], separators=(",", ":"))
        return ("survey_answer", _bounded(answer, "survey"))
    return None


def _bounded(composite: str, prefix: str) -> str:
    """A composite business id as it is, or, longer than the tracking rows hold, `prefix` and its hash."""
    if len(composite) > MAX_BUSINESS_ID:
        return f"{prefix}-{hashlib.sha256(composite.encode()).hexdigest()[:32]}"
    return composite


def _redemption_change(data: RedemptionChanged) -> tuple[str, str] | None:
    # An order is reserved, confirmed, cancelled, expired, its coupon consumed and refunded in full at most once
    # (the ledger's state machine); partial refunds repeat and carry no id of their own.
    if data.change == "refunded" and data.state != "refunded":
        return None
    return ("redemption_change", _bounded(f"{data.change}:{data.order_id}", data.change))
