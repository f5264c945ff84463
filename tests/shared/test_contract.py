"""The input contract without a broker: the bounds on the event models and `shared.contract.violation`.

The property tests feed the validators what a hostile producer could send (any JSON number as money, any
string as a time) and check that each input either validates to a value within the bounds or raises a
ValidationError: never another exception, never a value a column or the database driver cannot take.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from shared.contract import Limits, violation
from shared.events import (
    EARLIEST,
    LATEST,
    MAX_MONEY,
    MAX_POINTS,
    MONEY_PLACES,
    CloudEvent,
    CustomEngagement,
    EarnPoints,
    EventDecodeError,
    Money,
    PurchaseLine,
    Quantity,
    UtcDatetime,
    decode_event,
    make_event,
)
from tests.factories import earn, purchase

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
LIMITS = Limits(max_future_skew=timedelta(minutes=5))
MONEY: TypeAdapter[Decimal] = TypeAdapter(Money)
QUANTITY: TypeAdapter[Decimal] = TypeAdapter(Quantity)
TIME: TypeAdapter[datetime] = TypeAdapter(UtcDatetime)

# The JSON number grammar (RFC 8259), exponents of any size included.
JSON_NUMBER = r"\A-?(0|[1-9][0-9]{0,30})(\.[0-9]{1,30})?([eE][+-]?[0-9]{1,12})?\Z"


def at(when: datetime) -> CloudEvent[Any]:
    event = purchase("acme", "c-1", ordered_at=when)
    return event.model_copy(update={"time": when})


class TestViolation:
    def test_an_event_under_its_own_key_now_meets_the_contract(self) -> None:
        event = at(NOW)
        assert violation(event, event.key, limits=LIMITS, now=NOW) is None

    def test_rest_has_no_key_to_check(self) -> None:
        assert violation(at(NOW), None, limits=LIMITS, now=NOW) is None

    @pytest.mark.parametrize("key", [b"acme:c-2", b"other:c-1", b"acme", b"", b"\xff\xfe"])
    def test_a_key_other_than_tenant_and_subject_is_refused(self, key: bytes) -> None:
        reason = violation(at(NOW), key, limits=LIMITS, now=NOW)
        assert reason == "message key does not match the event's tenantid:subject"

    def test_times_within_the_skew_and_any_past_time_are_fine(self) -> None:
        for when in (NOW + timedelta(minutes=5), NOW - timedelta(days=3650), EARLIEST):
            assert violation(at(when), None, limits=LIMITS, now=NOW) is None, when

    def test_an_event_time_beyond_the_skew_is_refused(self) -> None:
        event = purchase("acme", "c-1").model_copy(update={"time": NOW + timedelta(minutes=5, seconds=1)})
        reason = violation(event, None, limits=LIMITS, now=NOW)
        assert reason is not None
        assert reason.startswith("event time 2026-12-05T12:05:01+00:00 is more than 300s in the future")

    def test_an_order_dated_2999_is_refused_even_when_the_envelope_time_is_now(self) -> None:
        event = purchase("acme", "c-1", ordered_at=datetime(2999, 1, 1, tzinfo=UTC)).model_copy(update={"time": NOW})
        reason = violation(event, None, limits=LIMITS, now=NOW)
        assert reason is not None
        assert reason.startswith("data.ordered_at 2999-01-01T00:00:00+00:00 is more than 300s in the future")

    def test_the_skew_is_a_setting(self) -> None:
        event = at(NOW + timedelta(hours=1))
        assert violation(event, None, limits=LIMITS, now=NOW) is not None
        assert violation(event, None, limits=Limits(max_future_skew=timedelta(hours=2)), now=NOW) is None

    def test_an_untyped_ordered_at_of_a_custom_engagement_is_not_compared(self) -> None:
        data = CustomEngagement.model_validate({"customer_id": "c-1", "ordered_at": "2999-01-01"})
        event = make_event("custom.visit", data, tenant_id="acme", source="tests", time=NOW)
        assert violation(event, event.key, limits=LIMITS, now=NOW) is None


class TestMoney:
    @pytest.mark.parametrize(
        "raw",
        ["-0.01", '"-5"', "1e400", '"1e400"', '"NaN"', '"Infinity"', '"-Infinity"', "1000000000000.0001", '"0.00001"'],
    )
    def test_refused(self, raw: str) -> None:
        with pytest.raises(ValidationError):
            MONEY.validate_json(raw)

    @pytest.mark.parametrize(
        ("raw", "value"),
        [('"0"', Decimal(0)), ('"1000000000000"', MAX_MONEY), ('"12.3456"', Decimal("12.3456")), ("7", Decimal(7))],
    )
    def test_accepted(self, raw: str, value: Decimal) -> None:
        assert MONEY.validate_json(raw) == value

    def test_needless_zeros_are_dropped_so_the_driver_can_encode_the_value(self) -> None:
        for raw in ('"0e-999999999"', '"1.' + "0" * 5000 + '"', '"0e999999999"', '"1e3"'):
            value = MONEY.validate_json(raw)
            assert -MONEY_PLACES <= value.as_tuple().exponent <= 0  # type: ignore[operator]
            assert value in (Decimal(0), Decimal(1), Decimal(1000))

    @settings(max_examples=500, deadline=None)
    @given(raw=st.from_regex(JSON_NUMBER) | st.from_regex(JSON_NUMBER).map(json.dumps) | st.text(max_size=40))
    def test_any_number_is_money_within_bounds_or_a_validation_error(self, raw: str) -> None:
        try:
            value = MONEY.validate_json(raw)
        except ValidationError:
            return
        assert value.is_finite()
        assert 0 <= value <= MAX_MONEY
        exponent = value.as_tuple().exponent
        assert isinstance(exponent, int)
        assert -MONEY_PLACES <= exponent <= 0
        assert Decimal(str(value)) == value

    def test_quantities_are_positive_and_bounded(self) -> None:
        for raw in ('"0"', '"-1"', '"1000000001"', '"1e400"', '"NaN"'):
            with pytest.raises(ValidationError):
                QUANTITY.validate_json(raw)
        assert QUANTITY.validate_json('"2.5"') == Decimal("2.5")

    def test_unit_prices_are_bounded_and_lines_never_go_negative(self) -> None:
        line = PurchaseLine(sku="S", category="bolts", quantity=Decimal(1000), unit_price=Decimal("0.012345"))
        assert line.unit_price == Decimal("0.012345")
        with pytest.raises(ValidationError):
            PurchaseLine(sku="S", category="x", quantity=Decimal(1), unit_price=MAX_MONEY + 1)
        with pytest.raises(ValidationError, match="discount exceeds"):
            PurchaseLine(sku="S", category="x", quantity=Decimal(2), unit_price=Decimal(5), discount=Decimal("10.01"))
        with pytest.raises(ValidationError):
            PurchaseLine(sku="S", category="x", quantity=Decimal(1), unit_price=Decimal(-5))


class TestPurchases:
    @pytest.mark.parametrize(
        ("field", "value", "where"),
        [
            ("net_amount", "-10", "data.net_amount"),
            ("net_amount", 1e400, "data.net_amount"),
            ("gross_amount", "NaN", "data.gross_amount"),
        ],
    )
    def test_negative_or_infinite_amounts_are_not_purchases(self, field: str, value: Any, where: str) -> None:
        doc = json.loads(purchase("acme").to_bytes())
        doc["data"][field] = value
        with pytest.raises(EventDecodeError, match=where):
            decode_event(json.dumps(doc).encode())

    def test_a_negative_unit_price_is_not_a_purchase(self) -> None:
        doc = json.loads(purchase("acme").to_bytes())
        doc["data"]["lines"][0]["unit_price"] = "-3"
        with pytest.raises(EventDecodeError, match=r"data\.lines\.0\.unit_price"):
            decode_event(json.dumps(doc).encode())

    def test_a_nul_in_an_identifier_is_refused(self) -> None:
        doc = json.loads(purchase("acme").to_bytes())
        doc["data"]["customer_id"] = "c\x001"
        with pytest.raises(EventDecodeError, match=r"data\.customer_id"):
            decode_event(json.dumps(doc).encode())


class TestPoints:
    def test_points_commands_are_bounded_like_the_ledgers_rest_writes(self) -> None:
        assert earn("acme", points=MAX_POINTS).data.points == MAX_POINTS
        for points in (MAX_POINTS + 1, 2**63, 0, -1):
            doc = json.loads(earn("acme").to_bytes())
            doc["data"]["points"] = points
            with pytest.raises(EventDecodeError, match=r"data\.points"):
                decode_event(json.dumps(doc).encode())

    def test_points_are_integers_not_strings_or_floats(self) -> None:
        for points in ("5", 5.0):
            with pytest.raises(ValidationError):
                EarnPoints.model_validate(
                    {"command_id": "c", "customer_id": "x", "points": points, "source_event_id": "e"}
                )


class TestTimes:
    @pytest.mark.parametrize(
        "raw",
        [
            "0001-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59-01:00",
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999999Z",
            "1899-12-31T23:59:59Z",
            "9000-01-01T00:00:00Z",
            "2026-01-01T00:00:00",
        ],
    )
    def test_refused_as_validation_errors(self, raw: str) -> None:
        with pytest.raises(ValidationError):
            TIME.validate_python(raw)

    def test_the_edges_of_the_accepted_range(self) -> None:
        assert TIME.validate_python("1900-01-01T00:00:00Z") == EARLIEST
        assert TIME.validate_python("1900-01-01T01:00:00+01:00") == EARLIEST
        assert TIME.validate_python("8999-12-31T23:59:59.999999Z") < LATEST

    @settings(max_examples=500, deadline=None)
    @given(
        raw=st.text(max_size=40)
        | st.from_regex(r"\A[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]{8,15}([+-][0-9]{2}:[0-9]{2}|Z)?\Z")
    )
    def test_any_string_is_a_utc_time_in_range_or_a_validation_error(self, raw: str) -> None:
        try:
            value = TIME.validate_python(raw)
        except ValidationError:
            return
        assert value.tzinfo is UTC
        assert EARLIEST <= value < LATEST

    @settings(max_examples=300, deadline=None)
    @given(
        when=st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)),
        offset_minutes=st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59),
    )
    def test_any_datetime_with_any_offset_never_crashes_an_event(self, when: datetime, offset_minutes: int) -> None:
        raw = when.replace(tzinfo=timezone(timedelta(minutes=offset_minutes))).isoformat()
        doc = json.loads(purchase("acme").to_bytes())
        doc["time"] = raw
        try:
            event = decode_event(json.dumps(doc).encode())
        except EventDecodeError as exc:
            refused = str(exc)
        else:
            assert EARLIEST <= event.time < LATEST
            return
        assert "time" in refused
