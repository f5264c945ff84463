from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="ledger_", env_file=".env", extra="ignore")

    service_name: str = "ledger"
    http_port: int = 8001
    database_url: str = "postgresql+asyncpg://loyalty:loyalty@127.0.0.1:5432/loyalty_ledger"
    # Off on the ledger's hot paths: a connection dropped by the server fails its statement instead (a
    # 500 problem on a request, a retried batch on a consumer) and the pool discards it.
    database_pool_pre_ping: bool = False
    outbox_relay_enabled: bool = Field(default=True, description="Relay committed entries to loyalty.ledger-entries.v1")
    outbox_batch_size: int = Field(default=1000, ge=1)
    outbox_poll_interval_s: float = Field(default=0.05, gt=0, description="Idle wait between outbox polls")
    tasks_enabled: bool = Field(default=True, description="Mature, expire and release holds in the background")
    tasks_interval_s: float = Field(default=30.0, gt=0)
    tasks_batch_limit: int = Field(default=1000, ge=1, description="Due lots or holds handled per task run")


settings = Settings()
