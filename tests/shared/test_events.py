import json
from datetime import datetime
from decimal import Decimal
from typing import Any, get_args
from unittest.mock import patch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.events import (
    CUSTOM_TYPE_PREFIX,
    EVENT_TYPES,
    TOPIC_EVENT_TYPES,
    CloudEvent,
    CustomersPayload,
    EngagementPayload,
    EventDecodeError,
    LedgerEntriesPayload,
    PointsCommand,
    PurchaseCompleted,
    PurchasesPayload,
    RewardsPayload,
    business_id,
    decode_event,
    payload_model,
)
from shared.schema_export import SCHEMA_DIR, exported_schemas
from shared.topics import CUSTOMERS, ENGAGEMENT, LEDGER_ENTRIES, POINTS_COMMANDS, PURCHASES, REWARDS
from tests.factories import purchase, redemption


class TestTopicPayloads:
    """A handler types its batch `Inbound[<the topic's union>]` on the strength of the runner admitting only
    `TOPIC_EVENT_TYPES`: each union must hold exactly the payload models of its topic's event types."""

    @pytest.mark.parametrize(
        ("topic", "union"),
        [
            (PURCHASES, PurchasesPayload),
            (ENGAGEMENT, EngagementPayload),
            (POINTS_COMMANDS, PointsCommand),
            (LEDGER_ENTRIES, LedgerEntriesPayload),
            (CUSTOMERS, CustomersPayload),
            (REWARDS, RewardsPayload),
        ],
    )
    def test_union_is_the_topics_payload_models(self, topic: str, union: Any) -> None:
        models = {
            model
            for event_type in TOPIC_EVENT_TYPES[topic]
            for model in (
                [payload_model(event_type + "x", 1)]
                if event_type == CUSTOM_TYPE_PREFIX
                else EVENT_TYPES[event_type].values()
            )
        }
        assert models == set(get_args(union) or (union,))

    def test_every_topic_has_a_union(self) -> None:
        assert set(TOPIC_EVENT_TYPES) == {
            PURCHASES,
            ENGAGEMENT,
            POINTS_COMMANDS,
            LEDGER_ENTRIES,
            CUSTOMERS,
            REWARDS,
        }


class TestEnvelope:
    def test_round_trip_keeps_decimal_money_exact(self) -> None:
        event = purchase("acme", net="1234.5678")
        decoded = decode_event(event.to_bytes())
        assert isinstance(decoded.data, PurchaseCompleted)
        assert decoded.data.net_amount == Decimal("1234.5678")
        assert decoded == event

    def test_structured_mode_attributes(self) -> None:
        doc = json.loads(purchase("acme", "c-9").to_bytes())
        assert doc["specversion"] == "1.0"
        assert doc["type"] == "purchase.completed"
        assert doc["subject"] == "c-9"
        assert doc["tenantid"] == "acme"
        assert doc["datacontenttype"] == "application/json"
        assert isinstance(doc["data"]["net_amount"], str), "money travels as a decimal string"

    def test_key_is_tenant_and_customer(self) -> None:
        assert purchase("acme", "c-9").key == b"acme:c-9"

    def test_times_are_utc(self) -> None:
        doc = json.loads(purchase("acme").to_bytes())
        doc["time"] = "2026-01-01T12:00:00+02:00"
        event = decode_event(json.dumps(doc).encode())
        assert event.time == datetime.fromisoformat("2026-01-01T10:00:00+00:00")
        offset = event.time.utcoffset()
        assert offset is not None
        assert offset.total_seconds() == 0


class TestRedemptionBusinessIds:
    """An order has each change once, and its refund in full once; its partial refunds are several."""

    WHEN = datetime.fromisoformat("2025-03-01T10:00:00+00:00")

    @pytest.mark.parametrize(
        ("change", "state", "expected"),
        [
            ("reserved", "reserved", "reserved:O-1"),
            ("confirmed", "confirmed", "confirmed:O-1"),
            ("coupon_consumed", "confirmed", "coupon_consumed:O-1"),
            ("cancelled", "cancelled", "cancelled:O-1"),
            ("expired", "expired", "expired:O-1"),
            ("refunded", "refunded", "refunded:O-1"),
            ("refunded", "confirmed", None),
        ],
    )
    def test_each_change_of_an_order(self, change: str, state: str, expected: str | None) -> None:
        event = redemption("acme", "O-1", change, state=state, occurred_at=self.WHEN)
        assert business_id(event) == (None if expected is None else ("redemption_change", expected))

    def test_a_long_order_id_is_hashed_within_the_tracking_column(self) -> None:
        long_id, other = "O" * 200, "O" * 199 + "P"
        found = [business_id(redemption("acme", o, "confirmed", occurred_at=self.WHEN)) for o in (long_id, other)]
        assert found[0] is not None
        assert found[1] is not None
        assert found[0] != found[1]
        assert found[0][1].startswith("confirmed-")
        assert len(found[0][1]) == len("confirmed-") + 32


