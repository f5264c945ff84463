"""The metrics use cases: fold the topics' events into the aggregates (each event once, by business time),
and answer the KPI queries from them."""

from __future__ import annotations

import base64
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar, cast

from asyncpg import Record
from sqlalchemy.ext.asyncio import async_sessionmaker

from metrics import domain, kpis, redemptions, schemas
from metrics.clv import CustomerRfm, FitError, Predictions, prediction_rows, rfm_summary
from metrics.errors import ClvNotFitted, CustomerNotFound, InvalidCursor, InvalidParameter, InvalidPeriod
from metrics.exporter import Headline
from metrics.models import LIST_SORTS, ClvFit, processed_events
from metrics.repository import (
    DAILY_COLUMNS,
    AggregatesRepository,
    ClvRepository,
    ConfigRepository,
    KpiRepository,
    OutboxRepository,
    RedemptionsRepository,
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
    CustomersPayload,
    EngagementPayload,
    EventAttended,
    LedgerEntriesPayload,
    PurchaseCompleted,
    PurchasesPayload,
    RedemptionChanged,
    ReferralConverted,
    ReviewPosted,
    RewardsPayload,
    SegmentChanged,
    SurveyAnswered,
    TierChanged,
    WalletEstimated,
    business_id,
    make_event,
    utcnow,
)
from shared.faults import is_infrastructure_error
from shared.outbox import describe_error
from shared.topics import CUSTOMERS
from shared.tracking import Admission, claim_batch, release

log = logging.getLogger(__name__)

# The tracking name (shared.tracking): the service's, not the consumer group's.
TRACKING_NAME = "metrics"
DEFAULT_WINDOW = schemas.TenantConfigUpdate.model_fields["activity_window_days"].default
# Bounds of a query: periods of one /v1/kpis answer (three years of days), cohorts of one matrix.
MAX_PERIODS = 1100
MAX_COHORTS = 240
_COLUMN = {name: i for i, name in enumerate(DAILY_COLUMNS)}


def _purchase_business_id(event: CloudEvent[PurchasesPayload]) -> tuple[str, str] | None:
    # An order counts once per tenant, whatever event ids it arrives under (as in the rules service).
    if isinstance(event.data, PurchaseCompleted):
        return ("order_id", event.data.order_id)
    return business_id(event)


# The events that change a customer's segment (purchases, engagement).
Segmenting = TypeVar("Segmenting", bound=PurchasesPayload | EngagementPayload)


@dataclass(frozen=True)
class Money:
    """A tenant's activity window and currencies, as the aggregation needs them."""

    window: int
    reporting: str
    factors: dict[str, str]

    def convert(self, amount: Decimal, currency: str) -> Decimal:
        return domain.convert(amount, currency, self.reporting, self.factors)


@dataclass
class Changes:
    """What one batch adds to the aggregates, summed in memory first (one write per row and table)."""

    daily: dict[tuple[str, date], list[Any]] = field(default_factory=dict)
    cells: dict[tuple[str, str, date, date], int] = field(default_factory=lambda: defaultdict(int))
    active: dict[tuple[str, str, date], int] = field(default_factory=lambda: defaultdict(int))

    def add(self, tenant: str, day: date, column: str, value: Any) -> None:
        row = self.daily.get((tenant, day))
        if row is None:
            row = self.daily[(tenant, day)] = [0] * len(DAILY_COLUMNS)
        row[_COLUMN[column]] += value

    def add_footprint(self, tenant: str, diff: dict[domain.Key, int]) -> None:
        for key, value in diff.items():
            if len(key) == 4:
                self.cells[(tenant, key[1], key[2], key[3])] += value
            elif len(key) == 3:
                self.active[(tenant, key[1], key[2])] += value
            else:
                self.add(tenant, key[1], _FOOTPRINT_COLUMN[key[0]], value)

    async def save(self, repo: AggregatesRepository[AsyncSession]) -> None:
        await repo.add_daily(self.daily)
        await repo.add_cells(self.cells)
        await repo.add_period_counts("period_active", self.active)


_FOOTPRINT_COLUMN = {"active": "active_delta", "new": "new_customers", "buyers": "buyers"}


