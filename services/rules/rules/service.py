from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from asyncpg.exceptions import UniqueViolationError

from rules import ruleset as rs
from rules import schemas
from rules.batch import (
    BatchOutcome,
    BatchWork,
    CampaignBudgetContended,
    RulesetCache,
    StateCache,
    schedules,
    tier_changed,
)
from rules.engine import (
    CustomerSnapshot,
    Evaluation,
    EventRefused,
    check_referral,
    evaluate,
    event_time,
    review_tier,
)
from rules.errors import (
    EventTooLarge,
    InvalidEvent,
    NoActiveRuleset,
    RulesetNotFound,
    RulesetValidationFailed,
    SimulationNotSupported,
    TiersNotDefined,
)
from rules.models import Award, Ruleset, RulesetActivation, processed_events
from rules.repository import (
    CampaignRepository,
    CustomerStateRepository,
    OrderRepository,
    OutboxRepository,
    RulesetRepository,
    StateChanged,
)
from shared.consumer import Inbound, Rejection, RetryLater
from shared.contract import Limits, violation
from shared.db import AsyncReadSession, AsyncSession
from shared.events import (
    TOPIC_EVENT_TYPES,
    CloudEvent,
    EngagementPayload,
    EventDecodeError,
    PurchaseCompleted,
    PurchaseRefunded,
    PurchasesPayload,
    ReferralConverted,
    business_id,
    carries,
    decode_event,
    utcnow,
)
from shared.kafka import EventProducer
from shared.outbox import Claimed, Unpublishable
from shared.topics import CUSTOMERS, ENGAGEMENT, PURCHASES
from shared.tracking import claim_batch, release

log = logging.getLogger(__name__)

# The tracking name (shared.tracking): the service's, not its (suffixed) group id.
TRACKING_NAME = "rules"


def _tracked(event: CloudEvent[Any]) -> bool:
    return not isinstance(event.data, PurchaseCompleted)


INGEST_TOPICS = {PURCHASES: TOPIC_EVENT_TYPES[PURCHASES], ENGAGEMENT: TOPIC_EVENT_TYPES[ENGAGEMENT]}


def _carries(types: frozenset[str], event_type: object) -> bool:
    if not isinstance(event_type, str):
        return False
    return carries(types, event_type)


