from __future__ import annotations

from collections.abc import Sequence

from rules.service import rules_service
from shared.consumer import ConsumerRunner, Inbound, Rejection
from shared.db import transaction
from shared.runtime import Runtime
from shared.topics import ENGAGEMENT, PURCHASES

GROUP = "rules"


def purchases_consumer(runtime: Runtime) -> ConsumerRunner:
    group = runtime.settings.group(GROUP)

    async def on_batch(batch: Sequence[Inbound]) -> Sequence[Rejection]:
        async with transaction(runtime.sessionmaker) as session:
            return await rules_service.handle_batch(session, batch, group=group)

    return runtime.make_consumer(group=GROUP, topics=[PURCHASES, ENGAGEMENT], handler=on_batch)
