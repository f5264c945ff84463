from typing import Annotated

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings

# A bound on the tenants one process exports as Prometheus gauges (the label set's size).
MAX_GAUGE_TENANTS = 1000


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="metrics_", env_file=".env", extra="ignore")

    service_name: str = "metrics"
    http_port: int = 8003
    database_url: str = "postgresql+asyncpg://loyalty:loyalty@127.0.0.1:5432/loyalty_metrics"
    outbox_relay_enabled: bool = Field(
        default=True, description="Relay segment.changed to loyalty.customers.v1 (with or without the consumers)"
    )
    outbox_poll_seconds: float = Field(default=1.0, gt=0, description="Wait after an outbox round that was not full")
    outbox_batch_size: int = Field(default=1000, ge=1, description="segment.changed rows one relay round sends")
    segments_interval_seconds: float = Field(
        default=86400.0, gt=0, description="How often every customer is classified again (time alone makes leavers)"
    )
    segments_first_run_seconds: float = Field(
        default=60.0, ge=0, description="Wait after start before the first scheduled classification"
    )
    segments_pending_seconds: float = Field(
        default=1.0, gt=0, description="Wait after a round of the pending loop that was not full"
    )
    segments_pending_batch: int = Field(
        default=2000, ge=1, le=100_000, description="Marked customers one round of the pending loop classifies"
    )
    segments_page_size: int = Field(
        default=1000, ge=1, le=10_000, description="Customers classified per transaction in the scheduled run"
    )

    kpi_gauges_enabled: bool = Field(
        default=True, description="Refresh the KPI gauges of /metrics in the background (one replica is enough)"
    )
    kpi_gauges_interval_seconds: float = Field(default=60.0, gt=0, le=86400, description="Pause between refreshes")
    kpi_gauges_max_tenants: int = Field(
        default=50,
        ge=1,
        le=MAX_GAUGE_TENANTS,
        description="Tenants exported per refresh: the pinned ones, then the most recently active; the rest are "
        'dropped and counted (loyalty_kpi_tenants{state="dropped"})',
    )
    kpi_gauges_tenants: list[Annotated[str, Field(min_length=1, max_length=63)]] = Field(
        default_factory=list,
        max_length=MAX_GAUGE_TENANTS,
        description="Tenants always exported (within the maximum), e.g. the largest accounts",
    )
    kpi_gauges_statement_timeout_ms: int = Field(
        default=5000, ge=100, le=600_000, description="Bound on each tenant's queries in one refresh"
    )

    clv_fit_enabled: bool = Field(default=True, description="Fit each tenant's predictive CLV models periodically")
    clv_fit_interval_s: float = Field(default=86_400.0, gt=0, description="A tenant's fit is renewed this often")
    clv_fit_check_s: float = Field(default=600.0, gt=0, description="How often to look for tenants due for a fit")
    clv_fit_timeout_s: float = Field(default=1_800.0, gt=0, description="A fit process running longer is killed")


settings = Settings()
