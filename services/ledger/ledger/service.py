from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncSession

from ledger.models import ReceivedCommand, processed_events
from ledger.repository import ReceivedCommandRepository
from shared.consumer import Inbound, Rejection
from shared.events import ClawbackPoints, EarnPoints
from shared.tracking import claim_new


class LedgerService:
    async def handle_commands(self, session: AsyncSession, batch: Sequence[Inbound], *, group: str) -> list[Rejection]:
        fresh = await claim_new(session, processed_events, group, (m.event.id for m in batch))
        rows = []
        for message in batch:
            event = message.event
            if event.id not in fresh:
                continue
            fresh.discard(event.id)
            data = event.data
            assert isinstance(data, EarnPoints | ClawbackPoints)
            rows.append(
                {
                    "command_id": data.command_id,
                    "tenant_id": event.tenantid,
                    "customer_id": data.customer_id,
                    "kind": event.type,
                    "points": data.points,
                    "event_id": event.id,
                }
            )
        await ReceivedCommandRepository.from_session(session).add_many(rows)
        return []

    async def get_command(self, session: AsyncSession, *, tenant_id: str, command_id: str) -> ReceivedCommand | None:
        return await ReceivedCommandRepository.from_session(session).get(tenant_id, command_id)


ledger_service = LedgerService()
