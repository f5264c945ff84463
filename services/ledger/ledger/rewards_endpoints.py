"""The rewards' REST routes: catalogue (admin), what one customer can redeem, redemption orders, coupons at
the checkout, members who may redeem, entitlements (docs/rewards.md). Writes that move points take an
`Idempotency-Key`, through the ledger's one mechanism (`_once`)."""

import uuid
from typing import Annotated

from fastapi import APIRouter, Path, Query
from starlette.requests import Request
from starlette.responses import Response

from ledger import rewards_schemas as rs
from ledger.endpoints import AccountId, Admin, IdempotencyKey, Limit, PointsRead, PointsWrite, _once
from ledger.errors import (
    AccountNotFound,
    CouponNotFound,
    CouponNotUsable,
    HoldNotActive,
    IdempotencyKeyReused,
    InsufficientPoints,
    InvalidAccount,
    InvalidReward,
    LimitReached,
    NotEligible,
    OutOfStock,
    RedemptionNotFound,
    RedemptionStateConflict,
    RewardExists,
    RewardNotFound,
)
from ledger.rewards_service import rewards_service
from shared.db import ReadSessionDep, SessionDep
from shared.errors import DocumentedRoute, UnprocessableEntity, raises
from shared.events import MAX_IDENTIFIER, NO_NUL, UtcDatetime

router = APIRouter(prefix="/v1", tags=["rewards"], route_class=DocumentedRoute)

RewardId = Annotated[str, Path(min_length=1, max_length=MAX_IDENTIFIER, pattern=NO_NUL)]
MemberQuery = Annotated[str | None, Query(min_length=1, max_length=MAX_IDENTIFIER, pattern=NO_NUL)]
Cursor = Annotated[str | None, Query(max_length=MAX_IDENTIFIER, pattern=NO_NUL)]


# --- settings and catalogue -----------------------------------------------------------------------


@router.get("/reward-settings", response_model=rs.RewardsConfig)
async def get_reward_settings(principal: PointsRead, session: ReadSessionDep) -> rs.RewardsConfig:
    """The programme's tiers (lowest first) and the money value of a point."""
    return await rewards_service.get_config(session, principal.tenant_id)


@router.put("/reward-settings", response_model=rs.RewardsConfig)
async def set_reward_settings(body: rs.RewardsConfig, principal: Admin, session: SessionDep) -> rs.RewardsConfig:
    """Set the programme's tiers (lowest first, what `min_tier` compares against) and a point's money value."""
    return await rewards_service.set_config(session, principal.tenant_id, body)


@router.get("/rewards", response_model=rs.RewardPage)
async def list_rewards(
    principal: PointsRead,
    session: ReadSessionDep,
    status: Annotated[str | None, Query(pattern="^(active|retired)$")] = None,
    cursor: Cursor = None,
    limit: Limit = 100,
) -> rs.RewardPage:
    """The catalogue, ordered by reward id."""
    return await rewards_service.list_rewards(session, principal.tenant_id, status=status, cursor=cursor, limit=limit)


@router.post("/rewards", response_model=rs.Reward, status_code=201)
@raises(RewardExists, InvalidReward)
async def create_reward(body: rs.RewardCreate, principal: Admin, session: SessionDep) -> rs.Reward:
    """Add a reward to the catalogue."""
    return await rewards_service.create_reward(session, principal.tenant_id, body)


@router.get("/rewards/{reward_id}", response_model=rs.Reward)
@raises(RewardNotFound)
async def get_reward(reward_id: RewardId, principal: PointsRead, session: ReadSessionDep) -> rs.Reward:
    """One reward of the catalogue."""
    return await rewards_service.get_reward(session, principal.tenant_id, reward_id)


@router.put("/rewards/{reward_id}", response_model=rs.Reward)
@raises(RewardNotFound, InvalidReward)
async def update_reward(reward_id: RewardId, body: rs.RewardUpdate, principal: Admin, session: SessionDep) -> rs.Reward:
    """Replace a reward's terms (its id, kind and coupon source stay); `stock` sets what is left."""
    return await rewards_service.update_reward(session, principal.tenant_id, reward_id, body)


@router.delete("/rewards/{reward_id}", response_model=rs.RewardRemoved)
@raises(RewardNotFound)
async def remove_reward(reward_id: RewardId, principal: Admin, session: SessionDep) -> rs.RewardRemoved:
    """Delete a reward; one that orders or coupons refer to is retired instead (no longer redeemable)."""
    return await rewards_service.remove_reward(session, principal.tenant_id, reward_id)


@router.post("/rewards/{reward_id}/coupons", response_model=rs.CouponImported, status_code=201)
@raises(RewardNotFound, InvalidReward)
async def import_coupons(
    reward_id: RewardId, body: rs.CouponImport, principal: Admin, session: SessionDep
) -> rs.CouponImported:
    """Import coupon codes into a pooled coupon reward's pool (codes the programme has already are skipped)."""
    return await rewards_service.import_coupons(session, principal.tenant_id, reward_id, body)


# --- customers ------------------------------------------------------------------------------------


