from datetime import date
from decimal import Decimal

from sqlalchemy import Date, Integer, Numeric, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shared.auth import api_keys_table
from shared.db import make_metadata
from shared.tracking import processed_events_table


class Base(DeclarativeBase):
    metadata = make_metadata("metrics")


api_keys = api_keys_table(Base.metadata)
processed_events = processed_events_table(Base.metadata)


class DailyPurchases(Base):
    __tablename__ = "daily_purchases"

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    currency: Mapped[str] = mapped_column(String(3), primary_key=True)
    orders: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    net_revenue: Mapped[Decimal] = mapped_column(Numeric, nullable=False, default=Decimal(0))
