from datetime import datetime

from rules.ruleset import Problem
from shared.errors import ServiceError


class RulesError(ServiceError):
    pass


class CustomerNotFound(RulesError):
    """No events were seen for this customer."""

    status_code = 404

    def __init__(self, customer_id: str) -> None:
        super().__init__(f"no events seen for customer {customer_id!r}", customer_id=customer_id)


class RulesetNotFound(RulesError):
    """The tenant has no such ruleset, or no such version of it."""

    status_code = 404

    def __init__(self, ruleset_id: str, version: int | None = None) -> None:
        what = f"ruleset {ruleset_id!r}" + (f" version {version}" if version is not None else "")
        super().__init__(f"{what} does not exist for this tenant", ruleset_id=ruleset_id, version=version)


class RulesetValidationFailed(RulesError):
    """The ruleset document is invalid (`errors` lists every problem)."""

    status_code = 422

    def __init__(self, problems: list[Problem]) -> None:
        first = problems[0]
        where = f"rule {first.rule!r} at {first.path}" if first.rule else (first.path or "document")
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(
            f"the ruleset is invalid: {where}: {first.message}{more}", errors=[p.as_dict() for p in problems]
        )


class NoActiveRuleset(RulesError):
    """The tenant has no ruleset active at that moment."""

    status_code = 409

    def __init__(self, tenant_id: str, at: datetime) -> None:
        super().__init__(f"tenant {tenant_id!r} has no ruleset active at {at.isoformat()}", at=at.isoformat())


class SimulationNotSupported(RulesError):
    """The event cannot be simulated (a refund, or one the engine cannot evaluate)."""

    status_code = 422


class InvalidEvent(RulesError):
    """An event is invalid or breaks the input contract (see the README)."""

    status_code = 422

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message if index is None else f"event [{index}]: {message}", index=index)


class EventTooLarge(InvalidEvent):
    """An event is larger than a message the consumer takes (`max_event_bytes`)."""

    status_code = 413
    title = "Content Too Large"


class TiersNotDefined(RulesError):
    """The active ruleset defines no tiers."""

    status_code = 409

    def __init__(self, ruleset_id: str, version: int) -> None:
        super().__init__(f"ruleset {ruleset_id!r} v{version} defines no tiers", ruleset_id=ruleset_id, version=version)