class RulesService:
    def __init__(self) -> None:
        self.cache = RulesetCache()

    # --- rulesets ---------------------------------------------------------------------------------

    async def validate(self, source: str | dict[str, Any]) -> rs.RulesetDocument:
        # Parsing and validating is CPU work bounded by the document limits; in a thread, so a large
        # document does not hold up the event loop (the consumer's too).
        try:
            return await asyncio.to_thread(rs.parse, source)
        except rs.RulesetInvalid as exc:
            raise RulesetValidationFailed(exc.problems) from exc

    async def check(self, source: str | dict[str, Any]) -> list[rs.Problem]:
        try:
            await asyncio.to_thread(rs.parse, source)
        except rs.RulesetInvalid as exc:
            return exc.problems
        return []

    async def create_version(
        self, session: AsyncSession, *, tenant_id: str, ruleset_id: str, source: str | dict[str, Any], key_id: str
    ) -> Ruleset:
        document = await self.validate(source)
        repo = RulesetRepository.from_session(session)
        version = await repo.next_version(tenant_id, ruleset_id)
        return await repo.create(
            Ruleset(
                tenant_id=tenant_id,
                ruleset_id=ruleset_id,
                version=version,
                document=rs.canonical_json(document),
                source=source if isinstance(source, str) else None,
                created_by=key_id,
            )
        )

    async def get_version(self, session: AsyncReadSession, *, tenant_id: str, ruleset_id: str, version: int) -> Ruleset:
        row = await RulesetRepository.from_session(session).get(tenant_id, ruleset_id, version)
        if row is None:
            raise RulesetNotFound(ruleset_id, version)
        return row

    async def list_versions(
        self, session: AsyncReadSession, *, tenant_id: str, ruleset_id: str | None = None
    ) -> Sequence[Ruleset]:
        return await RulesetRepository.from_session(session).list_versions(tenant_id, ruleset_id)

    async def activate(
        self,
        session: AsyncSession,
        *,
        tenant_id: str,
        ruleset_id: str,
        version: int,
        effective_from: datetime | None,
        key_id: str,
    ) -> RulesetActivation:
        await self.get_version(session, tenant_id=tenant_id, ruleset_id=ruleset_id, version=version)
        return await RulesetRepository.from_session(session).activate(
            RulesetActivation(
                tenant_id=tenant_id,
                ruleset_id=ruleset_id,
                version=version,
                effective_from=effective_from or utcnow(),
                activated_by=key_id,
            )
        )

    async def activations(self, session: AsyncReadSession, *, tenant_id: str) -> Sequence[RulesetActivation]:
        return await RulesetRepository.from_session(session).activations([tenant_id])

    async def active_version(
        self, session: AsyncReadSession, *, tenant_id: str, at: datetime
    ) -> tuple[str, int] | None:
        schedule = schedules(await RulesetRepository.from_session(session).activations([tenant_id])).get(tenant_id)
        return schedule.at(at) if schedule else None

    async def require_active(self, session: AsyncReadSession, *, tenant_id: str, at: datetime) -> schemas.ActiveVersion:
        active = await self.active_version(session, tenant_id=tenant_id, at=at)
        if active is None:
            raise NoActiveRuleset(tenant_id, at)
        return schemas.ActiveVersion(ruleset_id=active[0], version=active[1])

    # --- customers --------------------------------------------------------------------------------

    async def get_state(
        self, session: AsyncReadSession, *, tenant_id: str, customer_id: str
    ) -> CustomerSnapshot | None:
        states = await CustomerStateRepository.from_session(session).load([(tenant_id, customer_id)])
        return states.get((tenant_id, customer_id))

    async def awards(
        self, session: AsyncReadSession, *, tenant_id: str, customer_id: str, limit: int
    ) -> Sequence[Award]:
        return await OrderRepository.from_session(session).awards_for_customer(tenant_id, customer_id, limit)

    async def review_tiers(
        self, session: AsyncSession, *, tenant_id: str, at: datetime, namespace: str, page: int = 1000
    ) -> tuple[int, int]:
        """The scheduled review: every customer of the tenant whose review is due at `at`, under the
        version active then. Changes go to the outbox (the relay publishes them). Returns (seen, changed)."""
        active = await self.active_version(session, tenant_id=tenant_id, at=at)
        if active is None:
            raise NoActiveRuleset(tenant_id, at)
        key = (tenant_id, *active)
        compiled = (await self.cache.load(session, {key}))[key]
        tiers = compiled.document.tiers
        if tiers is None:
            raise TiersNotDefined(active[0], active[1])
        states = CustomerStateRepository.from_session(session)
        seen = changed = 0
        after = ""
        while batch := await states.load_tenant(tenant_id, after=after, limit=page):
            after = batch[-1].customer_id
            seen += len(batch)
            rows, dirty = [], []
            for state in batch:
                change = review_tier(state, tiers, at)
                if change is None:
                    continue
                dirty.append((tenant_id, state))
                cause = f"review:{at.isoformat()}"
                rows.append(
                    tier_changed(f"{namespace}{CUSTOMERS}", tenant_id, state.customer_id, change, compiled, cause, at)
                )
            await states.save(dirty)
            await OutboxRepository.from_session(session).add(rows)
            changed += len(rows)
        return seen, changed

    # --- simulate ---------------------------------------------------------------------------------

    async def simulate(
        self,
        session: AsyncReadSession,
        *,
        tenant_id: str,
        event: CloudEvent[Any],
        ruleset_id: str | None = None,
        version: int | None = None,
    ) -> Evaluation:
        """The award the pipeline would make for `event` given the stored state; nothing is written."""
        if isinstance(event.data, PurchaseRefunded):
            raise SimulationNotSupported("a refund claws back stored awards; simulate purchases and engagement")
        at = event_time(event)
        if ruleset_id is None or version is None:
            active = await self.active_version(session, tenant_id=tenant_id, at=at)
            if active is None:
                raise NoActiveRuleset(tenant_id, at)
            ruleset_id, version = active
        key = (tenant_id, ruleset_id, version)
        compiled = (await self.cache.load(session, {key})).get(key)
        if compiled is None:
            raise RulesetNotFound(ruleset_id, version)
        customer_id = event.data.customer_id
        keys = [(tenant_id, customer_id)]
        referred_id = None
        if isinstance(event.data, ReferralConverted):
            try:
                check_referral(event.data)
            except EventRefused as exc:
                raise SimulationNotSupported(str(exc)) from exc
            referred_id = event.data.referred_customer_id
        if referred_id:
            keys.append((tenant_id, referred_id))
        states = await CustomerStateRepository.from_session(session).load(keys)
        campaigns = [(tenant_id, c) for c, spec in compiled.document.campaigns.items() if spec.budget]
        spent = await CampaignRepository.from_session(session).spent(campaigns)
        try:
            return evaluate(
                compiled,
                event,
                states.get((tenant_id, customer_id)) or CustomerSnapshot(customer_id),
                referred=(states.get((tenant_id, referred_id)) or CustomerSnapshot(referred_id))
                if referred_id
                else None,
                campaign_spent={c: p for (_, c), p in spent.items()},
            )
        except EventRefused as exc:
            raise SimulationNotSupported(str(exc)) from exc

    # --- REST ingest ------------------------------------------------------------------------------

    def parse_event(
        self, doc: dict[str, Any], *, tenant_id: str, index: int | None = None
    ) -> tuple[str, CloudEvent[Any]]:
        """Validates a purchase or engagement event of the caller's tenant; returns its topic and the event."""
        doc = dict(doc)
        if doc.setdefault("tenantid", tenant_id) != tenant_id:
            raise InvalidEvent(f"tenantid {doc['tenantid']!r} is not the API key's tenant", index)
        event_type = doc.get("type")
        topic = next((t for t, types in INGEST_TOPICS.items() if _carries(types, event_type)), None)
        if topic is None:
            raise InvalidEvent(
                f"event type {event_type!r} cannot be ingested here; send purchases or engagement", index
            )
        try:
            event = decode_event(json.dumps(doc).encode(), allowed_types=INGEST_TOPICS[topic])
        except EventDecodeError as exc:
            raise InvalidEvent(str(exc), index) from exc
        return topic, event

    def accept_event(
        self,
        doc: dict[str, Any],
        *,
        tenant_id: str,
        limits: Limits,
        max_event_bytes: int,
        now: datetime,
        index: int | None = None,
    ) -> tuple[str, CloudEvent[Any]]:
        """`parse_event`, then the checks the consumer makes of every message: an event accepted here
        is one the consumer takes (the same contract, the same size limit on the bytes it will read)."""
        topic, event = self.parse_event(doc, tenant_id=tenant_id, index=index)
        size = len(event.to_bytes())
        if size > max_event_bytes:
            raise EventTooLarge(
                f"the event is {size} bytes, more than the {max_event_bytes} a message may carry", index
            )
        refused = violation(event, None, limits=limits, now=now)
        if refused is not None:
            raise InvalidEvent(refused, index)
        return topic, event

    async def ingest(
        self,
        producer: EventProducer,
        *,
        namespace: str,
        tenant_id: str,
        docs: Sequence[dict[str, Any]],
        limits: Limits,
        max_event_bytes: int,
    ) -> list[str]:
        # All or nothing: every event is validated before the first one is produced.
        now = utcnow()
        parsed = [
            self.accept_event(
                d,
                tenant_id=tenant_id,
                limits=limits,
                max_event_bytes=max_event_bytes,
                now=now,
                index=i if len(docs) > 1 else None,
            )
            for i, d in enumerate(docs)
        ]
        by_topic: dict[str, list[CloudEvent[Any]]] = {}
        for topic, event in parsed:
            by_topic.setdefault(f"{namespace}{topic}", []).append(event)
        for topic, events in by_topic.items():
            await producer.publish_many(topic, events)
        return [e.id for _, e in parsed]

    # --- the pipeline -----------------------------------------------------------------------------

    async def handle_batch(
        self, session: AsyncSession, batch: Sequence[Inbound[PurchasesPayload | EngagementPayload]]
    ) -> list[Rejection]:
        return (await self.process_batch(session, batch)).rejections

    async def process_batch(
        self,
        session: AsyncSession,
        batch: Sequence[Inbound[PurchasesPayload | EngagementPayload]],
        *,
        namespace: str = "",
        state_cache: StateCache | None = None,
    ) -> BatchOutcome:
        """Evaluates a batch in memory and writes its effects with one statement per table.

        State, orders, awards, tracking rows and the outbox of commands commit together (the caller's
        transaction), so a redelivered batch finds its events done and produces nothing twice: a
        purchase by its order (the order row names the event that recorded it), any other event by its
        tracking row (shared.tracking). A business id (refund, review, referral...) is processed once per
        tenant: another event naming it is refused, as is a purchase of an order recorded before. Raises
        `RetryLater` when another consumer is recording the same purchase or wrote one of the customers'
        states meanwhile. States come from `state_cache` where it holds them; the
        caller gives the outcome's states back to it once the transaction committed.
        """
        # Campaign budgets are read without a lock, so consumers do not queue behind one campaign row for
        # whole batches; when another consumer spent the budget meanwhile, the batch is evaluated again
        # with the rows locked (a savepoint undoes the first attempt).
        try:
            async with session.begin_nested():
                return await self._process(session, batch, namespace, state_cache, lock_campaigns=False)
        except CampaignBudgetContended:
            log.info("campaign budget contended, evaluating the batch again under lock")
            # The first attempt took its cached states (and changed them): this one reads them again.
            return await self._process(session, batch, namespace, state_cache, lock_campaigns=True)

    async def _process(
        self,
        session: AsyncSession,
        batch: Sequence[Inbound[PurchasesPayload | EngagementPayload]],
        namespace: str,
        state_cache: StateCache | None,
        *,
        lock_campaigns: bool,
    ) -> BatchOutcome:
        outcome = BatchOutcome()
        # Purchases get no event key: their order row, written in the same transaction, records them.
        admission = await claim_batch(
            session, processed_events, TRACKING_NAME, batch, tracked=_tracked, business_id=business_id
        )
        outcome.rejections.extend(admission.rejections)
        messages = admission.messages
        work = BatchWork(self.cache, session, namespace, lock_campaigns=lock_campaigns, state_cache=state_cache)
        if messages:
            await work.load(messages)
        refused: list[Rejection] = []
        for m in messages:
            if work.recorded(m.event):
                continue  # a redelivered purchase: its order row names this very event
            try:
                work.apply(m)
            except EventRefused as exc:
                refused.append(Rejection(m, str(exc)))
        outcome.rejections.extend(refused)
        # A refused event changed nothing: release its claims, so replaying it from the DLQ (after the
        # ruleset learnt the currency, say) processes it instead of skipping it as a duplicate.
        await release(session, processed_events, admission.release_keys(refused))
        if not messages:
            return outcome
        try:
            await work.save(outcome)
        except UniqueViolationError as exc:
            if exc.table_name != "orders":
                raise
            # Another consumer (the partition's previous owner, during a rebalance) recorded one of these
            # purchases after this batch read the orders: once it commits, the retry skips that purchase.
            raise RetryLater(f"order recorded concurrently: {exc.detail}") from exc
        except StateChanged as exc:
            # Another writer (a rebalance's other consumer, a tier review) changed a customer this batch
            # evaluated: the retry reads the states again. The whole cache goes: after a rebalance, more of
            # it is likely stale, and each stale state would fail a batch of its own.
            if state_cache is not None:
                state_cache.clear()
            raise RetryLater(str(exc)) from exc
        return outcome


