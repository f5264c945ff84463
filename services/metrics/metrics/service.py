from __future__ import annotations

import base64
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from datetime import date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, cast

from asyncpg import Record
from sqlalchemy.ext.asyncio import async_sessionmaker

from metrics import schemas
from metrics.errors import CustomerNotFound, InvalidCursor, InvalidPeriod
from metrics.models import LIST_SORTS, DailyPurchases, processed_events
from metrics.repository import (
    ConfigRepository,
    DailyPurchasesRepository,
    OutboxRepository,
    SegmentRepository,
    key_types,
)
from metrics.segments import SEGMENTS, CustomerFacts, Segment, classify
from shared.consumer import Inbound, Rejection
from shared.db import AsyncReadSession, AsyncSession, transaction
from shared.events import (
    EARLIEST,
    LATEST,
    MAX_IDENTIFIER,
    CloudEvent,
    PurchaseCompleted,
    PurchasesPayload,
    SegmentChanged,
    make_event,
)
from shared.topics import CUSTOMERS
from shared.tracking import claim_batch, release

# The tracking name (shared.tracking): the service's, not the consumer group's.
TRACKING_NAME = "metrics"


def _order_id(event: CloudEvent[PurchasesPayload]) -> tuple[str, str] | None:
    # An order counts once per tenant, whatever event ids it arrives under (as in the rules service).
    return ("order_id", event.data.order_id) if isinstance(event.data, PurchaseCompleted) else None


class MetricsService:
    async def handle_batch(self, session: AsyncSession, batch: Sequence[Inbound[PurchasesPayload]]) -> list[Rejection]:
        admission = await claim_batch(session, processed_events, TRACKING_NAME, batch, business_id=_order_id)
        # Aggregate in memory first: one upsert per (tenant, day, currency) instead of one per event.
        totals: dict[tuple[str, date, str], tuple[int, Decimal]] = defaultdict(lambda: (0, Decimal(0)))
        for message in admission.messages:
            event = message.event
            if not isinstance(event.data, PurchaseCompleted):
                continue
            day = (event.data.ordered_at or event.time).date()
            key = (event.tenantid, day, event.data.currency)
            orders, revenue = totals[key]
            totals[key] = (orders + 1, revenue + event.data.net_amount)
        repo = DailyPurchasesRepository.from_session(session)
        for (tenant_id, day, currency), (orders, revenue) in sorted(totals.items()):
            await repo.add(tenant_id, day, currency, orders, revenue)
        # A duplicate order changed nothing: its event's claim goes, so a replay from the DLQ is not skipped.
        await release(session, processed_events, admission.release_keys(admission.rejections))
        return admission.rejections

    async def daily(
        self, session: AsyncReadSession, *, tenant_id: str, start: date, end: date
    ) -> Sequence[DailyPurchases]:
        if start > end:
            raise InvalidPeriod(start, end)
        return await DailyPurchasesRepository.from_session(session).between(tenant_id, start, end)

    async def config(self, session: AsyncReadSession, tenant_id: str) -> schemas.TenantConfig:
        row = await ConfigRepository.from_session(session).get(tenant_id)
        return schemas.TenantConfig() if row is None else schemas.TenantConfig.model_validate(row)

    async def put_config(
        self, session: AsyncSession, tenant_id: str, update: schemas.TenantConfigUpdate
    ) -> schemas.TenantConfig:
        values = update.model_dump(mode="json")
        row = await ConfigRepository.from_session(session).put(tenant_id, values)
        return schemas.TenantConfig.model_validate(row)


metrics_service = MetricsService()


# --- value segments ---------------------------------------------------------------------------------------

SEGMENT_SOURCE = "metrics"
LIST_MAX = 500


def _facts(row: Record) -> CustomerFacts:
    gap = row["median_gap_s"]
    return CustomerFacts(
        customer_id=row["customer_id"],
        first_purchase_at=row["first_purchase_at"],
        last_purchase_at=row["last_purchase_at"],
        orders=row["orders"],
        median_gap=None if gap is None else timedelta(seconds=float(gap)),
        priced_orders=row["priced"],
        discounted_orders=row["discounted"],
        last_nps=row["last_nps"],
        last_nps_at=row["last_nps_at"],
        last_review_at=row["last_review_at"],
        last_referral_at=row["last_referral_at"],
        p_alive=None if row["p_alive"] is None else float(row["p_alive"]),
    )


def encode_cursor(sort: str, values: Sequence[Any]) -> str:
    """An opaque cursor: the sort and the last row's key values."""
    plain = [v if isinstance(v, bool) else v.isoformat() if isinstance(v, datetime) else str(v) for v in values]
    return base64.urlsafe_b64encode(json.dumps([sort, *plain]).encode()).decode().rstrip("=")


def _key_value(raw: object, kind: str) -> Any:
    if kind == "boolean" and isinstance(raw, bool):
        return raw
    if not isinstance(raw, str) or len(raw) > MAX_IDENTIFIER or "\x00" in raw:
        raise ValueError(raw)
    if kind == "numeric":
        number = Decimal(raw)
        if not number.is_finite() or abs(number) > Decimal(10**30):
            raise ValueError(raw)
        return number
    if kind == "float8":
        value = float(raw)
        if not math.isfinite(value):
            raise ValueError(raw)
        return value
    if kind == "timestamptz":
        at = datetime.fromisoformat(raw)
        if at.tzinfo is None or not EARLIEST <= at < LATEST:
            raise ValueError(raw)
        return at
    if kind == "text":
        return raw
    raise ValueError(raw)


