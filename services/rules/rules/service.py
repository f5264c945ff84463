from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncSession

from rules.models import CustomerState, processed_events
from rules.repository import CustomerStateRepository
from shared.consumer import Inbound, Rejection
from shared.events import PurchaseCompleted
from shared.tracking import claim_new


class RulesService:
    async def handle_batch(self, session: AsyncSession, batch: Sequence[Inbound], *, group: str) -> list[Rejection]:
        fresh = await claim_new(session, processed_events, group, (m.event.id for m in batch))
        repo = CustomerStateRepository.from_session(session)
        for message in batch:
            if message.event.id not in fresh:
                continue
            fresh.discard(message.event.id)  # the same id twice in one batch counts once
            event = message.event
            if isinstance(event.data, PurchaseCompleted):
                await repo.count_purchase(event.tenantid, event.data.customer_id, event.data.ordered_at or event.time)
        return []

    async def get_state(self, session: AsyncSession, *, tenant_id: str, customer_id: str) -> CustomerState | None:
        return await CustomerStateRepository.from_session(session).get(tenant_id, customer_id)


rules_service = RulesService()
