from datetime import datetime

from pydantic import BaseModel, ConfigDict


class ReceivedCommand(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    command_id: str
    customer_id: str
    kind: str
    points: int
    event_id: str
    received_at: datetime