@dataclass
class CustomerTotals:
    first: datetime | None = None
    last: datetime | None = None
    orders: int = 0
    net: Decimal = Decimal(0)
    discount_sum: Decimal = Decimal(0)
    discount_orders: int = 0
    days: dict[date, list[Any]] = field(default_factory=dict)  # day -> [orders, net]

    def day(self, day: date) -> list[Any]:
        return self.days.setdefault(day, [0, Decimal(0)])


class MetricsService:
    # --- ingestion ----------------------------------------------------------------------------------

    async def _money(self, session: AsyncSession, first: dict[str, str]) -> dict[str, Money]:
        """Each tenant's window and currencies; a tenant without a reporting currency adopts `first[tenant]`."""
        repo = ConfigRepository.from_session(session)
        known = await repo.currencies(list(first))
        unset = {t: c for t, c in first.items() if t not in known or known[t][1] is None}
        adopted = await repo.adopt_currencies(unset) if unset else {}
        out: dict[str, Money] = {}
        for tenant in first:
            window, reporting, factors = known.get(tenant, (DEFAULT_WINDOW, None, {}))
            out[tenant] = Money(window, reporting or adopted[tenant], factors)
        return out

    async def _finish(
        self, session: AsyncSession, admission: Admission[Any], refused: list[Rejection]
    ) -> list[Rejection]:
        # A refused event changed nothing: its claims go, so a replay from the DLQ is processed.
        await release(session, processed_events, admission.release_keys(refused))
        return [*admission.rejections, *refused]

    async def handle_purchases(
        self, session: AsyncSession, batch: Sequence[Inbound[PurchasesPayload]]
    ) -> list[Rejection]:
        admission = await claim_batch(
            session, processed_events, TRACKING_NAME, batch, business_id=_purchase_business_id
        )
        first: dict[str, str] = {}
        for m in admission.messages:
            first.setdefault(m.event.tenantid, m.event.data.currency)
        money = await self._money(session, first) if first else {}
        refused: list[Rejection] = []
        orders: list[tuple[Any, ...]] = []
        refunds: list[tuple[Any, ...]] = []
        for m in admission.messages:
            event, data = m.event, m.event.data
            tenant = money[event.tenantid]
            try:
                if isinstance(data, PurchaseCompleted):
                    at = data.ordered_at or event.time
                    amount = tenant.convert(data.net_amount, data.currency)
                    orders.append(
                        (
                            event.tenantid,
                            data.order_id,
                            data.customer_id,
                            at,
                            at.date(),
                            data.currency,
                            data.net_amount,
                            amount,
                            domain.discount_share(data),
                            data.channel,
                        )
                    )
                else:
                    original = domain.refund_amount(data)
                    amount = tenant.convert(original, data.currency)
                    refunds.append(
                        (
                            event.tenantid,
                            data.refund_id,
                            data.original_order_id,
                            data.customer_id,
                            event.time,
                            data.currency,
                            original,
                            amount,
                        )
                    )
            except domain.UnknownCurrency as exc:
                refused.append(Rejection(m, str(exc)))
        repo = AggregatesRepository.from_session(session)
        inserted = await repo.insert_orders(orders)
        new_orders = [o for o in orders if (o[0], o[1]) in inserted]
        await repo.insert_refunds(refunds)
        pending = await repo.refunds_to_apply([(o[0], o[1]) for o in new_orders] + [(r[0], r[2]) for r in refunds])

        changes = Changes()
        customers: dict[tuple[str, str], CustomerTotals] = defaultdict(CustomerTotals)
        for tenant_id, _order, customer, at, day, _currency, _original, amount, share, _channel in new_orders:
            totals = customers[(tenant_id, customer)]
            totals.first = at if totals.first is None else min(totals.first, at)
            totals.last = at if totals.last is None else max(totals.last, at)
            totals.orders += 1
            totals.net += amount
            if share is not None:
                totals.discount_sum += share
                totals.discount_orders += 1
            cell = totals.day(day)
            cell[0] += 1
            cell[1] += amount
            changes.add(tenant_id, day, "orders", 1)
            changes.add(tenant_id, day, "amount", amount)
        await self._apply_refunds(repo, pending, changes, customers)

        keys = sorted(customers)
        await repo.add_purchases_to_customers(
            [
                (t, c, v.first, v.last, v.orders, v.net, v.discount_sum, v.discount_orders)
                for (t, c), v in ((k, customers[k]) for k in keys)
            ]
        )
        buying = [k for k in keys if customers[k].orders]
        known_days = await repo.purchase_days(buying)
        for key in buying:
            before = known_days[key]
            after = domain.merge_days(before, customers[key].days)
            if len(after) != len(before):
                window = money[key[0]].window
                changes.add_footprint(
                    key[0], domain.difference(domain.footprint(after, window), domain.footprint(before, window))
                )
        await repo.add_customer_days(
            [(t, c, d, v[0], v[1]) for (t, c) in keys for d, v in sorted(customers[(t, c)].days.items())]
        )
        await changes.save(repo)
        await segment_service.mark_batch(session, admission.messages)
        return await self._finish(session, admission, refused)

    async def _apply_refunds(
        self,
        repo: AggregatesRepository[AsyncSession],
        pending: Sequence[Any],
        changes: Changes,
        customers: dict[tuple[str, str], CustomerTotals],
    ) -> None:
        """Applies refunds whose order is known: the order's net revenue, its day and its customer drop by
        what the refunds take off (never more than the order's amount)."""
        by_order: dict[tuple[str, str], list[Any]] = {}
        for tenant_id, _refund_id, amount, order_id, customer, day, order_amount, refunded in pending:
            entry = by_order.setdefault((tenant_id, order_id), [customer, day, order_amount, refunded, Decimal(0)])
            entry[4] += amount
        for (tenant_id, _), (customer, day, order_amount, refunded, added) in by_order.items():
            taken = domain.applied(order_amount, refunded + added) - domain.applied(order_amount, refunded)
            if taken:
                changes.add(tenant_id, day, "refunded", taken)
                totals = customers[(tenant_id, customer)]
                totals.net -= taken
                totals.day(day)[1] -= taken
        await repo.apply_refunds(
            [(t, o, v[4]) for (t, o), v in sorted(by_order.items())], sorted({(r[0], r[1]) for r in pending})
        )

    async def handle_ledger_entries(
        self, session: AsyncSession, batch: Sequence[Inbound[LedgerEntriesPayload]]
    ) -> list[Rejection]:
        admission = await claim_batch(session, processed_events, TRACKING_NAME, batch)
        changes = Changes()
        balances: dict[tuple[str, str], list[int]] = {}
        members: list[tuple[str, date, str]] = []
        for m in admission.messages:
            fact = domain.points_fact(m.event.data)
            if fact is None:
                continue
            tenant = m.event.tenantid
            for column, value in (
                ("points_issued", fact.issued),
                ("points_redeemed", fact.redeemed),
                ("points_expired", fact.expired),
                ("points_clawed_back", fact.clawed_back),
                ("available_delta", fact.available),
                ("pending_delta", fact.pending),
                ("held_delta", fact.held),
            ):
                if value:
                    changes.add(tenant, fact.day, column, value)
            if fact.customer_id is not None and (fact.available or fact.pending):
                balance = balances.setdefault((tenant, fact.customer_id), [0, 0])
                balance[0] += fact.available
                balance[1] += fact.pending
            if fact.member and fact.customer_id is not None:
                members.append((tenant, fact.day, fact.customer_id))
        repo = AggregatesRepository.from_session(session)
        await repo.add_points_to_customers([(t, c, v[0], v[1]) for (t, c), v in sorted(balances.items())])
        await changes.save(repo)
        new = await repo.add_member_days(members)
        if new:
            # A customer counts once per period: the periods their days cover, after minus before.
            counts: dict[tuple[str, str, date], int] = defaultdict(int)
            known = await repo.member_days(sorted({(t, c) for t, _, c in new}))
            for (tenant, customer), days in known.items():
                before = [d for d in days if (tenant, d, customer) not in new]
                diff = domain.difference(domain.periods_of(days), domain.periods_of(before))
                for (kind, start), value in diff.items():
                    counts[(tenant, kind, start)] += value
            await repo.add_period_counts("period_members", counts)
        return await self._finish(session, admission, [])

    async def handle_engagement(
        self, session: AsyncSession, batch: Sequence[Inbound[EngagementPayload]]
    ) -> list[Rejection]:
        admission = await claim_batch(session, processed_events, TRACKING_NAME, batch, business_id=business_id)
        first = {
            m.event.tenantid: m.event.data.currency
            for m in admission.messages
            if isinstance(m.event.data, WalletEstimated)
        }
        money = await self._money(session, first) if first else {}
        refused: list[Rejection] = []
        rows: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        answers: list[tuple[str, str, datetime, str, int | None, int | None]] = []
        latest: dict[tuple[str, str], list[Any]] = {}
        for m in admission.messages:
            event, data = m.event, m.event.data
            at = event.time
            nps = effort = rating = start = end = currency = original = amount = None
            if isinstance(data, WalletEstimated):
                try:
                    amount = money[event.tenantid].convert(data.estimated_spend, data.currency)
                except domain.UnknownCurrency as exc:
                    refused.append(Rejection(m, str(exc)))
                    continue
                kind, start, end = "wallet", data.period_start, data.period_end
                currency, original = data.currency, data.estimated_spend
                key = json.dumps([data.customer_id, str(start), str(end)], separators=(",", ":"))
            else:
                found = business_id(event)
                kind = _ENGAGEMENT_KIND.get(type(data), "custom")
                key = found[1] if found else json.dumps([event.source, event.id], separators=(",", ":"))
            facts = latest.setdefault((event.tenantid, data.customer_id), [None] * 7)
            if isinstance(data, SurveyAnswered):
                nps, effort = data.nps, data.effort_score
                answers.append((event.tenantid, data.customer_id, at, event.id, nps, effort))
                if nps is not None and (facts[1] is None or at > facts[1]):
                    facts[0], facts[1] = nps, at
                if effort is not None and (facts[3] is None or at > facts[3]):
                    facts[2], facts[3] = effort, at
            elif isinstance(data, ReviewPosted):
                rating = data.rating
            slot = _LAST_SLOT.get(kind)
            if slot is not None and (facts[slot] is None or at > facts[slot]):
                facts[slot] = at
            row = (event.tenantid, kind, key, data.customer_id, at, event.type, event.id, nps, effort, rating,
                   start, end, currency, original, amount)  # fmt: skip
            earlier = rows.get(row[:3])
            # Two estimates of one period in a batch: the later stays (as add_engagements keeps across batches).
            if earlier is None or (at, event.id) > (earlier[4], earlier[6]):
                rows[row[:3]] = row
        repo = AggregatesRepository.from_session(session)
        advocacy = [(t, c, *v) for (t, c), v in sorted(latest.items()) if any(x is not None for x in v)]
        await repo.note_engagement(advocacy)
        await repo.add_engagements(list(rows.values()))
        await self._count_answers(repo, answers)
        await segment_service.mark_batch(session, admission.messages)
        return await self._finish(session, admission, refused)

    async def _count_answers(
        self,
        repo: AggregatesRepository[AsyncSession],
        answers: Sequence[tuple[str, str, datetime, str, int | None, int | None]],
    ) -> None:
        """NPS and effort per period of every kind: each customer's latest NPS answer counts, every effort."""
        counts: dict[tuple[str, str, date], list[int]] = defaultdict(lambda: [0] * domain.SURVEY_COUNTS)
        with_nps: list[tuple[tuple[str, str, date, str], domain.Answer]] = []
        for tenant, customer, at, event_id, nps, effort in answers:
            for kind in domain.PERIODS:
                start = domain.period_start(kind, at.date())
                if effort is not None:
                    counts[(tenant, kind, start)][3] += effort
                    counts[(tenant, kind, start)][4] += 1
                if nps is not None:
                    with_nps.append(((tenant, kind, start, customer), (at, event_id, nps)))
        stored = await repo.stored_answers([k for k, _ in with_nps])
        latest, changes = domain.latest_answers(stored, with_nps)
        for (tenant, period, day, _), delta in changes.items():
            row = counts[(tenant, period, day)]
            for i, value in enumerate(delta):
                row[i] += value
        await repo.keep_answers(latest, counts)

    async def handle_customers(
        self, session: AsyncSession, batch: Sequence[Inbound[CustomersPayload]]
    ) -> list[Rejection]:
        admission = await claim_batch(session, processed_events, TRACKING_NAME, batch)
        tiers: dict[tuple[str, str], tuple[str, datetime]] = {}
        for m in admission.messages:
            data = m.event.data
            # segment.changed is this service's own output; only tiers are news here.
            if isinstance(data, TierChanged):
                key = (m.event.tenantid, data.customer_id)
                if key not in tiers or m.event.time > tiers[key][1]:
                    tiers[key] = (data.tier, m.event.time)
        await AggregatesRepository.from_session(session).note_tiers([(t, c, *v) for (t, c), v in sorted(tiers.items())])
        return await self._finish(session, admission, [])

    async def handle_rewards(self, session: AsyncSession, batch: Sequence[Inbound[RewardsPayload]]) -> list[Rejection]:
        """Folds redemption order changes into the sums per day, reward and kind: each order's footprint after
        minus before (metrics/redemptions.py), so the order the changes arrive in does not matter."""
        admission = await claim_batch(session, processed_events, TRACKING_NAME, batch, business_id=business_id)
        first: dict[tuple[str, str], tuple[str, str, str, redemptions.OrderFacts]] = {}
        for m in admission.messages:
            data = m.event.data
            first.setdefault(
                (m.event.tenantid, data.order_id), (m.event.tenantid, data.order_id, data.customer_id, _order(data))
            )
        repo = RedemptionsRepository.from_session(session)
        orders = await repo.lock_orders(list(first.values()))
        refused: list[Rejection] = []
        rows: list[tuple[Any, ...]] = []
        for m in admission.messages:
            event, data = m.event, m.event.data
            reason = redemptions.conflict(data.order_id, orders[(event.tenantid, data.order_id)], _order(data))
            if reason is not None:
                refused.append(Rejection(m, reason))
                continue
            rows.append((event.tenantid, data.order_id, event.source, event.id, data.change, data.state,
                         data.points_returned, data.occurred_at))  # fmt: skip
        stored = await repo.changes(sorted({(r[0], r[1]) for r in rows}))
        inserted = await repo.add_changes(rows)
        new: dict[tuple[str, str], list[redemptions.Change]] = defaultdict(list)
        for r in rows:
            if r[:4] in inserted:
                new[(r[0], r[1])].append(redemptions.Change(r[7], r[3], r[4], r[5], r[6]))
        sums = redemptions.Sums()
        for (tenant, order_id), changes in sorted(new.items()):
            sums.add_order(tenant, orders[(tenant, order_id)], stored[(tenant, order_id)], changes)
        await repo.add_sums(sums.counts, sums.values)
        return await self._finish(session, admission, refused)

    # --- KPIs ----------------------------------------------------------------------------------------

    async def kpis(
        self, session: AsyncReadSession, tenant_id: str, *, start: date, end: date, kind: domain.Period
    ) -> schemas.KpiList:
        if start >= end:
            raise InvalidPeriod(start, end)
        periods = kpis.period_list(kind, start, end)
        if len(periods) > MAX_PERIODS:
            raise InvalidParameter(
                f"{len(periods)} periods of a {kind} asked for; at most {MAX_PERIODS}: choose a longer period "
                "or a shorter range",
                periods=len(periods),
            )
        config = await self.config(session, tenant_id)
        repo = KpiRepository.from_session(session)
        first_day = periods[0][0] - timedelta(days=1)
        range_end = periods[-1][1]
        days = {r[0]: kpis.Day(*r[1:]) for r in await repo.days(tenant_id, first_day, range_end)}
        before = await repo.sums_before(tenant_id, first_day)
        surveys = {r[0]: kpis.Survey(*r[1:]) for r in await repo.surveys(tenant_id, kind, periods[0][0], range_end)}
        wallets: dict[date, kpis.Wallet] = defaultdict(kpis.Wallet)
        for period_end, estimate, ours in await repo.wallets(tenant_id, periods[0][0], range_end):
            wallet = wallets[domain.period_start(kind, period_end - timedelta(days=1))]
            wallet.ours += ours
            wallet.estimated += estimate
            wallet.estimates += 1
        data = kpis.PeriodInput(
            kind=kind,
            periods=periods,
            days=days,
            active_before=before["active"],
            first_day=first_day,
            buyers={} if kind == "day" else await repo.buyers(tenant_id, kind, periods[0][0], range_end),
            members=await repo.period_counts("period_members", tenant_id, kind, periods[0][0], range_end),
            active={} if kind == "day" else await self._active_periods(repo, tenant_id, kind, periods),
            surveys=surveys,
            wallets=wallets,
        )
        items = [schemas.PeriodKpis.model_validate(k) for k in kpis.period_kpis(data)]
        return schemas.KpiList(
            period=kind,
            currency=config.reporting_currency,
            activity_window_days=config.activity_window_days,
            items=items,
        )

    async def _active_periods(
        self,
        repo: KpiRepository[AsyncReadSession],
        tenant_id: str,
        kind: domain.Period,
        periods: list[tuple[date, date]],
    ) -> dict[date, int]:
        """Customers active in each period: period_active keeps the changes from one period to the next."""
        running = await repo.active_before(tenant_id, kind, periods[0][0])
        changes = await repo.period_counts("period_active", tenant_id, kind, periods[0][0], periods[-1][1])
        out: dict[date, int] = {}
        for start, _ in periods:
            running += changes.get(start, 0)
            out[start] = running
        return out

    async def lifetime(self, session: AsyncReadSession, tenant_id: str, as_of: date | None) -> schemas.Lifetime:
        today = utcnow().date()
        current = as_of is None or as_of >= today
        day = today if as_of is None else as_of
        config = await self.config(session, tenant_id)
        repo = KpiRepository.from_session(session)
        customers = await repo.customers(tenant_id, None if current else day)
        following = day + timedelta(days=1)
        balances = await repo.sums_before(tenant_id, following)
        programme = await repo.programme(tenant_id, _year_before(following), following)
        value = config.point_value
        issued = programme["issued"]
        return schemas.Lifetime.model_validate(
            {
                "as_of": day,
                "currency": config.reporting_currency,
                **kpis.lifetime(customers),
                "liability": {
                    "available_points": balances["available"],
                    "pending_points": balances["pending"],
                    "held_points": balances["held"],
                    "point_value": value,
                    "available_value": balances["available"] * value,
                    "pending_value": balances["pending"] * value,
                },
                "points_issued_12m": issued,
                "points_redeemed_12m": programme["redeemed"],
                "points_expired_12m": programme["expired"],
                "redemption_rate": kpis.percent(programme["redeemed"], issued),
                "breakage_rate": kpis.percent(programme["expired"], issued),
            }
        )

    async def cohorts(
        self, session: AsyncReadSession, tenant_id: str, *, kind: domain.Period, start: date | None, end: date | None
    ) -> schemas.Cohorts:
        if kind not in domain.CELL_PERIODS:
            raise InvalidParameter(f"cohorts are kept by {', '.join(domain.CELL_PERIODS)}, not by {kind}")
        low = domain.period_start(kind, start) if start is not None else EARLIEST.date()
        high = end if end is not None else LATEST.date()
        if low >= high:
            raise InvalidPeriod(low, high)
        cells = await KpiRepository.from_session(session).cells(tenant_id, kind, low, high)
        # A cohort is its customers: one whose customers all moved to an earlier first purchase (an order that
        # arrived late) keeps zero cells, which are not a cohort (a rebuild has none).
        cohorts = sorted({c for (c, start), n in cells.items() if c == start and n > 0})
        if len(cohorts) > MAX_COHORTS:
            raise InvalidParameter(
                f"{len(cohorts)} cohorts in the range; at most {MAX_COHORTS}: narrow it with from and to",
                cohorts=len(cohorts),
            )
        matrix = kpis.cohort_matrix(kind, cohorts, cells, utcnow().date())
        return schemas.Cohorts(period=kind, items=[schemas.Cohort.model_validate(c) for c in matrix])

    async def redemption_summary(
        self, session: AsyncReadSession, tenant_id: str, *, start: date, end: date
    ) -> schemas.RedemptionSummary:
        if start >= end:
            raise InvalidPeriod(start, end)
        days = (end - start).days
        if days > MAX_PERIODS:
            raise InvalidParameter(f"{days} days asked for; at most {MAX_PERIODS}: ask for a shorter range", days=days)
        counts, values = await RedemptionsRepository.from_session(session).window(tenant_id, start, end)
        rewards, kinds = redemptions.summarize(counts, values)
        return schemas.RedemptionSummary(
            start=start,
            end=end,
            items=[
                schemas.RewardRedemptions(reward_id=reward, reward_kind=kind, **_figures(f))
                for (reward, kind), f in rewards.items()
            ],
            totals=[schemas.KindRedemptions(reward_kind=kind, **_figures(f)) for kind, f in kinds.items()],
        )

    # --- configuration ------------------------------------------------------------------------------

    async def headline(self, session: AsyncReadSession, tenant_id: str, *, today: date) -> Headline:
        """The KPI gauges' figures of a tenant: the month of `today`, lifetime as of `today`, segments now."""
        month = domain.period_start("month", today)
        period = await self.kpis(session, tenant_id, start=month, end=today + timedelta(days=1), kind="month")
        lifetime = await self.lifetime(session, tenant_id, today)
        overview = await segment_service.overview(session, tenant_id)
        return Headline(period=period.items[0], lifetime=lifetime, segments=overview.counts)

    async def config(self, session: AsyncReadSession, tenant_id: str) -> schemas.TenantConfig:
        row = await ConfigRepository.from_session(session).get(tenant_id)
        return schemas.TenantConfig() if row is None else schemas.TenantConfig.model_validate(row)

    async def put_config(
        self, session: AsyncSession, tenant_id: str, update: schemas.TenantConfigUpdate
    ) -> schemas.TenantConfig:
        values = update.model_dump(mode="json")
        configs = ConfigRepository.from_session(session)
        before = await configs.get(tenant_id)
        # Read before the put refreshes the same object.
        window = before.activity_window_days if before is not None else DEFAULT_WINDOW
        row = await configs.put(tenant_id, values)
        if update.activity_window_days != window:
            await self._recompute_activity(session, tenant_id, update.activity_window_days)
        return schemas.TenantConfig.model_validate(row)

    async def _recompute_activity(self, session: AsyncSession, tenant_id: str, window: int) -> None:
        """Sums what depends on the window again from every customer's days (active per day and period)."""
        repo = AggregatesRepository.from_session(session)
        changes = Changes()
        for days in (await repo.tenant_days(tenant_id)).values():
            activity = {k: v for k, v in domain.footprint(days, window).items() if k[0] in ("active", "period")}
            changes.add_footprint(tenant_id, activity)
        await repo.reset_activity(tenant_id)
        await changes.save(repo)


