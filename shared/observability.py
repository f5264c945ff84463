"""Prometheus metrics and structured JSON logs, the same in every service."""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HTTP_REQUESTS = Counter("http_requests_total", "HTTP requests", ["service", "method", "route", "status"])
HTTP_LATENCY = Histogram(
    "http_request_duration_seconds",
    "HTTP request latency",
    ["service", "method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
CONSUMER_MESSAGES = Counter("consumer_messages_total", "Consumed messages by outcome", ["service", "topic", "outcome"])
CONSUMER_BATCH_SECONDS = Histogram("consumer_batch_duration_seconds", "Time to settle one consumed batch", ["service"])
CONSUMER_LAG = Gauge(
    "consumer_lag", "Messages behind the partition's high watermark", ["service", "topic", "partition"]
)
# reason_class is one of a few fixed codes (too_large, not_json, invalid, wrong_topic, contract, refused,
# handler_failed, ...): never text of the event, which stays in the DLQ header and the log.
DLQ_MESSAGES = Counter("dlq_messages_total", "Messages sent to the DLQ", ["service", "source_topic", "reason_class"])
OUTBOX_QUARANTINED = Counter(
    "outbox_quarantined_total", "Outbox rows moved to the quarantine table (fixed reason codes)", ["service", "reason"]
)
OUTBOX_OLDEST_AGE = Gauge("outbox_oldest_age_seconds", "Age of the oldest row waiting in the outbox", ["service"])
CONSUMER_CONSECUTIVE_FAILURES = Gauge(
    "consumer_consecutive_failures",
    "Failed attempts in a row to fetch or settle a batch (0 once the consumer advances)",
    ["service", "group"],
)
CONSUMER_LAST_PROGRESS = Gauge(
    "consumer_last_progress_timestamp_seconds",
    "When the consumer last settled a batch or found nothing to consume (Unix time)",
    ["service", "group"],
)


class MetricsMiddleware:
    """Counts requests and times them per route template (not per raw path, to bound label cardinality)."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            method = scope.get("method", "")
            HTTP_REQUESTS.labels(self.service, method, template, str(status)).inc()
            HTTP_LATENCY.labels(self.service, method, template).observe(time.perf_counter() - started)


async def metrics_endpoint(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


_RESERVED = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "kafka"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
