from shared.errors import ServiceError


class MetricsError(ServiceError):
    pass


class InvalidPeriod(MetricsError):
    """The period starts after it ends."""

    status_code = 422

    def __init__(self, start: object, end: object) -> None:
        super().__init__(f"the period start {start} is after its end {end}", start=str(start), end=str(end))


class CustomerNotFound(MetricsError):
    """The metrics service has seen no event of this customer."""

    status_code = 404

    def __init__(self, customer_id: str) -> None:
        super().__init__(f"no metrics for customer {customer_id!r}", customer_id=customer_id)


class InvalidCursor(MetricsError):
    """The cursor is not one a page of this list (with this sort) returned."""

    status_code = 422

    def __init__(self) -> None:
        super().__init__("the cursor is not one this list returned for this sort; start without a cursor")


class InvalidParameter(MetricsError):
    """A query parameter is out of its range (a period kind, a range too long)."""

    status_code = 422


class ClvNotFitted(MetricsError):
    """The tenant's CLV models were never fitted (`loyalty metrics fit-clv`, or the service's schedule)."""

    status_code = 404

    def __init__(self, tenant_id: str) -> None:
        super().__init__(f"no CLV fit for tenant {tenant_id!r} yet", tenant_id=tenant_id)
