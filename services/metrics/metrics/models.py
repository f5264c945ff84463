"""The metrics service's tables (schema `metrics`). Amounts are in the tenant's reporting currency unless a
column says `original_` (redemption values stay in their own currency, a column of the key); days are UTC dates
of the business time (a purchase's `ordered_at`, a redemption change's `occurred_at`, else the event's `time`).
Everything but `orders`, `refunds`, `engagements`, `customer_days`, `member_days`, `redemption_orders` and
`redemption_changes` is an aggregate that `loyalty metrics rebuild` recomputes from the topics."""

from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Double,
    Index,
    Integer,
    LargeBinary,
    Numeric,
    SmallInteger,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shared.auth import api_keys_table
from shared.db import make_metadata
from shared.outbox import outbox_quarantine_table
from shared.tracking import processed_events_table


class Base(DeclarativeBase):
    metadata = make_metadata("metrics")


api_keys = api_keys_table(Base.metadata)
processed_events = processed_events_table(Base.metadata)
outbox_quarantine = outbox_quarantine_table(Base.metadata)

TENANT = 63
ID = 200
ZERO = text("0")


class TenantConfig(Base):
    """A tenant's settings (PUT /v1/config); a tenant without a row has the defaults of `schemas.TenantConfig`."""

    __tablename__ = "tenant_config"

    tenant_id: Mapped[str] = mapped_column(String(TENANT), primary_key=True)
    activity_window_days: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("365"))
    # None until set, or until the tenant's first purchase sets it to that purchase's currency.
    reporting_currency: Mapped[str | None] = mapped_column(String(3))
    # {"USD": "0.92"}: one unit of the key currency is worth that many units of the reporting currency.
    conversion_factors: Mapped[dict[str, str]] = mapped_column(JSONB, nullable=False, server_default=text("'{}'"))
    point_value: Mapped[Decimal] = mapped_column(Numeric, nullable=False, server_default=text("0.01"))
    clv_discount_rate: Mapped[Decimal] = mapped_column(Numeric, nullable=False, server_default=text("0.10"))
    clv_horizon_months: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("12"))
    # Owned by the segments logic; stored as given.
    segment_thresholds: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default=text("'{}'"))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class Order(Base):
    """One row per order (its first event; another event naming it is dead-lettered)."""

    __tablename__ = "orders"

    tenant_id: Mapped[str] = mapped_column(String(TENANT), primary_key=True)
    order_id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(ID), nullable=False)
    ordered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    day: Mapped[date] = mapped_column(Date, nullable=False)
    currency: Mapped[str] = mapped_column(String(3), nullable=False)
    original_amount: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
    amount: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
    # All refunds applied to the order; its net revenue is amount - least(refunded, amount).
    refunded: Mapped[Decimal] = mapped_column(Numeric, nullable=False, server_default=ZERO)
    # Discounted value / gross line value (0..1); None without lines.
    discount_share: Mapped[Decimal | None] = mapped_column(Numeric)
    channel: Mapped[str] = mapped_column(String(20), nullable=False)

    __table_args__ = (Index("ix_metrics_orders_customer", "tenant_id", "customer_id", "day"),)


class Refund(Base):
    """Every refund once (by refund_id); `applied` once its order is known (a refund may come first)."""

    __tablename__ = "refunds"

    tenant_id: Mapped[str] = mapped_column(String(TENANT), primary_key=True)
    refund_id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    order_id: Mapped[str] = mapped_column(String(ID), nullable=False)
    customer_id: Mapped[str] = mapped_column(String(ID), nullable=False)
    refunded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    currency: Mapped[str] = mapped_column(String(3), nullable=False)
    original_amount: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
    amount: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
    applied: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))

    __table_args__ = (Index("ix_metrics_refunds_order", "tenant_id", "order_id"),)


class Customer(Base):
    """A per-customer summary, maintained incrementally (times are business times)."""

    __tablename__ = "customers"

    tenant_id: Mapped[str] = mapped_column(String(TENANT), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    first_purchase_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_purchase_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    orders: Mapped[int] = mapped_column(Integer, nullable=False, server_default=ZERO)
    net_revenue: Mapped[Decimal] = mapped_column(Numeric, nullable=False, server_default=ZERO)
    # Mean discount share over the orders that have lines (sum and count kept to average incrementally).
    discount_share_sum: Mapped[Decimal] = mapped_column(Numeric, nullable=False, server_default=ZERO)
    discount_orders: Mapped[int] = mapped_column(Integer, nullable=False, server_default=ZERO)
    last_nps: Mapped[int | None] = mapped_column(SmallInteger)
    last_nps_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_effort_score: Mapped[int | None] = mapped_column(SmallInteger)
    last_effort_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_review_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_referral_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_attendance_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    points_available: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=ZERO)
    points_pending: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=ZERO)
    tier: Mapped[str | None] = mapped_column(String(ID))
    tier_changed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_metrics_customers_revenue", "tenant_id", "net_revenue"),)


