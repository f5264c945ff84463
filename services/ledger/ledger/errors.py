from shared.errors import ServiceError


class LedgerError(ServiceError):
    pass


class CommandNotFound(LedgerError):
    status_code = 404

    def __init__(self, command_id: str) -> None:
        super().__init__(f"no command {command_id!r} was received", command_id=command_id)