def _order(data: RedemptionChanged) -> redemptions.OrderFacts:
    return redemptions.OrderFacts(data.reward_id, data.reward_kind, data.points, data.value, data.currency)


def _figures(figures: redemptions.Figures) -> dict[str, Any]:
    values = [schemas.RedemptionValue(currency=c, value=v) for c, v in sorted(figures.values.items())]
    return {**dict(zip(redemptions.COUNTERS, figures.counts, strict=True)), "values": values}


def _year_before(day: date) -> date:
    """The same date a year earlier (28 February for 29 February)."""
    try:
        return day.replace(year=day.year - 1)
    except ValueError:
        return day.replace(year=day.year - 1, day=28)


_ENGAGEMENT_KIND: dict[type[Any], str] = {
    SurveyAnswered: "survey",
    ReviewPosted: "review",
    ReferralConverted: "referral",
    EventAttended: "attendance",
}
# Where in a customer's advocacy facts (nps, nps at, effort, effort at, review, referral, attendance) the
# time of the latest engagement of a kind goes.
_LAST_SLOT = {"review": 4, "referral": 5, "attendance": 6}

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
        self,
        session: AsyncSession,
        tenant_id: str,
        customer_ids: Sequence[str],
        *,
        namespace: str,
        now: datetime | None = None,
    ) -> int:
        """Classifies these customers of the tenant as of `now` (those with a purchase), stores their segments
        with the list's sort keys and writes a segment.changed to the outbox for each change. Returns the
        number of changes. Without `now`, the time once their segments are locked: the events' times then
        follow the order in which writers of one customer commit (the rules keep the latest by time)."""
        if not customer_ids:
            return 0
        config = await self.tenant_config(session, tenant_id)
        repo = SegmentRepository.from_session(session)
        current = await repo.lock_current(tenant_id, sorted(set(customer_ids)))
        now = now or utcnow()
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
                    record["clv"],
                    facts.p_alive,
                )
            )
        await repo.save(rows)
        await OutboxRepository.from_session(session).add(outbox)
        return len(outbox)

    async def mark_batch(self, session: AsyncSession, batch: Sequence[Inbound[Segmenting]]) -> None:
        """In an ingested batch's transaction, with the events it admitted: their customers are to be classified
        again (by the pending loop, `reclassify_pending`, so ingestion does not wait for it). A customer whose
        event was refused is marked all the same (unchanged facts change nothing); a duplicate the tracking
        skipped marks no one, so a replay changes nothing, not even a customer's `classified_at`."""
        keys = [(m.event.tenantid, m.event.data.customer_id) for m in batch]
        await SegmentRepository.from_session(session).mark_pending(keys)

    async def reclassify_pending(
        self, sessionmaker: async_sessionmaker[AsyncSession], *, namespace: str, limit: int
    ) -> tuple[int, list[str]]:
        """One round of the pending loop: up to `limit` marked customers classified again in one transaction,
        tenant by tenant in order, each tenant in a savepoint of its own. A tenant that fails (a stored threshold
        no PUT would accept) loses its marks (the scheduled run classifies it again) and holds back no other.
        Returns (customers taken, tenants that failed)."""
        failed: list[str] = []
        async with transaction(sessionmaker) as session:
            pending = await SegmentRepository.from_session(session).claim_pending(limit)
            by_tenant: dict[str, list[str]] = defaultdict(list)
            for tenant_id, customer_id in pending:
                by_tenant[tenant_id].append(customer_id)
            for tenant_id, customer_ids in by_tenant.items():
                try:
                    async with session.begin_nested():
                        await self.reclassify(session, tenant_id, customer_ids, namespace=namespace)
                except Exception as exc:
                    if is_infrastructure_error(exc):
                        raise
                    failed.append(tenant_id)
                    log.error(
                        "segments of a tenant failed", extra={"tenant_id": tenant_id, "error": describe_error(exc)}
                    )
        return len(pending), failed

    async def reclassify_tenant(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        tenant_id: str,
        *,
        namespace: str,
        page: int = 1000,
        now: datetime | None = None,
    ) -> tuple[int, int]:
        """The scheduled run for one tenant: every customer with a purchase, a page per transaction (so the
        locks and the work of one transaction stay bounded), each page as of its own time unless `now` is
        given. Returns (classified, changed)."""
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