class CustomerDay(Base):
    """A customer's purchases on one day: the source of activity (active on day t), cohorts and as-of views."""

    __tablename__ = "customer_days"

    tenant_id: Mapped[str] = mapped_column(String(TENANT), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    orders: Mapped[int] = mapped_column(Integer, nullable=False)
    net_revenue: Mapped[Decimal] = mapped_column(Numeric, nullable=False)


class MemberDay(Base):
    """A day on which a customer earned or redeemed points (active members)."""

    __tablename__ = "member_days"

    tenant_id: Mapped[str] = mapped_column(String(TENANT), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(ID), primary_key=True)

    __table_args__ = (Index("ix_metrics_member_days_customer", "tenant_id", "customer_id", "day"),)


class PeriodActive(Base):
    """Customers active on at least one day of a period of kind `period` (week to year), as changes: the
    customers active in the period starting `start` are the sum of `customers` over the periods up to it."""

    __tablename__ = "period_active"

    tenant_id: Mapped[str] = mapped_column(String(TENANT), primary_key=True)
    period: Mapped[str] = mapped_column(String(8), primary_key=True)
    start: Mapped[date] = mapped_column(Date, primary_key=True)
    customers: Mapped[int] = mapped_column(Integer, nullable=False, server_default=ZERO)


class PeriodMembers(Base):
    """Customers that earned or redeemed points in the period of kind `period` starting `start`."""

    __tablename__ = "period_members"

    tenant_id: Mapped[str] = mapped_column(String(TENANT), primary_key=True)
    period: Mapped[str] = mapped_column(String(8), primary_key=True)
    start: Mapped[date] = mapped_column(Date, primary_key=True)
    members: Mapped[int] = mapped_column(Integer, nullable=False, server_default=ZERO)


class Daily(Base):
    """Per tenant and day: additive counters a period's KPIs sum (deltas are summed from the beginning)."""

    __tablename__ = "daily"

    tenant_id: Mapped[str] = mapped_column(String(TENANT), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    orders: Mapped[int] = mapped_column(Integer, nullable=False, server_default=ZERO)
    amount: Mapped[Decimal] = mapped_column(Numeric, nullable=False, server_default=ZERO)
    # Refunds applied to the orders of this day (capped at each order's amount).
    refunded: Mapped[Decimal] = mapped_column(Numeric, nullable=False, server_default=ZERO)
    buyers: Mapped[int] = mapped_column(Integer, nullable=False, server_default=ZERO)
    new_customers: Mapped[int] = mapped_column(Integer, nullable=False, server_default=ZERO)
    # Active customers on day t = the sum of active_delta over days <= t (activity spells start: +1, end: -1).
    active_delta: Mapped[int] = mapped_column(Integer, nullable=False, server_default=ZERO)
    points_issued: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=ZERO)
    points_redeemed: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=ZERO)
    points_expired: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=ZERO)
    points_clawed_back: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=ZERO)
    # Net change of the customers' available, pending and held points (liability = the running sum).
    available_delta: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=ZERO)
    pending_delta: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=ZERO)
    held_delta: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=ZERO)


class PeriodCell(Base):
    """Customers of the cohort starting `cohort` (first purchase in that period) who bought in the period
    starting `start`, per period kind (week, month, quarter, year): cohort matrices and buyers per period."""

    __tablename__ = "period_cells"

    tenant_id: Mapped[str] = mapped_column(String(TENANT), primary_key=True)
    period: Mapped[str] = mapped_column(String(8), primary_key=True)
    cohort: Mapped[date] = mapped_column(Date, primary_key=True)
    start: Mapped[date] = mapped_column(Date, primary_key=True)
    customers: Mapped[int] = mapped_column(Integer, nullable=False, server_default=ZERO)


