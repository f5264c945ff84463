from datetime import datetime

from sqlalchemy import DateTime, Integer, String, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shared.auth import api_keys_table
from shared.db import make_metadata
from shared.tracking import processed_events_table


class Base(DeclarativeBase):
    metadata = make_metadata("ledger")


api_keys = api_keys_table(Base.metadata)
processed_events = processed_events_table(Base.metadata)


class ReceivedCommand(Base):
    """Points commands as they arrived from Kafka, one row per command id (the idempotency key)."""

    __tablename__ = "received_commands"

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    command_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(200), nullable=False)
    kind: Mapped[str] = mapped_column(String(40), nullable=False)
    points: Mapped[int] = mapped_column(Integer, nullable=False)
    event_id: Mapped[str] = mapped_column(String(200), nullable=False)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
