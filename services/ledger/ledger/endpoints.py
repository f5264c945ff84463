import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Header, Path, Query
from pydantic import BaseModel
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import Response

from ledger import schemas
from ledger.anchors import Anchors, read_anchors
from ledger.config import Settings
from ledger.domain import parse_duration
from ledger.errors import (
    AccountNotFound,
    CaptureExceedsHold,
    ClawbackExceedsEarn,
    CommandNotFound,
    HoldExpired,
    HoldNotActive,
    HoldNotFound,
    IdempotencyKeyReused,
    InsufficientPoints,
    InvalidAccount,
    OriginalEarnNotFound,
)
from ledger.service import ledger_service
from shared.auth import Principal, require
from shared.db import ReadSessionDep, SessionDep
from shared.errors import DocumentedRoute, UnprocessableEntity, raises
from shared.events import MAX_IDENTIFIER, NO_NUL, UtcDatetime

router = APIRouter(prefix="/v1", tags=["ledger"], route_class=DocumentedRoute)
T = TypeVar("T")

PointsRead = Annotated[Principal, Depends(require("points:read"))]
PointsWrite = Annotated[Principal, Depends(require("points:write"))]
Admin = Annotated[Principal, Depends(require("admin"))]
# Both end up in entries and their ledger.entry.posted events: the key as the entry's source
# ("request:" + key, which the source field and column have room for), the account id as the account.
IdempotencyKey = Annotated[
    str,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=MAX_IDENTIFIER,
        pattern=NO_NUL,
        description="Makes the write safe to retry: the same key and request return the stored response",
    ),
]
AccountId = Annotated[str, Path(min_length=1, max_length=MAX_IDENTIFIER, pattern=NO_NUL)]
# The reads take an account id with slashes (a system account's shard, `system:redemption/07`, or
# `system:redemption%2F07`, which arrives decoded): `{account_id:account}`. The balance route is declared
# after `/entries`, `/expiring` and `/verify`, so those suffixes name the routes, not an account.


class AccountPathConvertor(PathConvertor):
    """Starlette's `path` with a line break too (its `.*` stops there; the earn route's id may hold one)."""

    regex = r"[\s\S]*"


register_url_convertor("account", AccountPathConvertor())
Limit = Annotated[int, Query(ge=1, le=500)]
# Entry sequence numbers are 32-bit (their column): a larger cursor is a 422, not a database error.
MAX_SEQ = 2**31 - 1


async def _once(
    request: Request,
    session: SessionDep,
    principal: Principal,
    key: str,
    body: BaseModel | None,
    operation: Callable[..., Awaitable[BaseModel]],
    *args: Any,
) -> Response:
    """Runs `operation(session, tenant, *args)` once per Idempotency-Key, as the calling key."""
    # The fingerprint covers method, path and body: a key reused for anything else is refused (422).
    fingerprint = f"{request.method} {request.url.path} {body.model_dump_json() if body else ''}"
    status, content = await ledger_service.idempotent(
        session,
        tenant_id=principal.tenant_id,
        api_key_id=principal.key_id,
        key=key,
        fingerprint=fingerprint,
        status_code=201,
        operation=lambda pending: operation(
            session,
            principal.tenant_id,
            *args,
            source=f"request:{key}",
            actor_key_id=principal.key_id,
            pending=pending,
        ),
    )
    return Response(content, status_code=status, media_type="application/json")


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def _found(value: T | None, error: Exception) -> T:
    if value is None:
        raise error
    return value


# --- reads ----------------------------------------------------------------------------------------


@router.get("/accounts", response_model=schemas.Page[schemas.Balance])
async def list_accounts(
    principal: PointsRead,
    session: ReadSessionDep,
    kind: Annotated[str | None, Query(pattern="^(customer|system)$")] = None,
    cursor: Annotated[str | None, Query(max_length=MAX_IDENTIFIER, pattern=NO_NUL)] = None,
    limit: Limit = 100,
) -> schemas.Page[schemas.Balance]:
    """The programme's accounts with their balances, ordered by account id."""
    return await ledger_service.list_accounts(session, principal.tenant_id, kind=kind, cursor=cursor, limit=limit)


@router.get("/accounts/{account_id:account}/entries", response_model=schemas.Page[schemas.Entry])
@raises(AccountNotFound)
async def history(
    account_id: AccountId,
    principal: PointsRead,
    session: ReadSessionDep,
    kind: Annotated[list[str] | None, Query()] = None,
    since: UtcDatetime | None = None,
    until: UtcDatetime | None = None,
    cursor: Annotated[int | None, Query(ge=1, le=MAX_SEQ)] = None,
    limit: Limit = 50,
) -> schemas.Page[schemas.Entry]:
    """An account's entries, newest first; filter by kind (repeatable) and period [since, until)."""
    page = await ledger_service.history(
        session, principal.tenant_id, account_id, kinds=kind, since=since, until=until, cursor=cursor, limit=limit
    )
    return _found(page, AccountNotFound(account_id))