class Engagement(Base):
    """Engagement facts. `kind`: survey, review, referral, attendance, custom, wallet; `business_id`: the
    review/referral/attendance id, the survey answer (survey, customer, member), the event's source and id
    (custom), customer and period (wallet: a later estimate of the same period replaces the earlier)."""

    __tablename__ = "engagements"

    tenant_id: Mapped[str] = mapped_column(String(TENANT), primary_key=True)
    kind: Mapped[str] = mapped_column(String(12), primary_key=True)
    business_id: Mapped[str] = mapped_column(String(500), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(ID), nullable=False)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    event_type: Mapped[str] = mapped_column(String(ID), nullable=False)
    event_id: Mapped[str] = mapped_column(String(ID), nullable=False)
    nps: Mapped[int | None] = mapped_column(SmallInteger)
    effort_score: Mapped[int | None] = mapped_column(SmallInteger)
    rating: Mapped[int | None] = mapped_column(SmallInteger)
    # wallet.estimated: the estimate's period [period_start, period_end) and spend.
    period_start: Mapped[date | None] = mapped_column(Date)
    period_end: Mapped[date | None] = mapped_column(Date)
    currency: Mapped[str | None] = mapped_column(String(3))
    original_amount: Mapped[Decimal | None] = mapped_column(Numeric)
    amount: Mapped[Decimal | None] = mapped_column(Numeric)

    __table_args__ = (
        Index("ix_metrics_engagements_time", "tenant_id", "kind", "occurred_at"),
        Index("ix_metrics_engagements_customer", "tenant_id", "customer_id"),
    )


# The customer list's orders (GET /v1/customers?sort=): each is a tuple of key expressions, scanned in one
# direction, customer id last; a nullable key is preceded by whether it is set, so customers without a CLV
# prediction come last. The indexes below are these very expressions, with and without the segment.
LIST_SORTS: dict[str, tuple[tuple[str, ...], bool]] = {
    "clv": (("(clv is not null)", "coalesce(clv, 0)", "customer_id"), True),
    "revenue": (("net_revenue", "customer_id"), True),
    "p_alive": (("(p_alive is null)", "coalesce(p_alive, 0)", "customer_id"), False),
    "last_purchase": (("last_purchase_at", "customer_id"), True),
}


def _list_indexes() -> list[Index]:
    out: list[Index] = []
    for name, (keys, _) in LIST_SORTS.items():
        for by_segment in (False, True):
            columns = ["tenant_id", *(["segment"] if by_segment else []), *keys]
            label = f"ix_metrics_customer_segments_{'segment_' if by_segment else ''}{name}"
            out.append(Index(label, *(text(c) if "(" in c else c for c in columns)))
    return out


