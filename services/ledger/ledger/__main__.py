import uvicorn

from ledger.app import create_app
from ledger.config import settings

if __name__ == "__main__":
    uvicorn.run(create_app(), host=settings.http_host, port=settings.http_port, log_config=None)
