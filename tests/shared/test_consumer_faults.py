"""The consumer runner under hostile input, through the real broker: every record ends applied or in the
DLQ with a reason, the committed offset reaches the end, and the valid event behind a bad one is applied.

One runner (module fixture) consumes one topic; each test sends its records under a key of its own, so
they share a partition in order, and waits for their outcome. The handler records what it applied, and
refuses, conflicts or fails on events whose `source` asks for it."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.consumer import MAX_REASON_CHARS, ConsumerRunner, DeadRecord, Inbound, Rejection, RetryLater
from shared.events import TOPIC_EVENT_TYPES
from shared.kafka import EventProducer, ensure_topics
from shared.topics import DLQ, ENGAGEMENT, PURCHASES, TopicSpec
from tests.conftest import KAFKA, dead_letters_for, eventually, topic
from tests.factories import purchase

pytestmark = [pytest.mark.kafka]

Where = tuple[str, int, int]  # topic, partition, offset

REFUSE = "tests/refuse"  # the handler refuses the event, with a reason holding a lone surrogate
CONFLICT = "tests/conflict"  # the handler raises RetryLater on any batch holding it, always
# The runner's reason codes for input it could classify ("internal", its safety net, is not among them).
RUNNER_CODES = {"too_large", "empty", "not_json", "invalid", "wrong_topic", "contract", "handler_failed"}


class Recorder:
    """A handler that records what it applied, as a transaction would: all of a batch or nothing."""

    def __init__(self) -> None:
        self.applied: dict[Where, str] = {}

    async def __call__(self, batch: Sequence[Inbound[Any]]) -> Sequence[Rejection]:
        if any(m.event.source == CONFLICT for m in batch):
            raise RetryLater("a conflict that never passes")
        rejections = []
        for m in batch:
            if m.event.source == REFUSE:
                rejections.append(Rejection(m, f"refused \udc80 {m.event.id}"))
            else:
                self.applied[(m.topic, m.partition, m.offset)] = m.event.id
        return rejections


class RecordingRunner(ConsumerRunner):
    """Remembers the dead letters it sent (once the broker acknowledged them; the DLQ topic has them too)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.letters: dict[Where, DeadRecord] = {}

    async def _dead_letter(self, dead: Sequence[DeadRecord]) -> None:
        await super()._dead_letter(dead)
        self.letters.update({(d.record.topic, d.record.partition, d.record.offset): d for d in dead})


@dataclass
class Rig:
    topic: str
    group: str
    runner: RecordingRunner
    recorder: Recorder
    producer: AIOKafkaProducer
    admin: AIOKafkaAdminClient
    sent: list[Where] = field(default_factory=list)

    async def send(self, key: bytes, values: Sequence[bytes]) -> list[Where]:
        out = []
        for value in values:
            meta = await self.producer.send_and_wait(self.topic, value, key=key)
            out.append((self.topic, meta.partition, meta.offset))
        return out

    def applied(self, where: Where) -> bool:
        return where in self.recorder.applied

    def letter(self, where: Where) -> DeadRecord | None:
        return self.runner.letters.get(where)

    async def settled(self, sent: Sequence[Where]) -> None:
        """Waits until every record is applied or dead-lettered and the offsets are committed past them."""
        await eventually(lambda: all(self.applied(w) or self.letter(w) for w in sent))
        await eventually(lambda: self._committed_past(sent))

    async def _committed_past(self, sent: Sequence[Where]) -> bool:
        offsets = await self.admin.list_consumer_group_offsets(self.group)
        return all(
            (meta := offsets.get(TopicPartition(t, p))) is not None and meta.offset > offset for t, p, offset in sent
        )


@pytest.fixture(scope="module")
async def rig(raw_producer: AIOKafkaProducer) -> AsyncIterator[Rig]:
    name = topic(f"runner-faults-{uuid.uuid4().hex[:8]}.v1")
    await ensure_topics(KAFKA, [TopicSpec(name, 3)])
    dlq = EventProducer(KAFKA, client_id="test-runner-faults")
    await dlq.start()
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
    await admin.start()
    recorder = Recorder()
    group = f"runner-faults-{uuid.uuid4().hex[:8]}"
    runner = RecordingRunner(
        service="test-faults",
        topics=[name],
        group_id=group,
        bootstrap_servers=KAFKA,
        handler=recorder,
        dlq_producer=dlq,
        dlq_topic=topic(DLQ),
        batch_timeout_ms=50,
        # Purchases and engagement (where custom types belong), so `custom.\udc80` reaches validation.
        topic_event_types={name: TOPIC_EVENT_TYPES[PURCHASES] | TOPIC_EVENT_TYPES[ENGAGEMENT]},
        retry_later_attempts=3,
        retry_backoff_s=0.01,
    )
    await runner.start()
    try:
        yield Rig(name, group, runner, recorder, raw_producer, admin)
    finally:
        await runner.stop()
        await admin.close()
        await dlq.stop()