@dataclass(frozen=True, slots=True)
class ClvInputs:
    summary: list[CustomerRfm]
    currency: str
    discount_rate: Decimal
    horizon_months: int


class ClvService:
    """Predictive CLV: the fit job (`metrics.tasks.fit_clv`) loads the inputs, fits in its own process and
    saves; the service only reads the latest fit."""

    async def inputs(self, session: AsyncReadSession, tenant_id: str, *, as_of: date) -> ClvInputs:
        config = await metrics_service.config(session, tenant_id)
        if config.reporting_currency is None:
            raise FitError(f"tenant {tenant_id!r} has no reporting currency yet (no purchase processed)")
        rows = await ClvRepository.from_session(session).daily_net(tenant_id, as_of)
        return ClvInputs(
            summary=rfm_summary(rows, as_of=as_of),
            currency=config.reporting_currency,
            discount_rate=config.clv_discount_rate,
            horizon_months=config.clv_horizon_months,
        )

    async def save(
        self,
        session: AsyncSession,
        tenant_id: str,
        *,
        as_of: date,
        inputs: ClvInputs,
        parameters: dict[str, dict[str, float]],
        predictions: Predictions,
        started: float,
    ) -> schemas.ClvFit:
        fitted_at = utcnow()
        repo = ClvRepository.from_session(session)
        rows = prediction_rows(
            tenant_id, fitted_at=fitted_at, currency=inputs.currency, summary=inputs.summary, predictions=predictions
        )
        await repo.replace_predictions(tenant_id, rows)
        fit = ClvFit(
            tenant_id=tenant_id,
            fitted_at=fitted_at,
            as_of=as_of,
            method="map",
            parameters=parameters,
            customers=len(inputs.summary),
            repeat_customers=sum(1 for c in inputs.summary if c.frequency > 0),
            duration_seconds=Decimal(f"{time.perf_counter() - started:.3f}"),
            currency=inputs.currency,
            discount_rate=inputs.discount_rate,
            horizon_months=inputs.horizon_months,
        )
        await repo.add_fit(fit)
        return schemas.ClvFit.model_validate(fit)

    async def latest(self, session: AsyncReadSession, tenant_id: str) -> schemas.ClvFit:
        fit = await ClvRepository.from_session(session).latest_fit(tenant_id)
        if fit is None:
            raise ClvNotFitted(tenant_id)
        return schemas.ClvFit.model_validate(fit)

    async def tenants_due(self, session: AsyncReadSession, *, fitted_before: datetime) -> Sequence[str]:
        return await ClvRepository.from_session(session).tenants_due(fitted_before)


clv_service = ClvService()
