from shared.errors import ServiceError


class LedgerError(ServiceError):
    pass


class CommandNotFound(LedgerError):
    status_code = 404

    def __init__(self, command_id: str) -> None:
        super().__init__(f"no points command {command_id!r} was applied", command_id=command_id)


class AccountNotFound(LedgerError):
    status_code = 404

    def __init__(self, account_id: str) -> None:
        super().__init__(f"no account {account_id!r} in this programme", account_id=account_id)


class InvalidAccount(LedgerError):
    status_code = 422

    def __init__(self, account_id: str, why: str) -> None:
        super().__init__(f"account {account_id!r} {why}", account_id=account_id)


class InsufficientPoints(LedgerError):
    status_code = 409

    def __init__(self, account_id: str, *, requested: int, available: int) -> None:
        super().__init__(
            f"account {account_id!r} has {available} available points, {requested} requested",
            account_id=account_id,
            requested=requested,
            available=available,
        )


class HoldNotFound(LedgerError):
    status_code = 404

    def __init__(self, hold_id: str) -> None:
        super().__init__(f"no hold {hold_id!r}", hold_id=hold_id)


class HoldNotActive(LedgerError):
    status_code = 409

    def __init__(self, hold_id: str, status: str) -> None:
        super().__init__(f"hold {hold_id!r} is {status}, not active", hold_id=hold_id, hold_status=status)


class CaptureExceedsHold(LedgerError):
    status_code = 409

    def __init__(self, hold_id: str, *, requested: int, held: int) -> None:
        super().__init__(
            f"cannot capture {requested} points from hold {hold_id!r} of {held}",
            hold_id=hold_id,
            requested=requested,
            held=held,
        )


class OriginalEarnNotFound(LedgerError):
    status_code = 404

    def __init__(self, command_id: str) -> None:
        super().__init__(f"no earn {command_id!r} to claw back", original_command_id=command_id)


class IdempotencyKeyReused(LedgerError):
    status_code = 422

    def __init__(self, key: str) -> None:
        super().__init__(f"Idempotency-Key {key!r} was already used with a different request", idempotency_key=key)
