"""CloudEvents 1.0 envelope (structured JSON mode) and the versioned payload models of every event type.

The envelope's `type` names the event (`purchase.completed`), the `dataversion` extension its payload
version; together they select the payload model from `EVENT_TYPES`. Money is Decimal with an ISO 4217
currency, points are integers, times are timezone-aware UTC.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
)

SPEC_VERSION = "1.0"


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("timestamp must carry a timezone (UTC)")
    return value.astimezone(UTC)


UtcDatetime = Annotated[datetime, AfterValidator(_utc)]
# Decimal travels as a JSON string so no float rounding can creep in between services.
Money = Annotated[Decimal, PlainSerializer(lambda d: str(d), return_type=str, when_used="json")]
Currency = Annotated[str, Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code")]
MAX_IDENTIFIER = 200
# What caused a ledger entry: a short prefix ("request:", "command:", "task:") and an Identifier, so a
# 200-character Idempotency-Key or command id fits (the entries' source column has the same length).
MAX_SOURCE = MAX_IDENTIFIER + 50
Identifier = Annotated[str, Field(min_length=1, max_length=MAX_IDENTIFIER)]
EntrySource = Annotated[str, Field(min_length=1, max_length=MAX_SOURCE)]
Points = Annotated[int, Field(strict=True)]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Payload(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- purchases (loyalty.purchases.v1) -------------------------------------------------------------


class PurchaseLine(Payload):
    sku: Identifier
    category: Identifier
    quantity: Annotated[Decimal, Field(gt=0)]
    unit_price: Money
    discount: Money = Decimal("0")
    gift_card: bool = False
    shipping: bool = False


class PurchaseCompleted(Payload):
    order_id: Identifier
    customer_id: Identifier = Field(description="The B2B customer (company)")
    member_id: Identifier | None = Field(default=None, description="The person who bought")
    channel: Literal["webshop", "erp", "sales_rep"]
    currency: Currency
    net_amount: Money
    gross_amount: Money
    lines: list[PurchaseLine] = Field(default_factory=list)
    ordered_at: UtcDatetime | None = None


class RefundedLine(Payload):
    sku: Identifier
    quantity: Annotated[Decimal, Field(gt=0)]
    amount: Money


class PurchaseRefunded(Payload):
    refund_id: Identifier
    original_order_id: Identifier
    customer_id: Identifier
    currency: Currency
    amount: Money | None = Field(default=None, description="Refunded net amount, when not per line")
    lines: list[RefundedLine] = Field(default_factory=list)


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


class CustomEngagement(Payload):
    """An engagement type that a ruleset declares (`type` = `custom.<name>`)."""

    model_config = ConfigDict(frozen=True, extra="allow")
    customer_id: Identifier
    member_id: Identifier | None = None


# --- points commands (loyalty.points-commands.v1) -------------------------------------------------


class RuleAward(Payload):
    rule_id: Identifier
    points: int
    explanation: str


class EarnPoints(Payload):
    command_id: Identifier
    customer_id: Identifier
    member_id: Identifier | None = None
    points: Annotated[int, Field(gt=0)]
    source_event_id: Identifier
    matures_at: UtcDatetime | None = Field(default=None, description="Pending until then")
    ruleset_id: Identifier | None = None
    ruleset_version: int | None = None
    reason: str | None = None
    # Last: the rules service writes the breakdown's JSON once, for its award row, and appends it here.
    breakdown: list[RuleAward] = Field(default_factory=list)


class ClawbackPoints(Payload):
    command_id: Identifier
    customer_id: Identifier
    original_command_id: Identifier
    points: Annotated[int, Field(gt=0)]
    source_event_id: Identifier
    reason: str | None = None


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


# --- customers (loyalty.customers.v1) -------------------------------------------------------------


class TierChanged(Payload):
    customer_id: Identifier
    # A default, because envelopes are serialised without None fields: a first tier must still decode.
    previous_tier: str | None = None
    tier: str
    reason: str
    ruleset_id: Identifier | None = None
    ruleset_version: int | None = None


class SegmentChanged(Payload):
    customer_id: Identifier
    previous_segment: str | None = None
    segment: Literal["ambassador", "loyal_passive", "price_shopper", "leaver", "new"]
    reason: str


# type -> {dataversion -> payload model}
EVENT_TYPES: dict[str, dict[int, type[Payload]]] = {
    "purchase.completed": {1: PurchaseCompleted},
    "purchase.refunded": {1: PurchaseRefunded},
    "review.posted": {1: ReviewPosted},
    "referral.converted": {1: ReferralConverted},
    "survey.answered": {1: SurveyAnswered},
    "event.attended": {1: EventAttended},
    "points.earn": {1: EarnPoints},
    "points.clawback": {1: ClawbackPoints},
    "ledger.entry.posted": {1: LedgerEntryPosted},
    "tier.changed": {1: TierChanged},
    "segment.changed": {1: SegmentChanged},
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


# Which event types each topic carries; a consumer dead-letters anything else it finds there.
TOPIC_EVENT_TYPES: dict[str, frozenset[str]] = {
    "loyalty.purchases.v1": frozenset({"purchase.completed", "purchase.refunded"}),
    "loyalty.engagement.v1": frozenset(
        {"review.posted", "referral.converted", "survey.answered", "event.attended", CUSTOM_TYPE_PREFIX}
    ),
    "loyalty.points-commands.v1": frozenset({"points.earn", "points.clawback"}),
    "loyalty.ledger-entries.v1": frozenset({"ledger.entry.posted"}),
    "loyalty.customers.v1": frozenset({"tier.changed", "segment.changed"}),
}
