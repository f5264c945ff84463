from __future__ import annotations

from datetime import timedelta
from typing import Literal, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url

from shared.contract import Limits

_DEV_PASSWORD = "loyalty"
# The role that owns the schemas and runs the migrations (deploy/postgres/db-up.sh creates it); the service
# role of `database_url` only reads and writes rows, and may not change what it does not own.
DEV_OWNER = "loyalty_owner"


class ServiceSettings(BaseSettings):
    """Settings every service shares; each service subclasses it with its own env prefix and defaults."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    service_name: str = "service"
    environment: Literal["dev", "test", "prod"] = "dev"
    log_level: str = "INFO"
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    database_url: str = "postgresql+asyncpg://loyalty:loyalty@127.0.0.1:5432/loyalty"
    database_owner_url: str | None = Field(
        default=None,
        description="The database as the role that owns the schema and runs the migrations; default: "
        f"database_url with the user and password {DEV_OWNER}",
    )
    database_pool_size: int = 10
    database_pool_pre_ping: bool = Field(
        default=True, description="Test each pooled connection on checkout (costs a round trip per checkout)"
    )
    database_plan_cache_mode: Literal["auto", "force_generic_plan", "force_custom_plan"] = Field(
        default="auto", description="PostgreSQL's plan_cache_mode for the service's connections"
    )
    database_pool_warm: bool = Field(
        default=True,
        description="Open the pool's connections at start-up, so the first burst of traffic does not wait for them",
    )
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_client_id_prefix: str = "loyalty"
    topic_replication_factor: int = Field(default=1, ge=1)
    topic_partitions: int | None = Field(default=None, ge=1, description="Override every topic's partition count")
    create_topics: bool = True
    topic_namespace: str = Field(default="", description="Prefix for every topic name (isolates test runs)")
    consumer_group_suffix: str = Field(default="", description="Appended to every consumer group id")
    consumers_enabled: bool = True
    max_event_bytes: int = Field(default=256 * 1024, description="Larger messages are dead-lettered")
    max_request_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1, description="Larger request bodies are refused (413); a full ingest batch fits"
    )
    max_future_skew_seconds: float = Field(
        default=300, ge=0, description="How far in the future an event's time may lie (producers' clock skew)"
    )
    consumer_batch_size: int = Field(default=500, ge=1)
    consumer_batch_timeout_ms: int = Field(default=200, ge=1)
    consumer_retry_later_attempts: int = Field(
        default=5, ge=1, description="Tries of a batch that meets a passing conflict before its culprit is isolated"
    )
    consumer_retry_backoff_seconds: float = Field(default=0.5, gt=0, description="First pause before a retry")
    consumer_retry_backoff_max_seconds: float = Field(
        default=30, gt=0, description="Longest pause between retries of a batch during an outage"
    )
    consumer_stall_seconds: float = Field(
        default=120, gt=0, description="A consumer with a batch waiting and no progress for this long is not ready"
    )
    consumer_unready_after_failures: int = Field(
        default=5, ge=1, description="A consumer whose batch failed this many times in a row is not ready"
    )
    api_key_cache_seconds: float = Field(default=5.0, ge=0)
    api_key_cache_size: int = Field(default=10_000, ge=1, description="Key ids (found or not) the cache keeps")
    api_key_failure_burst: int = Field(
        default=20, ge=1, description="Failed authentications a client (IP address) may make at once"
    )
    api_key_failures_per_minute: float = Field(
        default=10.0, gt=0, description="How fast a client's budget of failed authentications refills"
    )
    api_key_failure_clients: int = Field(
        default=10_000, ge=1, description="Clients whose failed authentications are tracked at once"
    )
    outbox_max_age_seconds: float = Field(
        default=60.0, gt=0, description="/readyz fails while the oldest unpublished outbox row is older than this"
    )
    outbox_max_record_bytes: int = Field(
        default=1_000_000,
        ge=1024,
        description="Outbox rows whose record (key and value) is larger are quarantined, not sent; keep it below "
        "the topics' max.message.bytes",
    )

    @property
    def migration_url(self) -> str:
        if self.database_owner_url:
            return self.database_owner_url
        url = make_url(self.database_url).set(username=DEV_OWNER, password=DEV_OWNER)
        return url.render_as_string(hide_password=False)

    @property
    def service_role(self) -> str | None:
        """The role the service connects as: the migrations grant it what it needs, nothing more."""
        return make_url(self.database_url).username

    @property
    def input_limits(self) -> Limits:
        return Limits(max_future_skew=timedelta(seconds=self.max_future_skew_seconds))

    def topic(self, name: str) -> str:
        return f"{self.topic_namespace}{name}"

    def group(self, name: str) -> str:
        return f"{name}{self.consumer_group_suffix}"

    @model_validator(mode="after")
    def _no_dev_secrets_in_prod(self) -> Self:
        if self.environment == "prod" and f":{_DEV_PASSWORD}@" in self.database_url:
            raise ValueError("the development database password must not be used in prod")
        if self.environment == "prod" and f":{DEV_OWNER}@" in self.migration_url:
            raise ValueError("set *_DATABASE_OWNER_URL in prod: the development owner password must not be used")
        return self