@router.get("/accounts/{account_id:account}/expiring", response_model=schemas.Expiring)
@raises(UnprocessableEntity, AccountNotFound)
async def expiring(
    account_id: AccountId,
    principal: PointsRead,
    session: ReadSessionDep,
    # Six digits at most: 999999d is ~2,700 years, which a date can still reach from now.
    within: Annotated[str, Query(pattern=r"^[0-9]{1,6}[dhm]$", description="A window such as 30d, 12h or 90m")] = "30d",
) -> schemas.Expiring:
    """Available points that expire within the window, per expiry date."""
    try:
        window = parse_duration(within)
    except ValueError as exc:
        raise UnprocessableEntity(f"within: {exc}") from exc
    result = await ledger_service.expiring(session, principal.tenant_id, account_id, within=window)
    return _found(result, AccountNotFound(account_id))


def _settings(request: Request) -> Settings:
    settings = request.state.runtime.settings
    assert isinstance(settings, Settings)
    return settings


async def _account_anchors(request: Request, account_id: AccountId, principal: PointsRead) -> Anchors:
    return await read_anchors(_settings(request), principal.tenant_id, account_id)


async def _tenant_anchors(request: Request, principal: Admin) -> Anchors:
    return await read_anchors(_settings(request), principal.tenant_id)


@router.get("/accounts/{account_id:account}/verify", response_model=schemas.Verification)
@raises(AccountNotFound)
async def verify(
    account_id: AccountId,
    principal: PointsRead,
    session: ReadSessionDep,
    anchors: Annotated[Anchors, Depends(_account_anchors)],
) -> schemas.Verification:
    """Recompute the account's hash chain and balances from its entries, check them against its lots, holds
    and last anchored chain head, and report every mismatch."""
    result = await ledger_service.verify(session, principal.tenant_id, account_id, anchors=anchors)
    return _found(result, AccountNotFound(account_id))


@router.get("/accounts/{account_id:account}", response_model=schemas.Balance)
@raises(AccountNotFound)
async def get_account(
    account_id: AccountId, principal: PointsRead, session: ReadSessionDep, as_of: UtcDatetime | None = None
) -> Response:
    """An account's balances; with `as_of`, as they were at that moment (recomputed from the entries)."""
    balance = await ledger_service.get_balance(session, principal.tenant_id, account_id, as_of=as_of)
    # The hottest read: serialised once by its model, not validated a second time as the response model.
    return _json(_found(balance, AccountNotFound(account_id)))


@router.get("/verify", response_model=schemas.TenantVerification)
async def verify_tenant(
    principal: Admin, session: ReadSessionDep, anchors: Annotated[Anchors, Depends(_tenant_anchors)]
) -> schemas.TenantVerification:
    """Verify every account of the programme and its books as a whole; lists the accounts with problems."""
    return await ledger_service.verify_tenant(session, principal.tenant_id, anchors=anchors)


@router.get("/holds/{hold_id}", response_model=schemas.Hold)
@raises(HoldNotFound)
async def get_hold(hold_id: uuid.UUID, principal: PointsRead, session: ReadSessionDep) -> schemas.Hold:
    """A hold and its status (active, captured, voided, expired)."""
    return _found(await ledger_service.get_hold(session, principal.tenant_id, hold_id), HoldNotFound(str(hold_id)))


@router.get("/commands/{command_id}", response_model=schemas.AppliedCommand)
@raises(CommandNotFound)
async def get_command(
    command_id: Annotated[str, Path(min_length=1, max_length=MAX_IDENTIFIER, pattern=NO_NUL)],
    principal: PointsRead,
    session: ReadSessionDep,
) -> schemas.AppliedCommand:
    """Whether a Kafka points command (by its command id) has been applied, and when."""
    command = await ledger_service.get_command(session, principal.tenant_id, command_id)
    return _found(command, CommandNotFound(command_id))


@router.get("/liability", response_model=schemas.Liability)
async def liability(principal: PointsRead, session: ReadSessionDep) -> schemas.Liability:
    """The programme's outstanding points: available, pending and held over all customer accounts."""
    return await ledger_service.liability(session, principal.tenant_id)


@router.get("/policy", response_model=schemas.Policy)
async def get_policy(principal: PointsRead, session: ReadSessionDep) -> schemas.Policy:
    """The programme's expiry rule, clawback policy and hold timeout."""
    return await ledger_service.get_policy(session, principal.tenant_id)


@router.get("/adjustments", response_model=schemas.Page[schemas.Entry])
async def list_adjustments(
    principal: Admin,
    session: ReadSessionDep,
    account_id: Annotated[str | None, Query(max_length=MAX_IDENTIFIER, pattern=NO_NUL)] = None,
    cursor: UtcDatetime | None = None,
    limit: Limit = 50,
) -> schemas.Page[schemas.Entry]:
    """The audit trail of manual adjustments (reason and acting key id), newest first."""
    return await ledger_service.adjustments(
        session, principal.tenant_id, account_id=account_id, cursor=cursor, limit=limit
    )


