from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import date
from decimal import Decimal

from sqlalchemy.ext.asyncio import AsyncSession

from metrics.errors import InvalidPeriod
from metrics.models import DailyPurchases, processed_events
from metrics.repository import DailyPurchasesRepository
from shared.consumer import Inbound, Rejection
from shared.events import PurchaseCompleted
from shared.tracking import claim_new


class MetricsService:
    async def handle_batch(self, session: AsyncSession, batch: Sequence[Inbound], *, group: str) -> list[Rejection]:
        fresh = await claim_new(session, processed_events, group, (m.event.id for m in batch))
        # Aggregate in memory first: one upsert per (tenant, day, currency) instead of one per event.
        totals: dict[tuple[str, date, str], tuple[int, Decimal]] = defaultdict(lambda: (0, Decimal(0)))
        for message in batch:
            event = message.event
            if event.id not in fresh or not isinstance(event.data, PurchaseCompleted):
                continue
            fresh.discard(event.id)
            day = (event.data.ordered_at or event.time).date()
            key = (event.tenantid, day, event.data.currency)
            orders, revenue = totals[key]
            totals[key] = (orders + 1, revenue + event.data.net_amount)
        repo = DailyPurchasesRepository.from_session(session)
        for (tenant_id, day, currency), (orders, revenue) in sorted(totals.items()):
            await repo.add(tenant_id, day, currency, orders, revenue)
        return []

    async def daily(self, session: AsyncSession, *, tenant_id: str, start: date, end: date) -> Sequence[DailyPurchases]:
        if start > end:
            raise InvalidPeriod(start, end)
        return await DailyPurchasesRepository.from_session(session).between(tenant_id, start, end)


metrics_service = MetricsService()
