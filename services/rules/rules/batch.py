"""One consumed batch, in memory: loaded once, changed event by event, saved once; and the rows of this
service's output (commands, tier changes). Compiled by mypyc (`make native`), like the engine: this is the
consumer's per-event code outside the engine."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from pydantic_core import to_json

from rules import ruleset as rs
from rules.engine import (
    AwardRecord,
    CompiledRuleset,
    CustomerSnapshot,
    Evaluation,
    EventRefused,
    PlannedEarn,
    TierChange,
    apply_event,
    apply_refund,
    check_referral,
    check_refund,
    command_id,
    evaluate,
    event_time,
    plan_clawbacks,
    review_tier,
)
from rules.models import RulesetActivation
from rules.repository import (
    AwardRow,
    CampaignRepository,
    CustomerStateRepository,
    OrderRecord,
    OrderRepository,
    OutboxRepository,
    RulesetRepository,
)
from shared.consumer import Inbound, Rejection
from shared.db import AsyncReadSession, AsyncSession
from shared.events import (
    CUSTOM_TYPE_PREFIX,
    CloudEvent,
    EngagementPayload,
    PurchaseCompleted,
    PurchaseRefunded,
    PurchasesPayload,
    ReferralConverted,
)
from shared.topics import CUSTOMERS, POINTS_COMMANDS

SOURCE = "loyalty/rules"
VersionKey = tuple[str, str, int]


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
    states: dict[tuple[str, str], CustomerSnapshot] = field(default_factory=dict)


class StateCache:
    """Customer states a consumer wrote, kept for its next batches: the customers of its partitions come back
    again and again, and reading a state costs more than evaluating the event (~15 µs of decoding per row).

    A batch takes the states it finds here out of the cache and gives back what it committed. A state
    another writer changed meanwhile (a rebalance moved the partition, a tier review) is not noticed when
    taken but when written: the repository writes a state only over the version it was read at, and the
    batch is retried with the states read again. A batch that fails gives nothing back, so nothing it
    changed in memory outlives it. The oldest entries go first beyond `limit`."""

    def __init__(self, limit: int) -> None:
        self._states: dict[tuple[str, str], CustomerSnapshot] = {}
        self._limit = limit
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._states)

    def take(self, keys: set[tuple[str, str]]) -> tuple[dict[tuple[str, str], CustomerSnapshot], set[tuple[str, str]]]:
        """The cached states of `keys`, removed from the cache, and the keys it does not hold."""
        found: dict[tuple[str, str], CustomerSnapshot] = {}
        missing: set[tuple[str, str]] = set()
        states = self._states
        for key in keys:
            state = states.pop(key, None)
            if state is None:
                missing.add(key)
            else:
                found[key] = state
        self.hits += len(found)
        self.misses += len(missing)
        return found, missing

    def keep(self, states: dict[tuple[str, str], CustomerSnapshot]) -> None:
        """States as committed; they become the newest entries."""
        cached = self._states
        cached.update(states)
        excess = len(cached) - self._limit
        if excess > 0:
            for key in list(itertools.islice(cached, excess)):
                del cached[key]

    def clear(self) -> None:
        self._states.clear()


@dataclass
class Schedule:
    """A tenant's activations sorted by effective time: the active version at t is a binary search."""

    starts: list[datetime]
    versions: list[tuple[str, int]]

    def at(self, when: datetime) -> tuple[str, int] | None:
        i = bisect.bisect_right(self.starts, when)
        return self.versions[i - 1] if i else None


class RulesetCache:
    """Compiled rulesets by (tenant, ruleset id, version). Versions never change, so entries never go stale."""

    def __init__(self, limit: int = 1000) -> None:
        self._compiled: dict[VersionKey, CompiledRuleset] = {}
        self._limit = limit

    def get(self, key: VersionKey) -> CompiledRuleset | None:
        return self._compiled.get(key)

    def put(self, key: VersionKey, document: dict[str, Any]) -> CompiledRuleset:
        compiled = CompiledRuleset.compile(key[1], key[2], rs.RulesetDocument.model_validate(document))
        if len(self._compiled) >= self._limit:
            self._compiled.pop(next(iter(self._compiled)))
        self._compiled[key] = compiled
        return compiled

    async def load(self, session: AsyncReadSession, keys: set[VersionKey]) -> dict[VersionKey, CompiledRuleset]:
        out = {k: c for k in keys if (c := self.get(k)) is not None}
        missing = keys - out.keys()
        for row in await RulesetRepository.from_session(session).documents(missing):
            key = (row.tenant_id, row.ruleset_id, row.version)
            out[key] = self.put(key, row.document)
        return out