@router.get("/customers/{customer_id}/rewards", response_model=rs.CustomerCatalogue)
@raises(AccountNotFound)
async def customer_catalogue(
    customer_id: AccountId,
    principal: PointsRead,
    session: ReadSessionDep,
    member_id: MemberQuery = None,
    cursor: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=rs.MAX_REWARDS_LISTED)] = 100,
) -> Response:
    """What the customer (and the member asking) can redeem now, and why each other reward is unavailable."""
    result = await rewards_service.catalogue_for(
        session, principal.tenant_id, customer_id, member_id=member_id, cursor=cursor, limit=limit
    )
    # A hot read: serialised once by its model, not validated again as the response model.
    return Response(result.model_dump_json(), media_type="application/json")


@router.get("/customers/{customer_id}/entitlements", response_model=rs.Entitlements)
async def entitlements(
    customer_id: AccountId, principal: PointsRead, session: ReadSessionDep, at: UtcDatetime | None = None
) -> rs.Entitlements:
    """The privileges the customer holds at `at` (default now), e.g. priority delivery, with their ends."""
    return await rewards_service.entitlements(session, principal.tenant_id, customer_id, at=at)


@router.get("/customers/{customer_id}/redeemers", response_model=rs.Redeemers)
async def get_redeemers(customer_id: AccountId, principal: PointsRead, session: ReadSessionDep) -> rs.Redeemers:
    """Which members (buyers) may redeem for the customer: all, or the ones listed."""
    return await rewards_service.get_redeemers(session, principal.tenant_id, customer_id)


@router.put("/customers/{customer_id}/redeemers", response_model=rs.Redeemers)
@raises(InvalidAccount)
async def set_redeemers(
    customer_id: AccountId, body: rs.RedeemersUpdate, principal: Admin, session: SessionDep
) -> rs.Redeemers:
    """Let all members redeem for the customer, or only those listed (each with an optional maximum)."""
    return await rewards_service.set_redeemers(session, principal.tenant_id, customer_id, body)


# --- redemption orders ----------------------------------------------------------------------------


@router.post("/redemptions", response_model=rs.Redemption, status_code=201)
@raises(
    AccountNotFound,
    InvalidAccount,
    RewardNotFound,
    NotEligible,
    LimitReached,
    OutOfStock,
    InsufficientPoints,
    UnprocessableEntity,
    IdempotencyKeyReused,
)
async def create_redemption(
    body: rs.RedemptionCreate, request: Request, principal: PointsWrite, session: SessionDep, key: IdempotencyKey
) -> Response:
    """Redeem a reward: reserves the points (a hold) and a unit of stock; confirm or cancel it later."""
    return await _once(request, session, principal, key, body, rewards_service.create_redemption, body)


@router.get("/redemptions/{order_id}", response_model=rs.Redemption)
@raises(RedemptionNotFound)
async def get_redemption(order_id: uuid.UUID, principal: PointsRead, session: ReadSessionDep) -> rs.Redemption:
    """A redemption order and its state."""
    return await rewards_service.get_redemption(session, principal.tenant_id, order_id)


@router.post("/redemptions/{order_id}/confirm", response_model=rs.Redemption, status_code=201)
@raises(RedemptionNotFound, RedemptionStateConflict, HoldNotActive, IdempotencyKeyReused)
async def confirm_redemption(
    order_id: uuid.UUID, request: Request, principal: PointsWrite, session: SessionDep, key: IdempotencyKey
) -> Response:
    """Fulfilment confirms the order: the points are captured; a privilege becomes an entitlement."""
    return await _once(request, session, principal, key, None, rewards_service.confirm_redemption, order_id)


@router.post("/redemptions/{order_id}/cancel", response_model=rs.Redemption, status_code=201)
@raises(RedemptionNotFound, RedemptionStateConflict, HoldNotActive, IdempotencyKeyReused)
async def cancel_redemption(
    order_id: uuid.UUID, request: Request, principal: PointsWrite, session: SessionDep, key: IdempotencyKey
) -> Response:
    """Cancel a reserved order: the points and the stock come back, a coupon is voided."""
    return await _once(request, session, principal, key, None, rewards_service.cancel_redemption, order_id)


# --- coupons at the checkout ----------------------------------------------------------------------


# The code travels in the body, never the path: it is a bearer secret, and paths end up in access logs.
@router.post("/coupons/validate", response_model=rs.Coupon)
@raises(CouponNotFound)
async def validate_coupon(body: rs.CouponCheck, principal: PointsRead, session: ReadSessionDep) -> rs.Coupon:
    """Whether a coupon code is valid now, what it is worth and for which customer."""
    return await rewards_service.validate_coupon(session, principal.tenant_id, body.code)


@router.post("/coupons/consume", response_model=rs.Coupon, status_code=201)
@raises(CouponNotFound, CouponNotUsable, RedemptionStateConflict, HoldNotActive, IdempotencyKeyReused)
async def consume_coupon(
    body: rs.CouponConsume, request: Request, principal: PointsWrite, session: SessionDep, key: IdempotencyKey
) -> Response:
    """Consume a coupon on a webshop order, once; a second consumption is refused (409)."""
    return await _once(request, session, principal, key, body, rewards_service.consume_coupon, body)
