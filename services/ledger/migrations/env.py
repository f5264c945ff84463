from ledger.config import settings
from ledger.models import Base
from shared.migrations import run_env

run_env(Base.metadata, settings.database_url)
