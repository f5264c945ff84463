"""One consumed batch, in memory: what the service loaded for it, changed event by event, and what the service
then saves; and the rows of this service's output (commands, tier changes). Pure: no I/O, nothing awaited
(the service, rules.service, loads and saves). Compiled by mypyc (`make native`), like the engine: this is
the consumer's per-event code outside the engine."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, NamedTuple

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
from shared.events import (
    CUSTOM_TYPE_PREFIX,
    CloudEvent,
    PurchaseCompleted,
    PurchaseRefunded,
    ReferralConverted,
)
from shared.topics import CUSTOMERS, POINTS_COMMANDS

SOURCE = "loyalty/rules"
Key = tuple[str, str]  # (tenant, customer or order id)
VersionKey = tuple[str, str, int]  # (tenant, ruleset id, version)


class OrderRecord(NamedTuple):
    """An order as the batch sees it (a named tuple: one is built per purchase, and written as a row, its
    fields being the COPY's columns)."""

    tenant_id: str
    order_id: str
    customer_id: str
    event_id: str
    currency: str
    net_amount: Decimal
    refunded_amount: Decimal
    ordered_at: datetime
    ruleset_id: str | None
    ruleset_version: int | None


class AwardRow(NamedTuple):
    """An award as written (a named tuple in the COPY's column order: one is built per command)."""

    command_id: str
    tenant_id: str
    customer_id: str
    order_id: str | None
    event_id: str
    ruleset_id: str
    ruleset_version: int
    points: int
    matures_at: datetime | None
    breakdown: str  # JSON


class StateCache:
    """Customer states a consumer wrote, kept for its next batches: the customers of its partitions come back
    again and again, and reading a state costs more than evaluating the event (~15 µs of decoding per row).

    A batch takes the states it finds here out of the cache and gives back what it committed. A state
    another writer changed meanwhile (a rebalance moved the partition, a tier review) is not noticed when
    taken but when written: the repository writes a state only over the version it was read at, and the
    batch is retried with the states read again. A batch that fails gives nothing back, so nothing it
    changed in memory outlives it. The oldest entries go first beyond `limit`."""

    def __init__(self, limit: int) -> None:
        self._states: dict[Key, CustomerSnapshot] = {}
        self._limit = limit
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._states)

    def take(self, keys: set[Key]) -> tuple[dict[Key, CustomerSnapshot], set[Key]]:
        """The cached states of `keys`, removed from the cache, and the keys it does not hold."""
        found: dict[Key, CustomerSnapshot] = {}
        missing: set[Key] = set()
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

    def keep(self, states: dict[Key, CustomerSnapshot]) -> None:
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


@dataclass
class Wanted:
    """What a batch reads before its first event (rules.service loads it)."""

    versions: set[VersionKey]  # the versions active at its events (the orders' versions are added once read)
    orders: set[Key]  # the orders its purchases and refunds name
    refunded: set[Key]  # the orders its refunds name: their awards are read (a purchase's are made here)
    customers: set[Key]  # the customers its events name


def wanted(events: Iterable[CloudEvent[Any]], schedules: dict[str, Schedule]) -> Wanted:
    out = Wanted(set(), set(), set(), set())
    for e in events:
        schedule = schedules.get(e.tenantid)
        active = schedule.at(event_time(e)) if schedule else None
        if active:
            out.versions.add((e.tenantid, *active))
        out.customers.add((e.tenantid, e.data.customer_id))
        if isinstance(e.data, ReferralConverted):
            out.customers.add((e.tenantid, e.data.referred_customer_id))
        if isinstance(e.data, PurchaseRefunded):
            out.orders.add((e.tenantid, e.data.original_order_id))
            out.refunded.add((e.tenantid, e.data.original_order_id))
        if isinstance(e.data, PurchaseCompleted):
            out.orders.add((e.tenantid, e.data.order_id))
    return out


def order_versions(orders: Iterable[OrderRecord]) -> set[VersionKey]:
    """The versions the orders were evaluated under (a refund's clawback reads its order's spend factor)."""
    return {
        (o.tenant_id, o.ruleset_id, o.ruleset_version)
        for o in orders
        if o.ruleset_id is not None and o.ruleset_version is not None
    }


def budgets(compiled: dict[VersionKey, CompiledRuleset]) -> dict[Key, int]:
    """(tenant, campaign) -> the smallest budget any of the versions gives the campaign."""
    out: dict[Key, int] = {}
    for (tenant, _, _), version in compiled.items():
        for campaign, spec in version.document.campaigns.items():
            if spec.budget is not None:
                out[(tenant, campaign)] = min(spec.budget, out.get((tenant, campaign), spec.budget))
    return out


class BatchWork:
    """The in-memory state of one batch: what the service loaded (the `wanted` versions, orders, states and
    campaign spend), changed event by event by `apply`, and what the service then saves (the dirty states,
    new orders, refunded amounts, awards, clawbacks, campaign spend and outbox rows)."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        # Loaded.
        self.schedules: dict[str, Schedule] = {}
        self.compiled: dict[VersionKey, CompiledRuleset] = {}
        self.orders: dict[Key, OrderRecord] = {}
        self.order_awards: dict[Key, list[AwardRecord]] = {}
        self.states: dict[Key, CustomerSnapshot] = {}
        self.budgets: dict[Key, int] = {}  # see budgets()
        self.spent_read: dict[Key, int] = {}  # (tenant, campaign) -> spent, as read
        self.spent: dict[Key, int] = {}  # the same, as the batch spends
        # Made by the events.
        self.dirty: set[Key] = set()
        self.new_orders: list[OrderRecord] = []
        self.refunded: dict[Key, Decimal] = {}
        self.awards: list[AwardRow] = []
        self.clawed: dict[tuple[str, str, str], int] = {}  # (tenant, customer, command) -> points
        self.spent_delta: dict[Key, int] = {}
        self.outbox: list[dict[str, Any]] = []

    def version_for(self, event: CloudEvent[Any]) -> CompiledRuleset | None:
        schedule = self.schedules.get(event.tenantid)
        active = schedule.at(event_time(event)) if schedule else None
        return self.compiled.get((event.tenantid, *active)) if active else None

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

    def apply(self, event: CloudEvent[Any]) -> None:
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
