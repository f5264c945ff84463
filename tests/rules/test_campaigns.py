"""Campaign budgets under concurrent consumers: a batch reads the spend without a lock, and another
consumer's spend that lands in between must never let the campaign pay out more than its budget."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker

from rules.models import CampaignSpend
from rules.repository import CampaignRepository, Key
from rules.service import rules_service
from shared.db import AsyncSession, transaction
from shared.events import decode_event
from tests.rules.helpers import inbound, rules_database
from tests.rules.samples import BASE, doc, line, order

pytestmark = pytest.mark.db

BUDGET = 100
DOCUMENT = doc(
    BASE,
    {"id": "promo", "kind": "bonus", "points": 40, "campaign": "promo", "priority": 200},
    campaigns={"promo": {"budget": BUDGET}},
)


@pytest.fixture
async def sessionmaker(tenant: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    async with rules_database(tenant, DOCUMENT) as maker:
        yield maker


def _spends_meanwhile(
    maker: async_sessionmaker[AsyncSession], points: int, reads: list[bool]
) -> Callable[..., Awaitable[dict[Key, int]]]:
    """A stand-in for CampaignRepository.spent (the real read, on the real database): after the batch's
    first read, another consumer's transaction adds `points` to the campaign and commits, as a consumer
    on other partitions would. `reads` records whether each read locked."""
    original = CampaignRepository.spent

    async def spent(
        repo: CampaignRepository[AsyncSession], keys: Iterable[Key], *, for_update: bool = False
    ) -> dict[Key, int]:
        wanted = list(keys)
        result = await original(repo, wanted, for_update=for_update)
        reads.append(for_update)
        if len(reads) == 1:
            async with transaction(maker) as other:
                assert await CampaignRepository.from_session(other).add(dict.fromkeys(wanted, points)) == []
        return result

    return spent


async def _run(maker: async_sessionmaker[AsyncSession], tenant: str) -> tuple[dict[str, int], int]:
    batch = [inbound(order(tenant, c, [line("A", "x", "1", "60")])) for c in ("c1", "c2")]
    async with transaction(maker) as session:
        outcome = await rules_service.process_batch(session, batch)
    assert outcome.rejections == []
    points = {}
    for row in outcome.outbox_rows:
        command = decode_event(row["value"])
        points[command.data.customer_id] = command.data.points
    async with maker() as session:
        key = (CampaignSpend.tenant_id == tenant, CampaignSpend.campaign_id == "promo")
        stmt = select(CampaignSpend.points).where(*key)
        spent = (await session.execute(stmt)).scalar_one()
    return points, int(spent)


class TestBudgetUnderConcurrency:
    async def test_spend_that_overdraws_the_batch_makes_it_evaluate_again_under_lock(
        self, sessionmaker: async_sessionmaker[AsyncSession], tenant: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        reads: list[bool] = []
        monkeypatch.setattr(CampaignRepository, "spent", _spends_meanwhile(sessionmaker, 50, reads))
        points, spent = await _run(sessionmaker, tenant)
        # Read 0, then 50 went elsewhere: 40 + 40 no longer fits. Under the lock: c1 40, c2 the last 10.
        assert reads == [False, True]
        assert points == {"c1": 60 + 40, "c2": 60 + 10}
        assert spent == BUDGET

    async def test_spend_that_leaves_room_keeps_the_first_evaluation(
        self, sessionmaker: async_sessionmaker[AsyncSession], tenant: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        reads: list[bool] = []
        monkeypatch.setattr(CampaignRepository, "spent", _spends_meanwhile(sessionmaker, 10, reads))
        points, spent = await _run(sessionmaker, tenant)
        assert reads == [False], "10 + 80 is within the budget: no second evaluation"
        assert points == {"c1": 100, "c2": 100}
        assert spent == 10 + 80

    async def test_without_concurrent_spend_the_budget_caps_across_batches(
        self, sessionmaker: async_sessionmaker[AsyncSession], tenant: str
    ) -> None:
        first, _ = await _run(sessionmaker, tenant)
        assert first == {"c1": 100, "c2": 100}
        batch = [inbound(order(tenant, "c3", [line("A", "x", "1", "60")]))]
        async with transaction(sessionmaker) as session:
            outcome = await rules_service.process_batch(session, batch)
        (row,) = outcome.outbox_rows
        assert decode_event(row["value"]).data.points == 60 + 20, "80 of 100 spent: 20 left"
