from metrics.config import settings
from metrics.models import Base
from shared.migrations import run_env

run_env(Base.metadata, settings.migration_url, service_role=settings.service_role)
