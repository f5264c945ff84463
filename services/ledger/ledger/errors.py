from shared.errors import ServiceError


class LedgerError(ServiceError):
    pass


class CommandNotFound(LedgerError):
    """No points command with this id was applied."""

    status_code = 404

    def __init__(self, command_id: str) -> None:
        super().__init__(f"no points command {command_id!r} was applied", command_id=command_id)


class AccountNotFound(LedgerError):
    """The programme has no such account."""

    status_code = 404

    def __init__(self, account_id: str) -> None:
        super().__init__(f"no account {account_id!r} in this programme", account_id=account_id)


class InvalidAccount(LedgerError):
    """The account cannot take part: a system account, or the transfer's own source."""

    status_code = 422

    def __init__(self, account_id: str, why: str) -> None:
        super().__init__(f"account {account_id!r} {why}", account_id=account_id)


class InsufficientPoints(LedgerError):
    """The account has fewer available points than requested."""

    status_code = 409

    def __init__(self, account_id: str, *, requested: int, available: int) -> None:
        super().__init__(
            f"account {account_id!r} has {available} available points, {requested} requested",
            account_id=account_id,
            requested=requested,
            available=available,
        )


class HoldNotFound(LedgerError):
    """The programme has no such hold."""

    status_code = 404

    def __init__(self, hold_id: str) -> None:
        super().__init__(f"no hold {hold_id!r}", hold_id=hold_id)


class HoldNotActive(LedgerError):
    """The hold was captured, voided or expired already."""

    status_code = 409

    def __init__(self, hold_id: str, status: str) -> None:
        super().__init__(f"hold {hold_id!r} is {status}, not active", hold_id=hold_id, hold_status=status)


class CaptureExceedsHold(LedgerError):
    """The capture asks for more points than the hold holds."""

    status_code = 409

    def __init__(self, hold_id: str, *, requested: int, held: int) -> None:
        super().__init__(
            f"cannot capture {requested} points from hold {hold_id!r} of {held}",
            hold_id=hold_id,
            requested=requested,
            held=held,
        )


class OriginalEarnNotFound(LedgerError):
    """The account has no such earn to claw back."""

    status_code = 404

    def __init__(self, command_id: str) -> None:
        super().__init__(f"no earn {command_id!r} to claw back", original_command_id=command_id)


class ClawbackExceedsEarn(LedgerError):
    """The clawback asks for more than the earn gave, minus what was already clawed back of it."""

    status_code = 409

    def __init__(self, command_id: str, *, requested: int, earned: int, left: int) -> None:
        super().__init__(
            f"cannot claw back {requested} points of earn {command_id!r}: it gave {earned}, "
            f"{earned - left} were clawed back already, {left} are left",
            original_command_id=command_id,
            requested=requested,
            earned=earned,
            left=left,
        )


class HoldExpired(LedgerError):
    """The hold's time ran out: it can no longer be captured."""

    status_code = 409

    def __init__(self, hold_id: str, expires_at: str) -> None:
        super().__init__(f"hold {hold_id!r} expired at {expires_at}", hold_id=hold_id, expires_at=expires_at)


class IdempotencyKeyReused(LedgerError):
    """The Idempotency-Key was used before, for a different request."""

    status_code = 422

    def __init__(self, key: str) -> None:
        super().__init__(f"Idempotency-Key {key!r} was already used with a different request", idempotency_key=key)


# --- rewards (docs/rewards.md) ---------------------------------------------------------------------


class RewardNotFound(LedgerError):
    """The programme's catalogue has no such reward."""

    status_code = 404

    def __init__(self, reward_id: str) -> None:
        super().__init__(f"no reward {reward_id!r} in this programme", reward_id=reward_id)


class RewardExists(LedgerError):
    """A reward with this id is already in the catalogue."""

    status_code = 409

    def __init__(self, reward_id: str) -> None:
        super().__init__(f"reward {reward_id!r} already exists", reward_id=reward_id)


class InvalidReward(LedgerError):
    """The reward's definition does not hold together (a tier the programme does not have, say)."""

    status_code = 422

    def __init__(self, message: str) -> None:
        super().__init__(message)


class NotEligible(LedgerError):
    """The customer (or the member asking) may not redeem this reward now; `reason` says why."""

    status_code = 409

    def __init__(self, reward_id: str, reason: str, detail: str) -> None:
        super().__init__(f"reward {reward_id!r}: {detail}", reward_id=reward_id, reason=reason)


class OutOfStock(LedgerError):
    """The reward has no stock left (or its coupon pool is empty)."""

    status_code = 409

    def __init__(self, reward_id: str) -> None:
        super().__init__(f"reward {reward_id!r} is out of stock", reward_id=reward_id)


class LimitReached(LedgerError):
    """The customer redeemed this reward as often as its limit allows in the current period."""

    status_code = 409

    def __init__(self, reward_id: str, *, limit: int, period: str) -> None:
        super().__init__(
            f"reward {reward_id!r} may be redeemed {limit} time(s) per {period}; the limit is reached",
            reward_id=reward_id,
            limit=limit,
            period=period,
        )


class RedemptionNotFound(LedgerError):
    """The programme has no such redemption order."""

    status_code = 404

    def __init__(self, order_id: str) -> None:
        super().__init__(f"no redemption order {order_id!r}", order_id=order_id)


class RedemptionStateConflict(LedgerError):
    """The redemption order's state does not allow this change (it was confirmed, cancelled or expired)."""

    status_code = 409

    def __init__(self, order_id: str, state: str, change: str) -> None:
        super().__init__(
            f"redemption order {order_id!r} is {state}; it cannot be {change}", order_id=order_id, state=state
        )


class CouponNotFound(LedgerError):
    """No such coupon code in this programme."""

    status_code = 404

    def __init__(self) -> None:
        # The code itself is not echoed: it is a bearer secret.
        super().__init__("unknown coupon code")


class CouponNotUsable(LedgerError):
    """The coupon was consumed already, or its order was cancelled or expired."""

    status_code = 409

    def __init__(self, status: str) -> None:
        super().__init__(f"the coupon is {status}", coupon_status=status)


class RefundCurrencyMismatch(LedgerError):
    """A refund's currency is not the currency of the discount redeemed on its order."""

    status_code = 422

    def __init__(self, refund_id: str, currency: str, expected: str | None) -> None:
        super().__init__(
            f"refund {refund_id!r} is in {currency}; the order's points discount is in {expected}", refund_id=refund_id
        )