def decode_cursor(cursor: str, sort: str) -> list[Any]:
    """The key values of a cursor `encode_cursor` made for this sort; InvalidCursor for anything else."""
    try:
        if len(cursor) > 2000:
            raise ValueError("too long")
        decoded = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        kinds = key_types(sort)
        if not isinstance(decoded, list) or decoded[:1] != [sort] or len(decoded) != len(kinds) + 1:
            raise ValueError("not this sort's cursor")
        return [_key_value(raw, kind) for raw, kind in zip(decoded[1:], kinds, strict=True)]
    except (ValueError, TypeError, InvalidOperation, RecursionError) as exc:
        raise InvalidCursor() from exc


class SegmentService:
    async def tenant_config(self, session: AsyncReadSession, tenant_id: str) -> schemas.TenantConfig:
        row = await ConfigRepository.from_session(session).get(tenant_id)
        return schemas.TenantConfig() if row is None else schemas.TenantConfig.model_validate(row)

    async def reclassify(
        self, session: AsyncSession, tenant_id: str, customer_ids: Sequence[str], *, now: datetime, namespace: str
    ) -> int:
        """Classifies these customers of the tenant as of `now` (those with a purchase), stores their segments
        with the list's sort keys and writes a segment.changed to the outbox for each change. Returns the
        number of changes."""
        if not customer_ids:
            return 0
        config = await self.tenant_config(session, tenant_id)
        repo = SegmentRepository.from_session(session)
        current = await repo.lock_current(tenant_id, sorted(set(customer_ids)))
        rows: list[tuple[Any, ...]] = []
        outbox: list[tuple[str, bytes, bytes]] = []
        for record in await repo.facts(tenant_id, customer_ids):
            facts = _facts(record)
            result = classify(facts, config.segment_thresholds, now=now, window_days=config.activity_window_days)
            previous, since = current.get(facts.customer_id, (None, now))
            if result.segment != previous:
                since = now
                event = make_event(
                    "segment.changed",
                    SegmentChanged(
                        customer_id=facts.customer_id,
                        previous_segment=cast(Segment | None, previous),
                        segment=result.segment,
                        reason=result.reason,
                    ),
                    tenant_id=tenant_id,
                    source=SEGMENT_SOURCE,
                    time=now,
                )
                outbox.append((f"{namespace}{CUSTOMERS}", event.key, event.to_bytes()))
            rows.append(
                (
                    tenant_id,
                    facts.customer_id,
                    result.segment,
                    result.reason,
                    since,
                    now,
                    facts.orders,
                    record["net_revenue"],
                    facts.last_purchase_at,
                    record["clv_12m"],
                    facts.p_alive,
                )
            )
        await repo.save(rows)
        await OutboxRepository.from_session(session).add(outbox)
        return len(outbox)

    async def reclassify_tenant(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        tenant_id: str,
        *,
        now: datetime,
        namespace: str,
        page: int = 1000,
    ) -> tuple[int, int]:
        """The daily run for one tenant: every customer with a purchase, a page per transaction (so the locks
        and the work of one transaction stay bounded). Returns (classified, changed)."""
        seen = changed = 0
        after = ""
        while True:
            async with transaction(sessionmaker) as session:
                ids = await SegmentRepository.from_session(session).customer_page(tenant_id, after=after, limit=page)
                if not ids:
                    return seen, changed
                changed += await self.reclassify(session, tenant_id, ids, now=now, namespace=namespace)
            seen += len(ids)
            after = ids[-1]

    async def tenants(self, session: AsyncReadSession) -> list[str]:
        return await SegmentRepository.from_session(session).tenants()

    async def overview(self, session: AsyncReadSession, tenant_id: str) -> schemas.SegmentOverview:
        config = await self.tenant_config(session, tenant_id)
        counts = await SegmentRepository.from_session(session).counts(tenant_id)
        return schemas.SegmentOverview(
            counts={s: counts.get(s, 0) for s in SEGMENTS},
            customers=sum(counts.values()),
            activity_window_days=config.activity_window_days,
            thresholds=config.segment_thresholds,
        )

    async def customers(
        self,
        session: AsyncReadSession,
        tenant_id: str,
        *,
        sort: schemas.CustomerSort,
        segment: Segment | None,
        cursor: str | None,
        limit: int,
    ) -> schemas.CustomerList:
        after = None if cursor is None else decode_cursor(cursor, sort)
        rows = await SegmentRepository.from_session(session).page(
            tenant_id, sort=sort, segment=segment, after=after, limit=limit
        )
        items = [schemas.CustomerListItem.model_validate(dict(r)) for r in rows]
        next_cursor = None
        if len(rows) == limit:
            keys = LIST_SORTS[sort][0]
            next_cursor = encode_cursor(sort, [rows[-1][f"k{i}"] for i in range(len(keys))])
        return schemas.CustomerList(items=items, next_cursor=next_cursor)

    async def customer_metrics(
        self, session: AsyncReadSession, tenant_id: str, customer_id: str
    ) -> schemas.CustomerMetrics:
        repo = SegmentRepository.from_session(session)
        summary = await repo.summary(tenant_id, customer_id)
        if summary is None:
            raise CustomerNotFound(customer_id)
        segment = await repo.get(tenant_id, customer_id)
        return schemas.CustomerMetrics.from_rows(dict(summary), segment)


segment_service = SegmentService()
