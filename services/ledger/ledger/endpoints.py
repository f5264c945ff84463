from typing import Annotated

from fastapi import APIRouter, Depends

from ledger import schemas
from ledger.errors import CommandNotFound
from ledger.service import ledger_service
from shared.auth import Principal, require
from shared.db import ReadSessionDep

router = APIRouter(prefix="/v1", tags=["commands"])

PointsRead = Annotated[Principal, Depends(require("points:read"))]


@router.get("/commands/{command_id}", response_model=schemas.ReceivedCommand)
async def get_command(command_id: str, principal: PointsRead, session: ReadSessionDep) -> object:
    """A points command the ledger received from Kafka, by its command id."""
    command = await ledger_service.get_command(session, tenant_id=principal.tenant_id, command_id=command_id)
    if command is None:
        raise CommandNotFound(command_id)
    return command
