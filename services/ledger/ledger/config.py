from typing import Literal, Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings

DEV_ANCHOR_KEY = "dev-anchor-key-not-secret"


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="ledger_", env_file=".env", extra="ignore")

    service_name: str = "ledger"
    http_port: int = 8001
    database_url: str = "postgresql+asyncpg://loyalty:loyalty@127.0.0.1:5432/loyalty_ledger"
    # Off on the ledger's hot paths: a connection dropped by the server fails its statement instead (a
    # 500 problem on a request, a retried batch on a consumer) and the pool discards it.
    database_pool_pre_ping: bool = False
    # The hot statements are fixed shapes (look-ups by key, arrays of keys) whose best plan does not
    # depend on the values: PostgreSQL's default re-plans a prepared statement per execution until it
    # trusts a generic plan, which was a third of its CPU per redeem.
    database_plan_cache_mode: Literal["auto", "force_generic_plan", "force_custom_plan"] = "force_generic_plan"
    outbox_relay_enabled: bool = Field(default=True, description="Relay committed entries to loyalty.ledger-entries.v1")
    outbox_batch_size: int = Field(default=1000, ge=1)
    # Every relay run is a transaction, a claim query and a produce request whatever it carries: polling
    # every 50 ms cost a redeem ~0.3 ms of CPU across the service, PostgreSQL and the broker at 300 req/s.
    # Entries feed metrics, which need no sub-second freshness.
    outbox_poll_interval_s: float = Field(
        default=0.2,
        gt=0,
        description="Wait after an outbox poll that was not full: longer relays larger batches for less CPU, "
        "and entries reach Kafka up to this much later",
    )
    tasks_enabled: bool = Field(default=True, description="Mature, expire and release holds in the background")
    tasks_interval_s: float = Field(default=30.0, gt=0)
    tasks_batch_limit: int = Field(default=1000, ge=1, description="Due lots or holds handled per task run")
    # The chain heads are signed with this key and published outside the database; keep it out of the
    # database and away from its administrators, or a rewritten chain can be re-anchored.
    anchor_key: SecretStr = Field(
        default=SecretStr(DEV_ANCHOR_KEY), description="HMAC key signing the chain heads published on the anchors topic"
    )
    anchors_enabled: bool = Field(
        default=True, description="Publish the signed chain heads periodically (in a process that runs the tasks)"
    )
    anchor_interval_s: float = Field(default=60.0, gt=0, description="How often changed chain heads are anchored")
    anchor_read_timeout_s: float = Field(
        default=30.0, gt=0, description="How long verify may take to read the anchors topic"
    )

    @model_validator(mode="after")
    def _no_dev_anchor_key_in_prod(self) -> Self:
        if self.environment == "prod" and self.anchor_key.get_secret_value() == DEV_ANCHOR_KEY:
            raise ValueError("set LEDGER_ANCHOR_KEY in prod: the development anchor key is public")
        return self


settings = Settings()
