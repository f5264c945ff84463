from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="ledger_", env_file=".env", extra="ignore")

    service_name: str = "ledger"
    http_port: int = 8001
    database_url: str = "postgresql+asyncpg://loyalty:loyalty@127.0.0.1:5432/loyalty_ledger"


settings = Settings()
