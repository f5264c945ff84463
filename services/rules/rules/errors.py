from shared.errors import ServiceError


class RulesError(ServiceError):
    pass


class CustomerNotFound(RulesError):
    status_code = 404

    def __init__(self, customer_id: str) -> None:
        super().__init__(f"no purchases seen for customer {customer_id!r}", customer_id=customer_id)
