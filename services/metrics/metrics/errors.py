from shared.errors import ServiceError


class MetricsError(ServiceError):
    pass


class InvalidPeriod(MetricsError):
    status_code = 422

    def __init__(self, start: object, end: object) -> None:
        super().__init__(f"the period start {start} is after its end {end}", start=str(start), end=str(end))
