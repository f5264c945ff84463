from rules.config import settings
from rules.models import Base
from shared.migrations import run_env

run_env(Base.metadata, settings.migration_url, service_role=settings.service_role)
