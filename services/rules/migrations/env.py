from rules.config import settings
from rules.models import Base
from shared.migrations import run_env

run_env(Base.metadata, settings.database_url)
