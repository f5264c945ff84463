from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings

# ~2 KB of memory per customer state.
STATE_CACHE_SIZE = 100_000


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="rules_", env_file=".env", extra="ignore")

    service_name: str = "rules"
    http_port: int = 8002
    database_url: str = "postgresql+asyncpg://loyalty:loyalty@127.0.0.1:5432/loyalty_rules"
    outbox_sweep_after_seconds: float = Field(
        default=5.0, ge=0, description="Outbox rows older than this are taken as left behind by a crash"
    )
    outbox_sweep_seconds: float = Field(default=2.0, gt=0, description="How often crash leftovers are relayed")
    outbox_batch_size: int = Field(default=5000, ge=1, description="Outbox rows one sweep round relays")
    state_cache_size: int = Field(
        default=STATE_CACHE_SIZE,
        ge=0,
        description="Customer states each consumer process keeps between batches (0: read every batch's states)",
    )


settings = Settings()
