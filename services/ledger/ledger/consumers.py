from __future__ import annotations

from collections.abc import Sequence

from ledger.service import ledger_service
from shared.consumer import ConsumerRunner, Inbound, Rejection
from shared.db import transaction
from shared.events import PointsCommand
from shared.runtime import Runtime
from shared.topics import POINTS_COMMANDS

GROUP = "ledger"


def commands_consumer(runtime: Runtime) -> ConsumerRunner:
    async def on_batch(batch: Sequence[Inbound[PointsCommand]]) -> Sequence[Rejection]:
        # The whole batch is one database transaction: the command claims, the entries, the balances
        # and the outbox rows commit together, and only then does the runner commit the offsets.
        async with transaction(runtime.sessionmaker) as session:
            return await ledger_service.handle_commands(session, batch)

    return runtime.make_consumer(group=GROUP, topics=[POINTS_COMMANDS], handler=on_batch)
