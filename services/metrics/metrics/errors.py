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
