from __future__ import annotations

from collections.abc import Sequence

from metrics.service import metrics_service
from shared.consumer import ConsumerRunner, Inbound, Rejection
from shared.db import transaction
from shared.events import PurchasesPayload
from shared.runtime import Runtime
from shared.topics import PURCHASES

GROUP = "metrics"


def purchases_consumer(runtime: Runtime) -> ConsumerRunner:
    async def on_batch(batch: Sequence[Inbound[PurchasesPayload]]) -> Sequence[Rejection]:
        async with transaction(runtime.sessionmaker) as session:
            return await metrics_service.handle_batch(session, batch)

    return runtime.make_consumer(group=GROUP, topics=[PURCHASES], handler=on_batch)