def _valid(tenant: str, customer: str, **envelope: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(purchase(tenant, customer).to_bytes())
    doc.update(envelope)
    return doc


def _nested(marker: str) -> bytes:
    depth = 50_000  # json.loads gives up with RecursionError (pydantic's parser at 200 levels)
    return b'{"marker": "' + marker.encode() + b'", "data": ' + b"[" * depth + b"]" * depth + b"}"


def _huge_int(tenant: str, customer: str, marker: str) -> bytes:
    # An unknown field fails the fast path; json.loads then meets an integer literal of 5,000 digits.
    doc = _valid(tenant, customer, source=f"tests/{marker}", extra="HUGE")
    return json.dumps(doc).encode().replace(b'"HUGE"', b"7" * 5000)


# name -> (the poison record's bytes for tenant, customer and a marker; the reason code it gets)
TRIGGERS: dict[str, tuple[Callable[[str, str, str], bytes], str]] = {
    "deeply-nested-json": (lambda tenant, customer, marker: _nested(marker), "not_json"),
    "integer-of-5000-digits": (_huge_int, "not_json"),
    "event-time-at-the-datetime-edge": (
        lambda tenant, customer, marker: json.dumps(
            _valid(tenant, customer, source=f"tests/{marker}", time="0001-01-01T00:00:00+01:00")
        ).encode(),
        "invalid",
    ),
    "lone-surrogate-in-the-event-type": (
        lambda tenant, customer, marker: json.dumps(
            _valid(tenant, customer, source=f"tests/{marker}", type="custom.\udc80")
        ).encode(),
        "invalid",
    ),
}


class TestPoisonRecords:
    @pytest.mark.parametrize("trigger", list(TRIGGERS))
    async def test_the_record_is_dead_lettered_and_the_event_behind_it_applied(self, rig: Rig, trigger: str) -> None:
        tenant, marker = f"t-{uuid.uuid4().hex[:12]}", uuid.uuid4().hex
        after = purchase(tenant, "c-1")
        make, code = TRIGGERS[trigger]
        poison = make(tenant, "c-1", marker)
        sent = await rig.send(after.key, [poison, after.to_bytes()])
        await rig.settled(sent)

        letter = rig.letter(sent[0])
        assert letter is not None, "the poison record went to the DLQ"
        assert letter.reason
        assert letter.code == code
        assert rig.recorder.applied.get(sent[1]) == after.id, "the valid event behind it on its partition"
        # Read back from the DLQ topic itself: the reason header is there, encoded (escaped where need be).
        (stored,) = await dead_letters_for(marker.encode())
        assert stored.value == poison
        assert stored.reason.encode() == letter.reason[:MAX_REASON_CHARS].encode("utf-8", "backslashreplace")
        assert stored.code == code
        assert (stored.source_partition, stored.source_offset) == sent[0][1:]

    async def test_a_refusal_whose_reason_holds_a_lone_surrogate_is_dead_lettered_escaped(self, rig: Rig) -> None:
        tenant = f"t-{uuid.uuid4().hex[:12]}"
        refused = purchase(tenant, "c-1").model_copy(update={"source": REFUSE})
        after = purchase(tenant, "c-1")
        sent = await rig.send(after.key, [refused.to_bytes(), after.to_bytes()])
        await rig.settled(sent)
        (stored,) = await dead_letters_for(refused.id.encode())
        assert stored.reason == f"refused \\udc80 {refused.id}"
        assert stored.code == "refused"
        assert rig.applied(sent[1])

    async def test_a_conflict_that_never_passes_dead_letters_that_message_alone(self, rig: Rig) -> None:
        tenant = f"t-{uuid.uuid4().hex[:12]}"
        stuck = purchase(tenant, "c-1").model_copy(update={"source": CONFLICT})
        others = [purchase(tenant, "c-1") for _ in range(4)]
        events = [others[0], stuck, *others[1:]]
        sent = await rig.send(stuck.key, [e.to_bytes() for e in events])
        await rig.settled(sent)
        letter = rig.letter(sent[1])
        assert letter is not None
        assert letter.code == "handler_failed"
        assert "handler failed 3 times: RetryLater" in letter.reason
        assert [rig.recorder.applied.get(w) for w in sent[:1] + sent[2:]] == [e.id for e in others]


_TEXT = st.text(st.characters(exclude_categories=()) | st.sampled_from(["\udc80", "\ud800", "\x00"]), max_size=12)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=8,
)
# Values a hostile producer would try, put in place of a field of a valid event (placeholders for what
# json.dumps cannot write: a huge integer literal, deep nesting).
_EDGES = st.sampled_from(
    [
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59-01:00",
        "2026-13-45T00:00:00Z",
        "1e400",
        "-1",
        "custom.\udc80",
        "purchase.refunded",
        "ledger.entry.posted",
        "HUGE",
        "DEEP",
        "",
        "x" * 300,
    ]
)
_FIELDS = [
    "id",
    "source",
    "type",
    "time",
    "subject",
    "tenantid",
    "specversion",
    "dataversion",
    "datacontenttype",
    "data",
    "data.order_id",
    "data.customer_id",
    "data.channel",
    "data.currency",
    "data.net_amount",
    "data.gross_amount",
    "data.lines",
    "data.ordered_at",
    "unknown",
]