class CustomerSegment(Base):
    """A customer's current value segment (since when, and why), with the customer list's sort keys copied
    from its summary and latest CLV prediction when it was classified."""

    __tablename__ = "customer_segments"

    tenant_id: Mapped[str] = mapped_column(String(TENANT), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    segment: Mapped[str] = mapped_column(String(20), nullable=False)
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    since: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    classified_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    orders: Mapped[int] = mapped_column(Integer, nullable=False)
    net_revenue: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
    last_purchase_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    clv: Mapped[Decimal | None] = mapped_column(Numeric)
    p_alive: Mapped[float | None] = mapped_column(Double)

    __table_args__ = tuple(_list_indexes())


class SegmentPending(Base):
    """Customers whose facts an ingested batch changed, waiting to be classified again (by the pending loop)."""

    __tablename__ = "segments_pending"

    tenant_id: Mapped[str] = mapped_column(String(TENANT), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    marked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


# The columns of a customer_segments row, in the order the repository writes them.
SEGMENT_COLUMNS = (
    "tenant_id",
    "customer_id",
    "segment",
    "reason",
    "since",
    "classified_at",
    "orders",
    "net_revenue",
    "last_purchase_at",
    "clv",
    "p_alive",
)


class OutboxMessage(Base):
    """segment.changed events written with the segment, relayed to Kafka by the outbox relay."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    topic: Mapped[str] = mapped_column(String(200), nullable=False)
    key: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    value: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class SurveyPeriod(Base):
    """A customer's latest answer with an NPS in the period of kind `period` starting `start`."""

    __tablename__ = "survey_periods"

    tenant_id: Mapped[str] = mapped_column(String(TENANT), primary_key=True)
    period: Mapped[str] = mapped_column(String(8), primary_key=True)
    start: Mapped[date] = mapped_column(Date, primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    event_id: Mapped[str] = mapped_column(String(ID), nullable=False)
    nps: Mapped[int] = mapped_column(SmallInteger, nullable=False)


class PeriodSurveys(Base):
    """Per period: the customers' latest NPS answers (responses, promoters, detractors) and every effort score."""

    __tablename__ = "period_surveys"

    tenant_id: Mapped[str] = mapped_column(String(TENANT), primary_key=True)
    period: Mapped[str] = mapped_column(String(8), primary_key=True)
    start: Mapped[date] = mapped_column(Date, primary_key=True)
    responses: Mapped[int] = mapped_column(Integer, nullable=False, server_default=ZERO)
    promoters: Mapped[int] = mapped_column(Integer, nullable=False, server_default=ZERO)
    detractors: Mapped[int] = mapped_column(Integer, nullable=False, server_default=ZERO)
    effort_sum: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=ZERO)
    efforts: Mapped[int] = mapped_column(Integer, nullable=False, server_default=ZERO)


class ClvPrediction(Base):
    """A customer's predictive CLV from the tenant's latest fit (`loyalty metrics fit-clv`), replaced whole per fit;
    days are the time unit, money is in `currency` (the tenant's reporting currency)."""

    __tablename__ = "clv_predictions"

    tenant_id: Mapped[str] = mapped_column(String(TENANT), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    fitted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    frequency: Mapped[int] = mapped_column(Integer, nullable=False)
    recency: Mapped[int] = mapped_column(Integer, nullable=False)
    t: Mapped[int] = mapped_column(Integer, nullable=False)
    currency: Mapped[str] = mapped_column(String(3), nullable=False)
    monetary_value: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
    expected_spend: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
    p_alive: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
    purchases_90d: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
    purchases_365d: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
    clv: Mapped[Decimal] = mapped_column(Numeric, nullable=False)


class ClvFit(Base):
    """One fit of a tenant's CLV models: when, on what, with which parameters, how long it took."""

    __tablename__ = "clv_fits"

    tenant_id: Mapped[str] = mapped_column(String(TENANT), primary_key=True)
    fitted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    as_of: Mapped[date] = mapped_column(Date, nullable=False)
    method: Mapped[str] = mapped_column(String(20), nullable=False)
    parameters: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    customers: Mapped[int] = mapped_column(Integer, nullable=False)
    repeat_customers: Mapped[int] = mapped_column(Integer, nullable=False)
    duration_seconds: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
    currency: Mapped[str] = mapped_column(String(3), nullable=False)
    discount_rate: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
    horizon_months: Mapped[int] = mapped_column(Integer, nullable=False)


class RedemptionOrder(Base):
    """A redemption order of the ledger's (from its first `redemption.changed`): what every change of it repeats."""

    __tablename__ = "redemption_orders"

    tenant_id: Mapped[str] = mapped_column(String(TENANT), primary_key=True)
    order_id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(ID), nullable=False)
    reward_id: Mapped[str] = mapped_column(String(ID), nullable=False)
    reward_kind: Mapped[str] = mapped_column(String(12), nullable=False)
    points: Mapped[int] = mapped_column(BigInteger, nullable=False)
    value: Mapped[Decimal | None] = mapped_column(Numeric)
    currency: Mapped[str | None] = mapped_column(String(3))


class RedemptionChange(Base):
    """Every `redemption.changed` of an order, once: what its footprint is recomputed from (metrics/redemptions.py)."""

    __tablename__ = "redemption_changes"

    tenant_id: Mapped[str] = mapped_column(String(TENANT), primary_key=True)
    order_id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    source: Mapped[str] = mapped_column(String(ID), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    change: Mapped[str] = mapped_column(String(20), nullable=False)
    state: Mapped[str] = mapped_column(String(20), nullable=False)
    points_returned: Mapped[int] = mapped_column(BigInteger, nullable=False)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class RedemptionsDaily(Base):
    """Per tenant, day, reward and kind: the redemption counters a window sums (metrics/redemptions.py says what
    each counts); a change that moves an order's confirmation to another day leaves zeros behind."""

    __tablename__ = "redemptions_daily"

    tenant_id: Mapped[str] = mapped_column(String(TENANT), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    reward_id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    reward_kind: Mapped[str] = mapped_column(String(12), primary_key=True)
    reserved: Mapped[int] = mapped_column(Integer, nullable=False, server_default=ZERO)
    confirmed: Mapped[int] = mapped_column(Integer, nullable=False, server_default=ZERO)
    cancelled: Mapped[int] = mapped_column(Integer, nullable=False, server_default=ZERO)
    expired: Mapped[int] = mapped_column(Integer, nullable=False, server_default=ZERO)
    refunded: Mapped[int] = mapped_column(Integer, nullable=False, server_default=ZERO)
    coupons_consumed: Mapped[int] = mapped_column(Integer, nullable=False, server_default=ZERO)
    points_reserved: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=ZERO)
    points_spent: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=ZERO)
    points_returned: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=ZERO)


class RedemptionValuesDaily(Base):
    """Per tenant, day, reward, kind and currency: the money value of the orders confirmed that day."""

    __tablename__ = "redemption_values_daily"

    tenant_id: Mapped[str] = mapped_column(String(TENANT), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    reward_id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    reward_kind: Mapped[str] = mapped_column(String(12), primary_key=True)
    currency: Mapped[str] = mapped_column(String(3), primary_key=True)
    value: Mapped[Decimal] = mapped_column(Numeric, nullable=False, server_default=ZERO)
