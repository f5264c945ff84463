from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

from metrics import schemas
from metrics.clv import CustomerRfm, FitError, Predictions, prediction_rows, rfm_summary
from metrics.errors import ClvNotFitted, InvalidPeriod
from metrics.models import ClvFit, DailyPurchases, processed_events
from metrics.repository import ClvRepository, ConfigRepository, DailyPurchasesRepository
from shared.consumer import Inbound, Rejection
from shared.db import AsyncReadSession, AsyncSession
from shared.events import CloudEvent, PurchaseCompleted, PurchasesPayload, utcnow
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