# --- partner writes (points:write) ----------------------------------------------------------------


@router.post("/accounts/{account_id}/redeem", response_model=schemas.Posted, status_code=201)
@raises(AccountNotFound, InsufficientPoints, IdempotencyKeyReused)
async def redeem(
    account_id: AccountId,
    body: schemas.RedeemCreate,
    request: Request,
    principal: PointsWrite,
    session: SessionDep,
    key: IdempotencyKey,
) -> Response:
    """Redeem available points, earliest-expiring first; 409 when they do not suffice."""
    return await _once(request, session, principal, key, body, ledger_service.redeem, account_id, body)


@router.post("/accounts/{account_id}/holds", response_model=schemas.HoldPosted, status_code=201)
@raises(AccountNotFound, InsufficientPoints, IdempotencyKeyReused)
async def reserve(
    account_id: AccountId,
    body: schemas.HoldCreate,
    request: Request,
    principal: PointsWrite,
    session: SessionDep,
    key: IdempotencyKey,
) -> Response:
    """Reserve points for a checkout; the hold is released automatically after its timeout."""
    return await _once(request, session, principal, key, body, ledger_service.reserve, account_id, body)


@router.post("/holds/{hold_id}/capture", response_model=schemas.HoldPosted, status_code=201)
@raises(HoldNotFound, HoldNotActive, HoldExpired, CaptureExceedsHold, IdempotencyKeyReused)
async def capture(
    hold_id: uuid.UUID,
    body: schemas.HoldCapture,
    request: Request,
    principal: PointsWrite,
    session: SessionDep,
    key: IdempotencyKey,
) -> Response:
    """Capture a hold in full or in part before it expires; what is not captured goes back to available."""
    return await _once(request, session, principal, key, body, ledger_service.capture, hold_id, body)


@router.post("/holds/{hold_id}/void", response_model=schemas.HoldPosted, status_code=201)
@raises(HoldNotFound, HoldNotActive, IdempotencyKeyReused)
async def void(
    hold_id: uuid.UUID, request: Request, principal: PointsWrite, session: SessionDep, key: IdempotencyKey
) -> Response:
    """Release a hold: its points go back to available (a hold past its timeout is released as expired)."""
    return await _once(request, session, principal, key, None, ledger_service.void, hold_id)


# --- back-office writes (admin) -------------------------------------------------------------------


@router.post("/accounts/{account_id}/earn", response_model=schemas.Posted, status_code=201)
@raises(InvalidAccount, IdempotencyKeyReused)
async def earn(
    account_id: AccountId,
    body: schemas.EarnCreate,
    request: Request,
    principal: Admin,
    session: SessionDep,
    key: IdempotencyKey,
) -> Response:
    """Credit points (pending until `matures_at` when given); rules normally earn through Kafka."""
    return await _once(request, session, principal, key, body, ledger_service.earn, account_id, body)


@router.post("/accounts/{account_id}/clawback", response_model=schemas.Posted, status_code=201)
@raises(AccountNotFound, OriginalEarnNotFound, ClawbackExceedsEarn, IdempotencyKeyReused)
async def clawback(
    account_id: AccountId,
    body: schemas.ClawbackCreate,
    request: Request,
    principal: Admin,
    session: SessionDep,
    key: IdempotencyKey,
) -> Response:
    """Take back points of an earlier earn, at most what it gave less earlier clawbacks: pending first, then
    available; spent points per the policy."""
    return await _once(request, session, principal, key, body, ledger_service.clawback, account_id, body)


@router.post("/accounts/{account_id}/transfers", response_model=schemas.Posted, status_code=201)
@raises(AccountNotFound, InvalidAccount, InsufficientPoints, IdempotencyKeyReused)
async def transfer(
    account_id: AccountId,
    body: schemas.TransferCreate,
    request: Request,
    principal: Admin,
    session: SessionDep,
    key: IdempotencyKey,
) -> Response:
    """Move available points to another account of the programme (they keep their expiry dates)."""
    return await _once(request, session, principal, key, body, ledger_service.transfer, account_id, body)


@router.post("/accounts/{account_id}/adjustments", response_model=schemas.Posted, status_code=201)
@raises(InvalidAccount, InsufficientPoints, IdempotencyKeyReused)
async def adjust(
    account_id: AccountId,
    body: schemas.AdjustmentCreate,
    request: Request,
    principal: Admin,
    session: SessionDep,
    key: IdempotencyKey,
) -> Response:
    """Correct a balance by hand; the reason and the acting key id are kept in the audit trail."""
    return await _once(request, session, principal, key, body, ledger_service.adjust, account_id, body)


@router.put("/policy", response_model=schemas.Policy)
async def set_policy(body: schemas.PolicyUpdate, principal: Admin, session: SessionDep) -> schemas.Policy:
    """Set the programme's expiry rule, clawback policy and hold timeout (applies to new entries)."""
    return await ledger_service.set_policy(session, principal.tenant_id, body)
