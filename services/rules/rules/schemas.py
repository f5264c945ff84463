from datetime import datetime

from pydantic import BaseModel, ConfigDict


class CustomerState(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    customer_id: str
    purchase_count: int
    first_purchase_at: datetime | None
    last_purchase_at: datetime | None
