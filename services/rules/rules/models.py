from datetime import datetime

from sqlalchemy import DateTime, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shared.auth import api_keys_table
from shared.db import make_metadata
from shared.tracking import processed_events_table


class Base(DeclarativeBase):
    metadata = make_metadata("rules")


api_keys = api_keys_table(Base.metadata)
processed_events = processed_events_table(Base.metadata)


class CustomerState(Base):
    __tablename__ = "customer_states"

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    purchase_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    first_purchase_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_purchase_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
