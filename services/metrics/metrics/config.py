from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="metrics_", env_file=".env", extra="ignore")

    service_name: str = "metrics"
    http_port: int = 8003
    database_url: str = "postgresql+asyncpg://loyalty:loyalty@127.0.0.1:5432/loyalty_metrics"


settings = Settings()