@st.composite
def _envelope(draw: st.DrawFn, tenant: str, customer: str) -> bytes:
    """A valid purchase with one field replaced by a random or edge value, or removed."""
    doc = _valid(tenant, customer)
    path = draw(st.sampled_from(_FIELDS)).split(".")
    target = doc["data"] if len(path) == 2 else doc
    action = draw(st.sampled_from(["random", "edge", "remove"]))
    if action == "remove":
        target.pop(path[-1], None)
    else:
        target[path[-1]] = draw(_JSON if action == "random" else _EDGES)
    raw = json.dumps(doc).encode()
    return raw.replace(b'"HUGE"', b"9" * 4400).replace(b'"DEEP"', b"[" * 3000 + b"]" * 3000)


@st.composite
def hostile_batches(draw: st.DrawFn, max_size: int) -> tuple[str, list[bytes]]:
    """Up to `max_size` valid and hostile records under one key, a valid event last."""
    tenant, customer = f"t-{uuid.uuid4().hex[:12]}", "c-fuzz"
    valid = st.builds(lambda: purchase(tenant, customer).to_bytes())
    one = st.one_of(
        st.binary(max_size=200), _JSON.map(lambda v: json.dumps(v).encode()), _envelope(tenant, customer), valid
    )
    records = draw(st.lists(one, min_size=1, max_size=max_size))
    return tenant, [*records, purchase(tenant, customer).to_bytes()]


class TestFuzz:
    @settings(
        max_examples=25,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(batch=hostile_batches(max_size=5))
    async def test_every_record_ends_applied_or_dead_lettered_and_the_offset_reaches_the_end(
        self, rig: Rig, batch: tuple[str, list[bytes]]
    ) -> None:
        tenant, values = batch
        sent = await rig.send(f"{tenant}:c-fuzz".encode(), values)
        await rig.settled(sent)
        for where in sent:
            letter = rig.letter(where)
            assert rig.applied(where) != (letter is not None), "applied or dead-lettered, not both, not neither"
            if letter is not None:
                assert letter.reason
                assert letter.code in RUNNER_CODES | {"refused"}
        assert rig.applied(sent[-1]), "the valid event behind the others on the same partition is applied"


class TestFirstRecordsOfAPartition:
    async def test_a_poison_record_on_a_partition_without_a_committed_offset_ends_in_the_dlq(
        self, raw_producer: AIOKafkaProducer
    ) -> None:
        # A group of its own on a topic of its own: nothing was ever committed on the partition.
        name = topic(f"no-commit-{uuid.uuid4().hex[:8]}.v1")
        await ensure_topics(KAFKA, [TopicSpec(name, 1)])
        dlq = EventProducer(KAFKA, client_id="test-no-commit")
        await dlq.start()
        admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
        await admin.start()
        recorder = Recorder()
        group = f"no-commit-{uuid.uuid4().hex[:8]}"
        runner = RecordingRunner(
            service="test-faults",
            topics=[name],
            group_id=group,
            bootstrap_servers=KAFKA,
            handler=recorder,
            dlq_producer=dlq,
            dlq_topic=topic(DLQ),
            batch_timeout_ms=50,
        )
        marker = uuid.uuid4().hex
        after = purchase(f"t-{uuid.uuid4().hex[:12]}", "c-1")
        rig = Rig(name, group, runner, recorder, raw_producer, admin)
        try:
            sent = await rig.send(after.key, [_nested(marker), after.to_bytes()])
            await runner.start()
            await rig.settled(sent)
            assert rig.letter(sent[0]) is not None
            assert rig.applied(sent[1])
            (stored,) = await dead_letters_for(marker.encode())
            assert stored.source_offset == 0
        finally:
            await runner.stop()
            await admin.close()
            await dlq.stop()
