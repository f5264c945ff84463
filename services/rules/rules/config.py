from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="rules_", env_file=".env", extra="ignore")

    service_name: str = "rules"
    http_port: int = 8002
    database_url: str = "postgresql+asyncpg://loyalty:loyalty@127.0.0.1:5432/loyalty_rules"


settings = Settings()
