"""The input contract every producer's event must meet, checked at the edge: by the consumer runner for
Kafka input and by REST ingest before it answers 202, so that 202 means the consumer will take it.

`violation` returns None for an event that meets the contract, or a short reason (for the DLQ or a 422).
Schema-level bounds (lengths, money ranges, points) live on the models in `shared.events`; this module
holds what depends on the message around the event (its key) or on settings (how far in the future an
event time may lie):

- the Kafka key is the event's `tenantid:subject` (`CloudEvent.key`): a customer's events are ordered by
  their partition, and a message keyed otherwise may sit on another partition than the customer's other
  events. REST ingest derives the key itself (None here: nothing to check).
- the event's `time` and its payload's occurrence time (`ordered_at`) lie at most `max_future_skew`
  after now. Past times are fine (suppliers import years of history); one event dated years ahead would
  otherwise become the customer's latest and age every rolling window out of their state.
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
    if key is not None and key != event.key:
        return "message key does not match the event's tenantid:subject"
    latest = now + limits.max_future_skew
    if event.time > latest:
        return f"event time {event.time.isoformat()} is more than {_span(limits.max_future_skew)} in the future"
    # A custom engagement's extra fields are untyped: only a validated datetime is an occurrence time.
    ordered_at = getattr(event.data, "ordered_at", None)
    if isinstance(ordered_at, datetime) and ordered_at > latest:
        return f"data.ordered_at {ordered_at.isoformat()} is more than {_span(limits.max_future_skew)} in the future"
    return None


def _span(skew: timedelta) -> str:
    return f"{int(skew.total_seconds())}s"
