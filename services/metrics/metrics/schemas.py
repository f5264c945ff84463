from datetime import date

from pydantic import BaseModel, ConfigDict

from shared.events import Amount


class DailyPurchases(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    day: date
    currency: str
    orders: int
    net_revenue: Amount


class DailyPurchasesList(BaseModel):
    items: list[DailyPurchases]
    total_orders: int