class TestDecodeErrors:
    @pytest.mark.parametrize(
        ("raw", "reason"),
        [
            (b"\xff\xfe garbage", "not JSON"),
            (b"[1, 2]", "not an object"),
            (b'{"id": "x"}', "missing 'type'"),
            (b'{"type": "order.placed"}', "unknown event type"),
            (None, "empty message"),
        ],
    )
    def test_reasons(self, raw: bytes | None, reason: str) -> None:
        with pytest.raises(EventDecodeError, match=reason):
            decode_event(raw)

    def test_wrong_schema_names_the_field(self) -> None:
        doc = json.loads(purchase("acme").to_bytes())
        del doc["data"]["currency"]
        doc["data"]["net_amount"] = "lots"
        with pytest.raises(EventDecodeError) as info:
            decode_event(json.dumps(doc).encode())
        assert "data.currency" in str(info.value)
        assert "data.net_amount" in str(info.value)

    def test_naive_time_is_refused(self) -> None:
        doc = json.loads(purchase("acme").to_bytes())
        doc["time"] = "2026-01-01T12:00:00"
        with pytest.raises(EventDecodeError, match="timezone"):
            decode_event(json.dumps(doc).encode())

    def test_lowercase_currency_is_refused(self) -> None:
        doc = json.loads(purchase("acme").to_bytes())
        doc["data"]["currency"] = "eur"
        with pytest.raises(EventDecodeError, match="currency"):
            decode_event(json.dumps(doc).encode())

    def test_type_not_allowed_on_topic(self) -> None:
        with pytest.raises(EventDecodeError, match="does not belong"):
            decode_event(purchase("acme").to_bytes(), allowed_types=frozenset({"points.earn"}))

    def test_unknown_version(self) -> None:
        doc = json.loads(purchase("acme").to_bytes())
        doc["dataversion"] = 7
        with pytest.raises(EventDecodeError, match="unsupported dataversion 7"):
            decode_event(json.dumps(doc).encode())


def _full_path(raw: bytes) -> CloudEvent[Any] | str:
    """What decode_event gives when its single-pass guess is not taken: json.loads, then validation."""
    with patch("shared.events._decode_fast", return_value=None):
        try:
            return decode_event(raw)
        except EventDecodeError as exc:
            return str(exc)


def _decoded(raw: bytes) -> CloudEvent[Any] | str:
    try:
        return decode_event(raw)
    except EventDecodeError as exc:
        return str(exc)


class TestSinglePassDecoding:
    """decode_event validates the bytes in one pass when it can guess the model; it must agree with the
    full path (json.loads, pick the model, validate) on every input, valid or not."""

    @pytest.mark.parametrize(
        "mutate",
        [
            pytest.param(lambda d: d, id="valid"),
            pytest.param(lambda d: d.update(dataversion="1"), id="version-as-string"),
            pytest.param(lambda d: d.update(dataversion=1.0), id="version-as-float"),
            pytest.param(lambda d: d.update(dataversion=2), id="unknown-version"),
            pytest.param(lambda d: d.update(dataversion=True), id="version-as-bool"),
            pytest.param(lambda d: d.update(type="review.posted"), id="type-of-another-model"),
            pytest.param(lambda d: d.update(type="Purchase.Completed"), id="type-unknown"),
            pytest.param(lambda d: d["data"].update(currency=42), id="invalid-field"),
            pytest.param(lambda d: d.update(extra="x"), id="unknown-attribute"),
            pytest.param(lambda d: d.pop("type"), id="no-type"),
        ],
    )
    def test_agrees_with_the_full_path(self, mutate: Any) -> None:
        doc = json.loads(purchase("acme", "c-1").to_bytes())
        mutate(doc)
        raw = json.dumps(doc).encode()
        assert _decoded(raw) == _full_path(raw)

    @pytest.mark.parametrize("nested", ["purchase.completed", "custom.webinar"])
    def test_a_nested_type_key_ahead_of_the_envelopes_does_not_mislead_it(self, nested: str) -> None:
        # Key order is free in JSON, and a custom event's payload may have its own "type" field.
        data = {"type": nested, "customer_id": "c-1", "dataversion": 7}
        envelope = {"specversion": "1.0", "id": "e-1", "source": "tests", "type": "custom.visit", "tenantid": "acme"}
        envelope["time"] = "2026-01-01T00:00:00Z"
        raw = json.dumps({"data": data, **envelope}).encode()
        decoded = _decoded(raw)
        assert decoded == _full_path(raw)
        assert isinstance(decoded, CloudEvent)
        assert decoded.type == "custom.visit"

    @settings(max_examples=200, deadline=None)
    @given(net=st.decimals(min_value=0, max_value=10**9, places=4), version=st.sampled_from([1, 2, "1", None]))
    def test_agrees_on_generated_events(self, net: Decimal, version: object) -> None:
        doc = json.loads(purchase("acme", "c-1", net=str(net)).to_bytes())
        if version is None:
            del doc["dataversion"]
        else:
            doc["dataversion"] = version
        raw = json.dumps(doc).encode()
        assert _decoded(raw) == _full_path(raw)


class TestSchemas:
    def test_checked_in_schemas_match_the_models(self) -> None:
        exported = exported_schemas()
        on_disk = {p.name: p.read_text() for p in SCHEMA_DIR.glob("*.json")}
        assert set(on_disk) == set(exported), "run `make schemas`"
        for name, text in exported.items():
            assert on_disk[name] == text, f"shared/schemas/{name} is stale: run `make schemas`"

    def test_schema_describes_the_payload(self) -> None:
        schema = json.loads((SCHEMA_DIR / "purchase.completed.v1.json").read_text())
        assert "data" in schema["required"]
        assert "PurchaseCompleted" in json.dumps(schema)

    def test_envelope_is_generic_over_payloads(self) -> None:
        assert CloudEvent[PurchaseCompleted].model_json_schema()["properties"]["specversion"]["const"] == "1.0"
