"""Process once: a consumer records what it processed as tracking rows, inserted in the same transaction as
the effect, so an event delivered again finds its row and changes nothing. Every service uses this module.

Keys are (tracking name, tenant, source, id):
- an event is keyed by its tenant, its CloudEvent `source` and its `id`. CloudEvents promise only
  source + id to be unique, and only within one producer; every tenant is a producer of its own, so two
  tenants (or two sources of one tenant) may send the same id and both are processed.
- a business id (the refund, the review, the order an event names) is keyed by its tenant, source ''
  (no event has an empty source) and the id itself, under the name `<tracking name>:<field>`
  (`rules:refund_id`): two events naming one refund claw back once, whatever their event ids.

The tracking name is the name of the service whose effect the rows record (`rules`, `metrics`), never the
consumer group id: group ids carry a deployment suffix, and any group or replica of the service that sees
an event again must skip it, since the effect (state, awards, totals) is the service's.

`claim_batch` claims every key of a batch in one statement and admits, in batch order, the messages to
process: the first message of each event key that no earlier batch claimed. A message whose event key
was claimed before is a redelivery and skipped silently. A message with a new event key whose business id
another event took (in an earlier batch, or earlier in this one) is refused with a reason (the DLQ): a
different event reusing a business id is the producer's to see, not a redelivery. `release` gives back
the keys of messages refused after all: they changed nothing, and a replay from the DLQ must be processed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic

from sqlalchemy import Column, DateTime, MetaData, PrimaryKeyConstraint, String, Table, func

from shared.consumer import Inbound, Rejection
from shared.db import AsyncSession, driver_connection
from shared.events import CloudEvent, P

# (tracking name, tenant, source, id)
Key = tuple[str, str, str, str]
# The business id an event names, as (field, value), or None: e.g. ("refund_id", "R-1").
BusinessId = Callable[[CloudEvent[Any]], tuple[str, str] | None]
Tracked = Callable[[CloudEvent[Any]], bool]

BUSINESS_SOURCE = ""


def processed_events_table(metadata: MetaData) -> Table:
    return Table(
        "processed_events",
        metadata,
        Column("consumer_group", String(100), nullable=False),
        Column("tenant_id", String(63), nullable=False),
        Column("source", String(200), nullable=False),
        Column("event_id", String(200), nullable=False),
        Column("processed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        PrimaryKeyConstraint("consumer_group", "tenant_id", "source", "event_id"),
    )


def event_key(name: str, event: CloudEvent[Any]) -> Key:
    return (name, event.tenantid, event.source, event.id)


def business_key(name: str, tenant: str, business_id: tuple[str, str]) -> Key:
    return (f"{name}:{business_id[0]}", tenant, BUSINESS_SOURCE, business_id[1])


def _where(table: Table) -> str:
    return f"{table.schema}.{table.name}" if table.schema else table.name


async def claim(session: AsyncSession, table: Table, keys: Iterable[Key]) -> set[Key]:
    """Inserts the tracking rows of `keys` (one statement) and returns those no one inserted before (in this
    transaction's view)."""
    # Sorted: concurrent batches with common keys insert them in one order, so they wait, never deadlock.
    wanted = sorted(set(keys))
    if not wanted:
        return set()
    rows = await (await driver_connection(session)).fetch(
        f"""insert into {_where(table)} as p (consumer_group, tenant_id, source, event_id)
            select * from unnest($1::text[], $2::text[], $3::text[], $4::text[])
            on conflict do nothing returning p.consumer_group, p.tenant_id, p.source, p.event_id""",
        *(list(column) for column in zip(*wanted, strict=True)),
    )
    return {(r[0], r[1], r[2], r[3]) for r in rows}


async def release(session: AsyncSession, table: Table, keys: Iterable[Key]) -> None:
    """Deletes the tracking rows of `keys` (one statement)."""
    wanted = sorted(set(keys))
    if not wanted:
        return
    await (await driver_connection(session)).execute(
        f"""delete from {_where(table)} p using unnest($1::text[], $2::text[], $3::text[], $4::text[])
              as k(consumer_group, tenant_id, source, event_id)
            where p.consumer_group = k.consumer_group and p.tenant_id = k.tenant_id and p.source = k.source
              and p.event_id = k.event_id""",
        *(list(column) for column in zip(*wanted, strict=True)),
    )


@dataclass
class Admission(Generic[P]):
    """What `admit` made of a batch: the messages to process (in batch order), the messages refused for a
    business id already taken, and the keys each admitted message claimed."""

    name: str
    messages: list[Inbound[P]] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    # Keys to give back whatever happens: a refused message's event key, and a business id claimed for
    # an event that turned out to be a redelivery.
    unclaimed: list[Key] = field(default_factory=list)
    # By event key: one admitted message per event key.
    owned: dict[Key, tuple[Key, ...]] = field(default_factory=dict)

    def release_keys(self, rejections: Iterable[Rejection]) -> list[Key]:
        """The keys to release when `rejections` (of admitted messages) are refused: theirs, and `unclaimed`."""
        out = list(self.unclaimed)
        for r in rejections:
            out.extend(self.owned.get(event_key(self.name, r.message.event), ()))
        return out


def keys_of(
    name: str, batch: Sequence[Inbound[P]], tracked: Tracked | None, business_id: BusinessId | None
) -> list[tuple[Key, Key | None, bool]]:
    """Each message's event key, business key and whether the event is tracked (claimed) at all."""
    out: list[tuple[Key, Key | None, bool]] = []
    for m in batch:
        event = m.event
        ek = (name, event.tenantid, event.source, event.id)
        if tracked is not None and not tracked(event):
            out.append((ek, None, False))  # recorded by the caller, business id and all
            continue
        bid = business_id(event) if business_id is not None else None
        out.append((ek, business_key(name, event.tenantid, bid) if bid is not None else None, True))
    return out


def admit(
    name: str, batch: Sequence[Inbound[P]], keys: Sequence[tuple[Key, Key | None, bool]], claimed: set[Key]
) -> Admission[P]:
    """The pure decision of `claim_batch`, given each message's keys and what the claim inserted."""
    out: Admission[P] = Admission(name)
    seen: set[Key] = set()
    taken: set[Key] = set()
    for m, (ek, bk, tracked) in zip(batch, keys, strict=True):
        if ek in seen:
            continue  # the same event twice in one batch counts once
        seen.add(ek)
        if tracked and ek not in claimed:
            # A redelivery. A business id claimed with it is not its to keep (its first delivery took the
            # business id, or was processed before business ids were tracked).
            if bk is not None and bk in claimed and bk not in taken:
                taken.add(bk)
                out.unclaimed.append(bk)
            continue
        if bk is not None:
            if bk not in claimed or bk in taken:
                field_name = bk[0].rsplit(":", 1)[1]
                out.rejections.append(
                    Rejection(m, f"{field_name} {bk[3]!r} was already processed under another event id")
                )
                out.unclaimed.append(ek)  # a business key is only ever a tracked event's
                continue
            taken.add(bk)
        out.messages.append(m)
        if tracked:
            out.owned[ek] = (ek,) if bk is None else (ek, bk)
    return out


async def claim_batch(
    session: AsyncSession,
    table: Table,
    name: str,
    batch: Sequence[Inbound[P]],
    *,
    tracked: Tracked | None = None,
    business_id: BusinessId | None = None,
) -> Admission[P]:
    """Claims the batch's keys under the tracking name `name` in one statement and admits its messages.

    `tracked` says which events are claimed (default: all); an untracked event, business id and all, is
    recorded by the caller some other way (rules' purchases by their order rows) and only counted once
    per batch here. `business_id` names a tracked event's business id."""
    keys = keys_of(name, batch, tracked, business_id)
    wanted = [ek for ek, _, t in keys if t] + [bk for _, bk, _ in keys if bk is not None]
    claimed = await claim(session, table, wanted)
    return admit(name, batch, keys, claimed)
