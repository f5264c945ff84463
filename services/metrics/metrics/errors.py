from shared.errors import ServiceError


class MetricsError(ServiceError):
    pass


class InvalidPeriod(MetricsError):
    """The period starts after it ends."""

    status_code = 422

    def __init__(self, start: object, end: object) -> None:
        super().__init__(f"the period start {start} is after its end {end}", start=str(start), end=str(end))


class InvalidParameter(MetricsError):
    """A query parameter is out of its range (a period kind, a range too long)."""

    status_code = 422


class ClvNotFitted(MetricsError):
    """The tenant's CLV models were never fitted (`loyalty metrics fit-clv`, or the service's schedule)."""

    status_code = 404

    def __init__(self, tenant_id: str) -> None:
        super().__init__(f"no CLV fit for tenant {tenant_id!r} yet", tenant_id=tenant_id)
