from typing import Annotated

from fastapi import APIRouter, Depends

from rules import schemas
from rules.errors import CustomerNotFound
from rules.service import rules_service
from shared.auth import Principal, require
from shared.db import ReadSessionDep

router = APIRouter(prefix="/v1", tags=["customers"])

PointsRead = Annotated[Principal, Depends(require("points:read"))]


@router.get("/customers/{customer_id}/state", response_model=schemas.CustomerState)
async def get_customer_state(customer_id: str, principal: PointsRead, session: ReadSessionDep) -> object:
    """The state the rules keep for one customer of the caller's tenant."""
    state = await rules_service.get_state(session, tenant_id=principal.tenant_id, customer_id=customer_id)
    if state is None:
        raise CustomerNotFound(customer_id)
    return state