def schedules(activations: Sequence[RulesetActivation]) -> dict[str, Schedule]:
    out: dict[str, Schedule] = {}
    for a in activations:  # ordered by tenant, effective_from, id: a later activation wins a tie
        s = out.setdefault(a.tenant_id, Schedule([], []))
        if s.starts and s.starts[-1] == a.effective_from:
            s.versions[-1] = (a.ruleset_id, a.version)
        else:
            s.starts.append(a.effective_from)
            s.versions.append((a.ruleset_id, a.version))
    return out


def event_row(
    topic: str, event_type: str, data: dict[str, Any], *, tenant: str, subject: str, event_id: str, time: datetime
) -> dict[str, Any]:
    """An outbox row of this service's output: the bytes are what the validated `CloudEvent[Model]`
    serialises to (the tests decode and re-serialise them byte for byte), written by pydantic's own
    serializer from plain dicts. Every value is valid by construction, and building the two models
    cost more than serialising them."""
    envelope = {
        "specversion": "1.0",
        "id": event_id,
        "source": SOURCE,
        "type": event_type,
        "time": time.astimezone(UTC),  # what the envelope's validator makes of any aware time
        "subject": subject,
        "datacontenttype": "application/json",
        "tenantid": tenant,
        "dataversion": 1,
        # exclude_none reaches into models only, not into plain dicts: leave the unset fields out here.
        "data": {k: v for k, v in data.items() if v is not None},
    }
    return {"topic": topic, "key": f"{tenant}:{subject}".encode(), "value": to_json(envelope, exclude_none=True)}


def breakdown_json(plan: PlannedEarn) -> bytes:
    """The award's breakdown as JSON, serialised once: the award row stores it, the command carries it."""
    return to_json(plan.breakdown)


def earn_command(
    topic: str, tenant: str, source_event: CloudEvent[Any], evaluation: Evaluation, plan: PlannedEarn, breakdown: bytes
) -> dict[str, Any]:
    """The outbox row of a `points.earn` command. Its id is the command id and its time the source
    event's, so re-evaluating gives byte-identical commands. `breakdown` is `breakdown_json(plan)`."""
    data = {
        "command_id": plan.command_id,
        "customer_id": plan.customer_id,
        "member_id": plan.member_id,
        "points": plan.points,
        "source_event_id": source_event.id,
        "matures_at": plan.matures_at,
        "ruleset_id": evaluation.ruleset_id,
        "ruleset_version": evaluation.version,
        "reason": f"{source_event.type} under ruleset {evaluation.ruleset_id} v{evaluation.version}",
    }
    row = event_row(
        topic,
        "points.earn",
        data,
        tenant=tenant,
        subject=plan.customer_id,
        event_id=plan.command_id,
        time=event_time(source_event),
    )
    # The breakdown is the model's last field and `data` the envelope's: it goes in before the closing "}}".
    row["value"] = b"".join((row["value"][:-2], b',"breakdown":', breakdown, b"}}"))
    return row


def tier_changed(
    topic: str,
    tenant: str,
    customer_id: str,
    change: TierChange,
    compiled: CompiledRuleset,
    cause: str,
    at: datetime,
) -> dict[str, Any]:
    """The outbox row of a `tier.changed` event; its id derives from the cause, so a replay repeats it."""
    data = {
        "customer_id": customer_id,
        "previous_tier": change.previous,
        "tier": change.tier,
        "reason": change.reason,
        "ruleset_id": compiled.ruleset_id,
        "ruleset_version": compiled.version,
    }
    event_id = command_id("tier", tenant, cause, customer_id)
    return event_row(topic, "tier.changed", data, tenant=tenant, subject=customer_id, event_id=event_id, time=at)


