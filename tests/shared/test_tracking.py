"""The process-once decision (shared.tracking.admit), without a database: which messages of a batch are
processed, skipped as redeliveries, or refused for a business id another event took."""

from __future__ import annotations

from typing import Any, cast

from shared.consumer import Inbound, Rejection
from shared.events import CloudEvent, PurchaseCompleted, ReviewPosted, make_event
from shared.tracking import Key, admit, business_key, event_key, keys_of
from tests.factories import purchase

NAME = "svc"


def _review(tenant: str, review_id: str, *, event_id: str | None = None, source: str = "shop") -> CloudEvent[Any]:
    data = ReviewPosted(review_id=review_id, customer_id="c1", rating=5)
    return make_event("review.posted", data, tenant_id=tenant, source=source, event_id=event_id)


def _review_id(event: CloudEvent[Any]) -> tuple[str, str] | None:
    return ("review_id", event.data.review_id) if isinstance(event.data, ReviewPosted) else None


def _batch(*events: CloudEvent[Any]) -> list[Inbound[Any]]:
    return [Inbound(e, "topic", 0, offset, cast(Any, None)) for offset, e in enumerate(events)]


def _admit(batch: list[Inbound[Any]], claimed: set[Key] | None = None, **kw: Any) -> Any:
    keys = keys_of(NAME, batch, kw.get("tracked"), kw.get("business_id"))
    # By default the claim inserted every key: nothing was processed before.
    wanted = {ek for ek, _, t in keys if t} | {bk for _, bk, _ in keys if bk is not None}
    return admit(NAME, batch, keys, wanted if claimed is None else claimed)


class TestEventKeys:
    def test_one_event_id_from_two_tenants_or_two_sources_is_two_events(self) -> None:
        a = _review("tenant-a", "R1", event_id="same")
        b = _review("tenant-b", "R1", event_id="same")
        c = _review("tenant-a", "R2", event_id="same", source="erp")
        batch = _batch(a, b, c)
        admission = _admit(batch, business_id=_review_id)
        assert admission.messages == batch
        assert admission.rejections == []
        assert len({event_key(NAME, e) for e in (a, b, c)}) == 3

    def test_the_same_key_twice_in_one_batch_counts_once(self) -> None:
        event = _review("tenant-a", "R1")
        batch = _batch(event, event)
        admission = _admit(batch, business_id=_review_id)
        assert admission.messages == batch[:1]
        assert admission.rejections == [], "a redelivery is skipped silently, not refused"

    def test_an_event_claimed_before_is_skipped(self) -> None:
        event = _review("tenant-a", "R1")
        admission = _admit(_batch(event), claimed=set(), business_id=_review_id)
        assert (admission.messages, admission.rejections, admission.unclaimed) == ([], [], [])

    def test_untracked_events_are_admitted_without_a_claim(self) -> None:
        order = purchase("tenant-a")
        batch = _batch(order, order)
        admission = _admit(batch, claimed=set(), tracked=lambda e: not isinstance(e.data, PurchaseCompleted))
        assert admission.messages == batch[:1], "untracked, but still once per batch"
        assert admission.owned == {}


class TestBusinessIds:
    def test_a_business_id_taken_before_refuses_a_new_event_naming_it(self) -> None:
        event = _review("tenant-a", "R1")
        batch = _batch(event)
        ek = event_key(NAME, event)
        admission = _admit(batch, claimed={ek}, business_id=_review_id)
        assert admission.messages == []
        [rejection] = admission.rejections
        assert rejection.reason == "review_id 'R1' was already processed under another event id"
        assert admission.unclaimed == [ek], "the refused event's claim is given back"

    def test_two_events_naming_one_business_id_in_one_batch_process_the_first(self) -> None:
        first, second = _review("tenant-a", "R1"), _review("tenant-a", "R1")
        other_tenant = _review("tenant-b", "R1")
        batch = _batch(first, second, other_tenant)
        admission = _admit(batch, business_id=_review_id)
        assert admission.messages == [batch[0], batch[2]], "business ids are per tenant"
        assert [r.message for r in admission.rejections] == [batch[1]]
        assert admission.unclaimed == [event_key(NAME, second)]

    def test_a_redelivery_gives_back_a_business_id_claimed_with_it(self) -> None:
        event = _review("tenant-a", "R1")
        bk = business_key(NAME, "tenant-a", ("review_id", "R1"))
        admission = _admit(_batch(event), claimed={bk}, business_id=_review_id)
        assert (admission.messages, admission.rejections) == ([], [])
        assert admission.unclaimed == [bk]

    def test_a_refused_message_releases_the_keys_it_claimed(self) -> None:
        event = _review("tenant-a", "R1")
        batch = _batch(event)
        admission = _admit(batch, business_id=_review_id)
        [message] = admission.messages
        keys = admission.release_keys([Rejection(message, "refused")])
        assert keys == [event_key(NAME, event), business_key(NAME, "tenant-a", ("review_id", "R1"))]
        assert admission.release_keys([]) == []

    def test_business_keys_cannot_meet_event_keys(self) -> None:
        bk = business_key(NAME, "tenant-a", ("review_id", "R1"))
        assert bk[0] == f"{NAME}:review_id"
        assert bk[2] == "", "no event has an empty source"
