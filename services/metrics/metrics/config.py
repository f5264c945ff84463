from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="metrics_", env_file=".env", extra="ignore")

    service_name: str = "metrics"
    http_port: int = 8003
    database_url: str = "postgresql+asyncpg://loyalty:loyalty@127.0.0.1:5432/loyalty_metrics"

    clv_fit_enabled: bool = Field(default=True, description="Fit each tenant's predictive CLV models periodically")
    clv_fit_interval_s: float = Field(default=86_400.0, gt=0, description="A tenant's fit is renewed this often")
    clv_fit_check_s: float = Field(default=600.0, gt=0, description="How often to look for tenants due for a fit")
    clv_fit_timeout_s: float = Field(default=1_800.0, gt=0, description="A fit process running longer is killed")


settings = Settings()