class RulesOutbox:
    """The rules' outbox as the shared relay reads it: rows hold their records' bytes already. `claim`
    takes the rows older than `sweep_after`, which a crash left behind (the consumer publishes its batch's
    rows itself, right after the commit), and only its deployment's topics (the namespace prefix).

    A crash after publishing but before the delete publishes a row again: the copy carries the same
    deterministic command id, which the ledger records once.
    """

    def __init__(self, *, namespace: str = "", sweep_after: timedelta = timedelta(seconds=5)) -> None:
        self.namespace = namespace
        self.sweep_after = sweep_after

    async def claim(self, session: AsyncSession, limit: int) -> Claimed:
        rows = await OutboxRepository.from_session(session).claim_stale(
            self.sweep_after, limit, utcnow(), self.namespace
        )
        return Claimed(ids=[r.id for r in rows], messages=[(r.topic, r.key, r.value) for r in rows])

    async def delete(self, session: AsyncSession, ids: Sequence[int]) -> None:
        await OutboxRepository.from_session(session).delete(ids)

    async def quarantine(self, session: AsyncSession, rows: Sequence[Unpublishable]) -> None:
        await OutboxRepository.from_session(session).quarantine(rows)

    async def oldest(self, session: AsyncReadSession) -> datetime | None:
        return await OutboxRepository.from_session(session).oldest(self.namespace)


rules_service = RulesService()
