"""What every service's lifespan owns: engine, sessionmaker, producer, key store and consumers.

Each service's `app.py` keeps its own `create_app()` and `lifespan`; this module holds the parts that
would otherwise be written three times.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from contextlib import AsyncExitStack
from dataclasses import replace
from types import TracebackType
from typing import Any, Self, TypedDict

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from starlette.requests import Request

from shared import db
from shared.auth import FailureBudget, KeyStore
from shared.consumer import BatchHandler, ConsumerRunner
from shared.db import AsyncSession
from shared.errors import install_error_handlers, problem
from shared.events import TOPIC_EVENT_TYPES, P
from shared.kafka import EventProducer, ensure_topics
from shared.observability import MetricsMiddleware, configure_logging, metrics_endpoint
from shared.request_limit import RequestBodyLimit
from shared.settings import ServiceSettings
from shared.topics import ALL_TOPICS, DLQ

log = logging.getLogger(__name__)

ConsumerFactory = Callable[["Runtime"], ConsumerRunner]
# A readiness check: None while healthy, else a short reason (shown by /readyz, which then answers 503).
HealthCheck = Callable[[], Awaitable[str | None]]


# Consumers hold whole batches (thousands of decoded events, their states and commands) while they
# allocate: with CPython's default thresholds (700, 10, 10) the collector rescans those live objects
# over and over, which measured ~20 µs of every event's ~40 µs of decoding. Fewer, larger young
# collections and rarer full ones keep that cost small; cyclic garbage is still collected.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    gc.set_threshold(*GC_THRESHOLDS)


class State(TypedDict):
    runtime: Runtime
    sessionmaker: async_sessionmaker[AsyncSession]
    key_store: KeyStore
    producer: EventProducer


class Runtime:
    def __init__(
        self,
        settings: ServiceSettings,
        *,
        api_keys: Table,
        consumers: Sequence[ConsumerFactory] = (),
    ) -> None:
        self.settings = settings
        self._api_keys = api_keys
        self._consumer_factories = consumers
        self._stack = AsyncExitStack()
        self.consumers: list[ConsumerRunner] = []
        self._checks: dict[str, HealthCheck] = {}

    def spawn(self, name: str, work: Coroutine[Any, Any, None]) -> None:
        """Runs a service's background loop (a relay, periodic tasks) for the runtime's life: cancelled and
        awaited when the runtime closes, before the consumers, producer and engine it uses."""
        task = asyncio.create_task(work, name=name)

        async def cancel() -> None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        self._stack.push_async_callback(cancel)

    def add_check(self, name: str, check: HealthCheck) -> None:
        """Adds a readiness check (a relay's backlog age, say) that `/readyz` runs with the built-in ones."""
        self._checks[name] = check

    async def __aenter__(self) -> Self:
        s = self.settings
        tune_gc()
        self.engine: AsyncEngine = db.create_engine(
            s.database_url,
            pool_size=s.database_pool_size,
            application_name=s.service_name,
            pre_ping=s.database_pool_pre_ping,
            plan_cache_mode=s.database_plan_cache_mode,
        )
        self._stack.push_async_callback(self.engine.dispose)
        if s.database_pool_warm:
            opened = await db.warm_pool(self.engine, s.database_pool_size)
            if opened < s.database_pool_size:
                log.warning("database pool not fully opened", extra={"opened": opened, "size": s.database_pool_size})
        self.sessionmaker = db.create_sessionmaker(self.engine)
        self.key_store = KeyStore(
            self.engine,
            self._api_keys,
            cache_seconds=s.api_key_cache_seconds,
            cache_size=s.api_key_cache_size,
            failures=FailureBudget(s.api_key_failure_burst, s.api_key_failures_per_minute, s.api_key_failure_clients),
        )
        if s.create_topics:
            specs = [replace(t, name=s.topic(t.name)) for t in ALL_TOPICS]
            await ensure_topics(
                s.kafka_bootstrap_servers,
                specs,
                replication_factor=s.topic_replication_factor,
                partitions_override=s.topic_partitions,
            )
        self.producer = EventProducer(
            s.kafka_bootstrap_servers, client_id=f"{s.kafka_client_id_prefix}-{s.service_name}"
        )
        await self.producer.start()
        self._stack.push_async_callback(self.producer.stop)
        if s.consumers_enabled:
            for factory in self._consumer_factories:
                runner = factory(self)
                await runner.start()
                self._stack.push_async_callback(runner.stop)
                self.consumers.append(runner)
        # What start-up built (modules, schemas, pools, clients) lives as long as the process: moved out of
        # the collector's generations, full collections no longer walk it again and again. Thawed at the
        # end, so a stopped runtime's objects can be collected (tests start many).
        gc.freeze()
        self._stack.callback(gc.unfreeze)
        log.info("started", extra={"consumers": [c.group_id for c in self.consumers]})
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    def make_consumer(self, *, group: str, topics: Sequence[str], handler: BatchHandler[P]) -> ConsumerRunner:
        """A runner wired from the settings: namespaced topics, the service's DLQ, batch sizes."""
        s = self.settings
        return ConsumerRunner(
            service=s.service_name,
            topics=[s.topic(t) for t in topics],
            group_id=s.group(group),
            bootstrap_servers=s.kafka_bootstrap_servers,
            handler=handler,
            dlq_producer=self.producer,
            dlq_topic=s.topic(DLQ),
            max_event_bytes=s.max_event_bytes,
            batch_size=s.consumer_batch_size,
            batch_timeout_ms=s.consumer_batch_timeout_ms,
            topic_event_types={s.topic(k): v for k, v in TOPIC_EVENT_TYPES.items()},
            retry_later_attempts=s.consumer_retry_later_attempts,
            retry_backoff_s=s.consumer_retry_backoff_seconds,
            retry_backoff_max_s=s.consumer_retry_backoff_max_seconds,
            stall_after_s=s.consumer_stall_seconds,
            unready_after_failures=s.consumer_unready_after_failures,
            limits=s.input_limits,
        )

    def state(self) -> State:
        return State(runtime=self, sessionmaker=self.sessionmaker, key_store=self.key_store, producer=self.producer)

    async def readiness(self, timeout_s: float = 2.0) -> dict[str, str]:
        checks: dict[str, str] = {}
        try:
            await asyncio.wait_for(db.ping(self.engine), timeout_s)
            checks["database"] = "ok"
        except Exception as exc:  # readiness reports every failure instead of raising it
            checks["database"] = f"unreachable: {type(exc).__name__}"
        try:
            await self.producer.ping(timeout_s)
            checks["kafka"] = "ok"
        except Exception as exc:
            checks["kafka"] = f"unreachable: {type(exc).__name__}"
        for consumer in self.consumers:
            checks[f"consumer:{consumer.group_id}"] = consumer.health() or "ok"
        for name, check in self._checks.items():
            try:
                problem_ = await asyncio.wait_for(check(), timeout_s)
            except Exception as exc:
                problem_ = f"check failed: {type(exc).__name__}"
            checks[name] = problem_ or "ok"
        return checks


def base_app(*, title: str, description: str, version: str, settings: ServiceSettings, lifespan: Any) -> FastAPI:
    configure_logging(settings.service_name, settings.log_level)
    app = FastAPI(
        title=title,
        description=description,
        version=version,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url="/redoc",
        openapi_url="/openapi.json",
    )
    app.add_middleware(RequestBodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(MetricsMiddleware, service=settings.service_name)
    install_error_handlers(app)
    app.include_router(ops_router)
    return app


ops_router = APIRouter(tags=["operations"])


@ops_router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (liveness)."""
    return {"status": "ok"}


@ops_router.get("/readyz", responses={503: {"description": "A dependency is unreachable"}})
async def readyz(request: Request) -> JSONResponse:
    """Database and Kafka reachable and consumers running and advancing (readiness); 503 otherwise."""
    runtime: Runtime = request.state.runtime
    checks = await runtime.readiness()
    if all(v == "ok" for v in checks.values()):
        return JSONResponse({"status": "ready", "checks": checks})
    failing = ", ".join(f"{k} {v}" for k, v in checks.items() if v != "ok")
    return problem(503, "Service Unavailable", f"not ready: {failing}", instance="/readyz", checks=checks)


ops_router.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
