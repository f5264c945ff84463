from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import date
from decimal import Decimal

from metrics import schemas
from metrics.errors import InvalidPeriod
from metrics.models import DailyPurchases, processed_events
from metrics.repository import ConfigRepository, DailyPurchasesRepository
from shared.consumer import Inbound, Rejection
from shared.db import AsyncReadSession, AsyncSession
from shared.events import CloudEvent, PurchaseCompleted, PurchasesPayload
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
