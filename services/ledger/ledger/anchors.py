"""Chain heads anchored outside the database.

Each account's entries form a hash chain whose head (last seq and hash) sits in the database. Whoever can
rewrite the database can also recompute every hash, so the chain alone proves nothing against that. The
ledger therefore publishes each changed head, signed with HMAC-SHA256 under `LEDGER_ANCHOR_KEY` (a key the
database does not hold), as `ledger.chain.anchored` on `loyalty.ledger-anchors.v1` (compacted, keyed
`tenant:account`) every `LEDGER_ANCHOR_INTERVAL_S`. `verify` reads the latest anchor of each account back
and checks that the entry at the anchored seq still exists with the anchored hash: a rewritten, removed
or truncated entry up to the anchor changes that hash or removes that entry. Entries after the newest
anchor are covered by the chain alone until the next anchoring.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer
from sqlalchemy.ext.asyncio import async_sessionmaker

from ledger.config import Settings
from ledger.repository import LedgerRepository
from shared.db import AsyncSession
from shared.events import ChainAnchored, EventDecodeError, decode_event, make_event, utcnow
from shared.kafka import EventProducer
from shared.topics import LEDGER_ANCHORS

log = logging.getLogger(__name__)

# Heads are read again from a little before the previous run: a transaction that began before it and
# committed after it carries an older updated_at. Re-publishing a head is harmless (same key, same value).
OVERLAP = timedelta(minutes=5)
PAGE = 5000
ANCHOR_TYPES = frozenset({"ledger.chain.anchored"})


def sign(key: bytes, tenant_id: str, account_id: str, seq: int, entry_hash: str, signed_at: datetime) -> str:
    message = "\n".join((tenant_id, account_id, str(seq), entry_hash, signed_at.isoformat()))
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Anchors:
    """The latest anchor of each account of one tenant, as read from the topic (or why it could not be)."""

    key: bytes
    tenant_id: str
    latest: dict[str, ChainAnchored] = field(default_factory=dict)
    error: str | None = None

    def check(self, account_id: str, entries: Sequence[dict[str, Any]]) -> tuple[int | None, list[str]]:
        """The anchored seq of the account (None: not anchored yet) and what its entries contradict."""
        if self.error is not None:
            return None, [f"the anchors could not be read: {self.error}"]
        anchor = self.latest.get(account_id)
        if anchor is None:
            return None, []
        at = anchor.signed_at.isoformat()
        expected = sign(self.key, self.tenant_id, account_id, anchor.sequence, anchor.entry_hash, anchor.signed_at)
        if not hmac.compare_digest(expected, anchor.signature):
            return None, [f"the anchor of seq {anchor.sequence} ({at}) is not signed with this ledger's anchor key"]
        by_seq = {entry["seq"]: entry for entry in entries}
        entry = by_seq.get(anchor.sequence)
        if entry is None:
            last = max(by_seq, default=0)
            return anchor.sequence, [f"seq {anchor.sequence} was anchored at {at}, but the chain ends at {last}"]
        if entry["hash"] != anchor.entry_hash:
            return anchor.sequence, [
                f"entry {anchor.sequence}: its hash differs from the chain head anchored at {at} "
                "(the chain up to it was rewritten)"
            ]
        return anchor.sequence, []


async def publish_heads(
    sessionmaker: async_sessionmaker[AsyncSession],
    producer: EventProducer,
    settings: Settings,
    *,
    since: datetime | None,
    now: datetime | None = None,
) -> int:
    """Signs and publishes the chain heads changed since `since` (all when None); returns how many."""
    key = settings.anchor_key.get_secret_value().encode()
    topic = settings.topic(LEDGER_ANCHORS)
    signed_at = now or utcnow()
    published = 0
    after: tuple[str, str] | None = None
    while True:
        async with sessionmaker() as session:
            heads = await LedgerRepository.from_session(session).chain_heads(since=since, after=after, limit=PAGE)
        events = [
            make_event(
                "ledger.chain.anchored",
                ChainAnchored(
                    account_id=account_id,
                    sequence=seq,
                    entry_hash=entry_hash,
                    signed_at=signed_at,
                    signature=sign(key, tenant_id, account_id, seq, entry_hash, signed_at),
                ),
                tenant_id=tenant_id,
                source="loyalty/ledger",
                subject=account_id,
                time=signed_at,
            )
            for tenant_id, account_id, seq, entry_hash in heads
        ]
        await producer.publish_many(topic, events)
        published += len(events)
        if len(heads) < PAGE:
            return published
        after = (heads[-1][0], heads[-1][1])


async def anchor_loop(
    sessionmaker: async_sessionmaker[AsyncSession], producer: EventProducer, settings: Settings
) -> None:
    since: datetime | None = None
    while True:
        started = utcnow()
        try:
            count = await publish_heads(
                sessionmaker, producer, settings, since=None if since is None else since - OVERLAP
            )
            since = started
            if count:
                log.info("chain heads anchored", extra={"heads": count})
        except Exception:
            log.exception("anchoring the chain heads failed; retrying at the next interval")
        await asyncio.sleep(settings.anchor_interval_s)


async def read_anchors(settings: Settings, tenant_id: str, account_id: str | None = None) -> Anchors:
    """The latest anchor of each account of the tenant (or of one account), read from the topic up to its
    current end; a failure to read is reported in `error`, which verify turns into a problem."""
    key = settings.anchor_key.get_secret_value().encode()
    try:
        latest = await asyncio.wait_for(_read(settings, tenant_id, account_id), timeout=settings.anchor_read_timeout_s)
    except Exception as exc:  # verify reports it: an unread anchor must not pass as a checked one
        return Anchors(key, tenant_id, error=f"{type(exc).__name__}: {exc}"[:300])
    return Anchors(key, tenant_id, latest)


async def _read(settings: Settings, tenant_id: str, account_id: str | None) -> dict[str, ChainAnchored]:
    topic = settings.topic(LEDGER_ANCHORS)
    wanted = f"{tenant_id}:{account_id}".encode() if account_id is not None else None
    prefix = f"{tenant_id}:".encode()
    # Without a group id the consumer takes every partition of the topic: wait until it has them.
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        while True:
            partitions = sorted(consumer.assignment())
            if partitions:
                break
            await asyncio.sleep(0.05)  # the assignment comes with the topic's metadata
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        left = {tp for tp in partitions if ends[tp] > 0}
        latest: dict[str, ChainAnchored] = {}
        while left:
            for records in (await consumer.getmany(*left, timeout_ms=500)).values():
                for record in records:
                    key = record.key or b""
                    if (wanted is not None and key != wanted) or not key.startswith(prefix):
                        continue
                    try:
                        event = decode_event(record.value, allowed_types=ANCHOR_TYPES)
                    except EventDecodeError as exc:  # not an anchor: it anchors nothing (and signs nothing)
                        log.warning(
                            "skipped a record of the anchors topic", extra={"offset": record.offset, "error": str(exc)}
                        )
                        continue
                    anchor = event.data
                    if event.tenantid != tenant_id or not isinstance(anchor, ChainAnchored):
                        continue
                    known = latest.get(anchor.account_id)
                    if known is None or anchor.sequence >= known.sequence:
                        latest[anchor.account_id] = anchor
            for tp in list(left):
                if await consumer.position(tp) >= ends[tp]:
                    left.discard(tp)
        return latest
    finally:
        await consumer.stop()
