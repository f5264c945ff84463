from ledger.config import settings
from ledger.models import Base
from shared.migrations import run_env

# The service role may add entries and read them, never change or remove one.
run_env(Base.metadata, settings.migration_url, service_role=settings.service_role, append_only=["entries"])
