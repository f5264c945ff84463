from datetime import date

from pydantic import BaseModel, ConfigDict

from shared.events import Money


class DailyPurchases(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    day: date
    currency: str
    orders: int
    net_revenue: Money


class DailyPurchasesList(BaseModel):
    items: list[DailyPurchases]
    total_orders: int