class BatchWork:
    """The in-memory state of one batch: loaded once, changed event by event, saved once."""

    def __init__(
        self,
        cache: RulesetCache,
        session: AsyncSession,
        namespace: str,
        *,
        lock_campaigns: bool = True,
        state_cache: StateCache | None = None,
    ) -> None:
        self.cache = cache
        self.state_cache = state_cache
        self.session = session
        self.namespace = namespace
        self.lock_campaigns = lock_campaigns
        # The smallest budget any version in the batch gives a campaign, and the spend read at load.
        self.budgets: dict[tuple[str, str], int] = {}
        self.spent_read: dict[tuple[str, str], int] = {}
        self.states: dict[tuple[str, str], CustomerSnapshot] = {}
        self.dirty: set[tuple[str, str]] = set()
        self.orders: dict[tuple[str, str], OrderRecord] = {}
        self.new_orders: list[OrderRecord] = []
        self.refunded: dict[tuple[str, str], Decimal] = {}
        self.order_awards: dict[tuple[str, str], list[AwardRecord]] = {}
        self.awards: list[AwardRow] = []
        self.clawed: dict[tuple[str, str, str], int] = {}  # (tenant, customer, command) -> points
        self.spent: dict[tuple[str, str], int] = {}
        self.spent_delta: dict[tuple[str, str], int] = {}
        self.outbox: list[dict[str, Any]] = []
        self.schedules: dict[str, Schedule] = {}
        self.compiled: dict[VersionKey, CompiledRuleset] = {}

    def version_for(self, event: CloudEvent[Any]) -> CompiledRuleset | None:
        schedule = self.schedules.get(event.tenantid)
        active = schedule.at(event_time(event)) if schedule else None
        return self.compiled.get((event.tenantid, *active)) if active else None

    async def load(self, messages: Sequence[Inbound[PurchasesPayload | EngagementPayload]]) -> None:
        session = self.session
        tenants = {m.event.tenantid for m in messages}
        self.schedules = schedules(await RulesetRepository.from_session(session).activations(tenants))
        wanted: set[VersionKey] = set()
        order_keys: set[tuple[str, str]] = set()
        refund_keys: set[tuple[str, str]] = set()
        customer_keys: set[tuple[str, str]] = set()
        for m in messages:
            e = m.event
            schedule = self.schedules.get(e.tenantid)
            active = schedule.at(event_time(e)) if schedule else None
            if active:
                wanted.add((e.tenantid, *active))
            customer_keys.add((e.tenantid, e.data.customer_id))
            if isinstance(e.data, ReferralConverted):
                customer_keys.add((e.tenantid, e.data.referred_customer_id))
            if isinstance(e.data, PurchaseRefunded):
                order_keys.add((e.tenantid, e.data.original_order_id))
                refund_keys.add((e.tenantid, e.data.original_order_id))
            if isinstance(e.data, PurchaseCompleted):
                order_keys.add((e.tenantid, e.data.order_id))
        orders = OrderRepository.from_session(session)
        self.orders = await orders.load(order_keys)
        # Only a refund reads an order's awards (a purchase's own awards are made in this batch).
        self.order_awards = await orders.awards(refund_keys)
        for order in self.orders.values():
            if order.ruleset_id is not None and order.ruleset_version is not None:
                wanted.add((order.tenant_id, order.ruleset_id, order.ruleset_version))
        self.compiled = await self.cache.load(session, wanted)
        cached, missing = self.state_cache.take(customer_keys) if self.state_cache is not None else ({}, customer_keys)
        self.states = cached
        self.states.update(await CustomerStateRepository.from_session(session).load(missing))
        budgets: dict[tuple[str, str], int] = {}
        for (t, _, _), comp in self.compiled.items():
            for c, spec in comp.document.campaigns.items():
                if spec.budget is not None:
                    budgets[(t, c)] = min(spec.budget, budgets.get((t, c), spec.budget))
        self.budgets = budgets
        self.spent = await CampaignRepository.from_session(session).spent(budgets, for_update=self.lock_campaigns)
        self.spent_read = dict(self.spent)

    def recorded(self, event: CloudEvent[Any]) -> bool:
        """A purchase this service recorded before (under this event id): a redelivery to skip."""
        data = event.data
        if not isinstance(data, PurchaseCompleted):
            return False
        seen = self.orders.get((event.tenantid, data.order_id))
        return seen is not None and seen.event_id == event.id

    def state(self, tenant: str, customer_id: str) -> CustomerSnapshot:
        key = (tenant, customer_id)
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = CustomerSnapshot(customer_id)
        return state

    def apply(self, message: Inbound[PurchasesPayload | EngagementPayload]) -> None:
        event = message.event
        if isinstance(event.data, PurchaseRefunded):
            self._refund(event, event.data)
            return
        tenant = event.tenantid
        data = event.data
        compiled = self.version_for(event)
        order_key = (tenant, data.order_id) if isinstance(data, PurchaseCompleted) else None
        if order_key is not None and order_key in self.orders:
            seen = self.orders[order_key]
            raise EventRefused(f"order {order_key[1]!r} was already processed (event {seen.event_id})")
        referred: CustomerSnapshot | None = None
        if isinstance(data, ReferralConverted):
            check_referral(data)
            referred = self.state(tenant, data.referred_customer_id)
        customer = self.state(tenant, data.customer_id)
        evaluation: Evaluation | None = None
        if compiled is not None:
            spent = {c: p for (t, c), p in self.spent.items() if t == tenant}
            evaluation = evaluate(compiled, event, customer, referred=referred, campaign_spent=spent)
        elif event.type.startswith(CUSTOM_TYPE_PREFIX):
            raise EventRefused(
                f"custom event type {event.type!r}: tenant {tenant!r} has no active ruleset declaring it"
            )
        if order_key is not None and isinstance(data, PurchaseCompleted):
            order = OrderRecord(
                tenant_id=tenant,
                order_id=data.order_id,
                customer_id=data.customer_id,
                event_id=event.id,
                currency=data.currency,
                net_amount=data.net_amount,
                refunded_amount=Decimal(0),
                ordered_at=event_time(event),
                ruleset_id=compiled.ruleset_id if compiled else None,
                ruleset_version=compiled.version if compiled else None,
            )
            self.orders[order_key] = order
            self.new_orders.append(order)
        spend_factor = (
            compiled.spend_factor(data.currency) if compiled and isinstance(data, PurchaseCompleted) else Decimal(1)
        )
        touched = [customer] + ([referred] if referred is not None else [])
        for snapshot in touched:
            points = evaluation.points_by_customer.get(snapshot.customer_id, 0) if evaluation else 0
            counters = evaluation.counters.get(snapshot.customer_id, {}) if evaluation else {}
            if snapshot is customer or points or counters:
                apply_event(
                    snapshot,
                    event,
                    spend_factor=spend_factor,
                    points=points,
                    counters=counters,
                )
                self.dirty.add((tenant, snapshot.customer_id))
            elif snapshot.version:
                # A stored state the evaluation read but did not change (a referred customer who earns
                # nothing) is written all the same: only a write checks that it was still the current one.
                self.dirty.add((tenant, snapshot.customer_id))
        if evaluation is None or compiled is None:
            return
        for campaign, points in evaluation.campaign_points.items():
            self.spent[(tenant, campaign)] = self.spent.get((tenant, campaign), 0) + points
            self.spent_delta[(tenant, campaign)] = self.spent_delta.get((tenant, campaign), 0) + points
        commands_topic = f"{self.namespace}{POINTS_COMMANDS}"
        for plan in evaluation.commands:
            breakdown = breakdown_json(plan)
            self.outbox.append(earn_command(commands_topic, tenant, event, evaluation, plan, breakdown))
            record = AwardRecord(plan.command_id, plan.customer_id, plan.points, 0)
            if order_key is not None:
                self.order_awards.setdefault(order_key, []).append(record)
            self.awards.append(
                AwardRow(
                    plan.command_id,
                    tenant,
                    plan.customer_id,
                    order_key[1] if order_key else None,
                    event.id,
                    evaluation.ruleset_id,
                    evaluation.version,
                    plan.points,
                    plan.matures_at,
                    breakdown.decode(),
                )
            )
        tiers = compiled.document.tiers
        if tiers is not None:
            for snapshot in touched:
                change = review_tier(snapshot, tiers, event_time(event))
                if change is None:
                    continue
                self.dirty.add((tenant, snapshot.customer_id))
                topic = f"{self.namespace}{CUSTOMERS}"
                at = event_time(event)
                self.outbox.append(tier_changed(topic, tenant, snapshot.customer_id, change, compiled, event.id, at))

    def _refund(self, event: CloudEvent[Any], refund: PurchaseRefunded) -> None:
        tenant = event.tenantid
        key = (tenant, refund.original_order_id)
        order = self.orders.get(key)
        if order is None:
            raise EventRefused(f"refund of order {refund.original_order_id!r}, which this service never saw")
        # Checked before the order customer's state is touched: a refund naming another customer did not
        # load that state, and a write over it would fail, batch after batch, as if another writer had won.
        amount = check_refund(refund, order_id=order.order_id, customer_id=order.customer_id, currency=order.currency)
        before = self.refunded.get(key, order.refunded_amount)
        now = min(amount, max(order.net_amount - before, Decimal(0)))
        awards = self.order_awards.get(key, [])
        plans = plan_clawbacks(
            tenant, event.id, awards, order_net=order.net_amount, refunded_before=before, refunded_now=now
        )
        self.refunded[key] = before + now
        by_id = {p.original_command_id: p for p in plans}
        self.order_awards[key] = [
            AwardRecord(
                a.command_id,
                a.customer_id,
                a.points,
                a.clawed_back + (by_id[a.command_id].points if a.command_id in by_id else 0),
            )
            for a in awards
        ]
        topic = f"{self.namespace}{POINTS_COMMANDS}"
        for plan in plans:
            award = (tenant, plan.customer_id, plan.original_command_id)
            self.clawed[award] = self.clawed.get(award, 0) + plan.points
            data = {
                "command_id": plan.command_id,
                "customer_id": plan.customer_id,
                "original_command_id": plan.original_command_id,
                "points": plan.points,
                "source_event_id": event.id,
                "reason": (
                    f"refund {refund.refund_id} of order {order.order_id}: {now} of {order.net_amount} {order.currency}"
                    f" under ruleset {order.ruleset_id} v{order.ruleset_version}"
                ),
            }
            self.outbox.append(
                event_row(
                    topic,
                    "points.clawback",
                    data,
                    tenant=tenant,
                    subject=plan.customer_id,
                    event_id=plan.command_id,
                    time=event.time,
                )
            )
        compiled = (
            self.compiled.get((tenant, order.ruleset_id, order.ruleset_version))
            if order.ruleset_id is not None and order.ruleset_version is not None
            else None
        )
        state = self.state(tenant, order.customer_id)
        apply_refund(state, order.ordered_at, now, compiled.spend_factor(order.currency) if compiled else Decimal(1))
        self.dirty.add((tenant, order.customer_id))

    async def save(self, outcome: BatchOutcome) -> None:
        session = self.session
        written = {k: self.states[k] for k in self.dirty}
        await CustomerStateRepository.from_session(session).save((k[0], state) for k, state in written.items())
        outcome.states = written
        orders = OrderRepository.from_session(session)
        await orders.insert_orders(self.new_orders)
        # After the insert, so a refund of an order from the same batch updates the new row.
        await orders.set_refunded(
            [{"tenant_id": t, "order_id": o, "refunded_amount": amount} for (t, o), amount in self.refunded.items()]
        )
        await orders.insert_awards(self.awards)
        await orders.add_clawed_back(self.clawed)
        outcome.outbox_ids = await OutboxRepository.from_session(session).add(self.outbox)
        outcome.outbox_rows = self.outbox
        outcome.awards = len(self.awards)
        # Last, so the campaign rows stay locked (by these updates) only until the commit that follows.
        over = await CampaignRepository.from_session(session).add(
            self.spent_delta,
            budgets=None if self.lock_campaigns else self.budgets,
            read=self.spent_read,
        )
        if over:
            raise CampaignBudgetContended(over)
