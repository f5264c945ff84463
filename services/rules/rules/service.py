from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from asyncpg.exceptions import UniqueViolationError

from rules import ruleset as rs
from rules import schemas
from rules.batch import (
    BatchWork,
    Key,
    RulesetCache,
    StateCache,
    VersionKey,
    budgets,
    order_versions,
    schedules,
    tier_changed,
    wanted,
)
from rules.engine import (
    CompiledRuleset,
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
    CustomersPayload,
    EngagementPayload,
    EventDecodeError,
    PurchaseCompleted,
    PurchaseRefunded,
    PurchasesPayload,
    ReferralConverted,
    SegmentChanged,
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


class CampaignBudgetContended(Exception):
    """Another consumer spent from a campaign budget after this batch read it, so far that the batch's
    evaluation may have awarded more than the budget had left."""


@dataclass
class BatchOutcome:
    rejections: list[Rejection] = field(default_factory=list)
    outbox_ids: list[int] = field(default_factory=list)
    outbox_rows: list[dict[str, Any]] = field(default_factory=list)
    awards: int = 0
    # The customer states the batch wrote, as written: a consumer keeps them once the batch committed.
    states: dict[Key, CustomerSnapshot] = field(default_factory=dict)


class RulesService:
    def __init__(self) -> None:
        self.cache = RulesetCache()

    async def compiled(self, session: AsyncReadSession, keys: set[VersionKey]) -> dict[VersionKey, CompiledRuleset]:
        """The compiled versions of `keys` that exist, from the cache or read and compiled."""
        out = {k: c for k in keys if (c := self.cache.get(k)) is not None}
        for row in await RulesetRepository.from_session(session).documents(keys - out.keys()):
            key = (row.tenant_id, row.ruleset_id, row.version)
            out[key] = self.cache.put(key, row.document)
        return out

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
        compiled = (await self.compiled(session, {key}))[key]
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

    async def record_segments(self, session: AsyncSession, batch: Sequence[Inbound[CustomersPayload]]) -> None:
        """Keeps each customer's latest segment.changed (by event time, so a late older one changes nothing);
        each event once. tier.changed on the same topic is this service's own output and is skipped."""
        admission = await claim_batch(
            session, processed_events, TRACKING_NAME, batch, tracked=lambda e: isinstance(e.data, SegmentChanged)
        )
        latest: dict[tuple[str, str], tuple[datetime, str]] = {}
        for message in admission.messages:
            event = message.event
            if not isinstance(event.data, SegmentChanged):
                continue
            key = (event.tenantid, event.data.customer_id)
            if key not in latest or latest[key][0] < event.time:
                latest[key] = (event.time, event.data.segment)
        await CustomerStateRepository.from_session(session).save_segments(
            [(t, c, segment, at) for (t, c), (at, segment) in latest.items()]
        )

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
        compiled = (await self.compiled(session, {key})).get(key)
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
        work = BatchWork(namespace)
        if messages:
            await self._load(session, work, [m.event for m in messages], state_cache, lock_campaigns=lock_campaigns)
        refused: list[Rejection] = []
        for m in messages:
            if work.recorded(m.event):
                continue  # a redelivered purchase: its order row names this very event
            try:
                work.apply(m.event)
            except EventRefused as exc:
                refused.append(Rejection(m, str(exc)))
        outcome.rejections.extend(refused)
        # A refused event changed nothing: release its claims, so replaying it from the DLQ (after the
        # ruleset learnt the currency, say) processes it instead of skipping it as a duplicate.
        await release(session, processed_events, admission.release_keys(refused))
        if not messages:
            return outcome
        try:
            await self._save(session, work, outcome, lock_campaigns=lock_campaigns)
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

    async def _load(
        self,
        session: AsyncSession,
        work: BatchWork,
        events: Sequence[CloudEvent[Any]],
        state_cache: StateCache | None,
        *,
        lock_campaigns: bool,
    ) -> None:
        """Reads what the batch's events need into `work`: activations, orders (and a refunded order's
        awards), versions, customer states (the cached ones from `state_cache`), campaign spend."""
        work.schedules = schedules(
            await RulesetRepository.from_session(session).activations({e.tenantid for e in events})
        )
        needed = wanted(events, work.schedules)
        orders = OrderRepository.from_session(session)
        work.orders = await orders.load(needed.orders)
        work.order_awards = await orders.awards(needed.refunded)
        work.compiled = await self.compiled(session, needed.versions | order_versions(work.orders.values()))
        cached, missing = state_cache.take(needed.customers) if state_cache is not None else ({}, needed.customers)
        work.states = cached
        work.states.update(await CustomerStateRepository.from_session(session).load(missing))
        work.budgets = budgets(work.compiled)
        work.spent = await CampaignRepository.from_session(session).spent(work.budgets, for_update=lock_campaigns)
        work.spent_read = dict(work.spent)

    async def _save(
        self, session: AsyncSession, work: BatchWork, outcome: BatchOutcome, *, lock_campaigns: bool
    ) -> None:
        """Writes what the batch changed; raises CampaignBudgetContended when, without the lock, another
        consumer spent from a budget meanwhile so far that this batch may have awarded past it."""
        written = {k: work.states[k] for k in work.dirty}
        await CustomerStateRepository.from_session(session).save((k[0], state) for k, state in written.items())
        outcome.states = written
        orders = OrderRepository.from_session(session)
        await orders.insert_orders(work.new_orders)
        # After the insert, so a refund of an order from the same batch updates the new row.
        await orders.set_refunded(
            [{"tenant_id": t, "order_id": o, "refunded_amount": amount} for (t, o), amount in work.refunded.items()]
        )
        await orders.insert_awards(work.awards)
        await orders.add_clawed_back(work.clawed)
        outcome.outbox_ids = await OutboxRepository.from_session(session).add(work.outbox)
        outcome.outbox_rows = work.outbox
        outcome.awards = len(work.awards)
        # Last, so the campaign rows stay locked (by these updates) only until the commit that follows.
        over = await CampaignRepository.from_session(session).add(
            work.spent_delta,
            budgets=None if lock_campaigns else work.budgets,
            read=work.spent_read,
        )
        if over:
            raise CampaignBudgetContended(over)


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
