"""The rewards use cases: catalogue, redemption orders on the ledger's holds, coupons, entitlements, the
tiers and refunds the ledger learns from Kafka. The service loads, the pure rules (ledger/rewards.py) and
the `Book` decide, the service saves; the points move only through the Book (hold, capture, void, return),
so the hash chains and balances stay what `verify` recomputes. Every order change writes a
`redemption.changed` event to the rewards outbox in the same transaction (docs/rewards.md)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from prometheus_client import Counter

from ledger import rewards_schemas as rs
from ledger.domain import Book, HoldState, Meta, check_customer_account
from ledger.errors import (
    AccountNotFound,
    CouponNotFound,
    InvalidReward,
    LedgerError,
    OutOfStock,
    RedemptionNotFound,
    RefundCurrencyMismatch,
    RewardExists,
    RewardNotFound,
)
from ledger.models import RedemptionOrder, processed_events
from ledger.rewards import (
    Order,
    RewardsConfig,
    check_redeemable,
    money_value,
    new_coupon_code,
    used_in_period,
)
from ledger.rewards import Reward as RewardTerms
from ledger.rewards import unavailable as unavailable_reasons
from ledger.rewards_repository import RewardsRepository, terms
from ledger.service import LedgerService, PendingResponse
from shared.consumer import Inbound, Rejection
from shared.db import AsyncReadSession, AsyncSession
from shared.errors import UnprocessableEntity
from shared.events import (
    CustomersPayload,
    PurchaseRefunded,
    PurchasesPayload,
    RedemptionChanged,
    TierChanged,
    make_event,
    utcnow,
)
from shared.outbox import Claimed, Unpublishable
from shared.tracking import claim_batch, release

TRACKING = "ledger"
EVENT_SOURCE = "loyalty/ledger"
REDEMPTIONS = Counter(
    "ledger_redemption_changes_total", "Redemption order changes, by reward kind and change", ["kind", "change"]
)


def _order(row: RedemptionOrder) -> Order:
    return Order(
        order_id=str(row.order_id),
        kind=row.kind,  # type: ignore[arg-type]
        points=row.points,
        state=row.state,  # type: ignore[arg-type]
        expires_at=row.expires_at,
        order_amount=row.order_amount,
        refunded_amount=row.refunded_amount,
        points_returned=row.points_returned,
    )


def _changed(row: RedemptionOrder, change: str, now: datetime) -> tuple[bytes, bytes]:
    """The `redemption.changed` event of an order's change, as an outbox row (key, value); the caller counts the
    change (`REDEMPTIONS`) once it is written, so that a refused one is not counted."""
    data = RedemptionChanged(
        order_id=str(row.order_id),
        customer_id=row.customer_id,
        member_id=row.member_id,
        reward_id=row.reward_id,
        reward_kind=row.kind,
        change=change,
        state=row.state,
        points=row.points,
        points_returned=row.points_returned,
        value=row.value,
        currency=row.currency,
        purchase_order_id=row.purchase_order_id,
        occurred_at=now,
    )
    event = make_event("redemption.changed", data, tenant_id=row.tenant_id, source=EVENT_SOURCE, time=now)
    return event.key, event.to_bytes()


def _reward_values(body: rs.RewardCreate | rs.RewardUpdate) -> dict[str, Any]:
    return body.model_dump(exclude={"reward_id", "kind", "coupon_source"})


class RewardsService(LedgerService):
    """The rewards on the ledger's booking machinery (its `_open`/`_save`/`_hold_book`, lock order included)."""

    # --- settings and catalogue (admin) -----------------------------------------------------------

    async def get_config(self, session: AsyncReadSession, tenant_id: str) -> rs.RewardsConfig:
        config = await RewardsRepository.from_session(session).config(tenant_id)
        return rs.RewardsConfig(tiers=list(config.tiers), point_value=config.point_value, currency=config.currency)

    async def set_config(
        self, session: AsyncSession, tenant_id: str, body: rs.RewardsConfig, *, now: datetime | None = None
    ) -> rs.RewardsConfig:
        config = RewardsConfig(tuple(body.tiers), body.point_value, body.currency)
        await RewardsRepository.from_session(session).set_config(tenant_id, config, now or utcnow())
        return body

    async def _check_terms(self, session: AsyncReadSession, tenant_id: str, kind: str, min_tier: str | None) -> None:
        config = await RewardsRepository.from_session(session).config(tenant_id)
        if min_tier is not None and config.rank(min_tier) is None:
            raise InvalidReward(f"min_tier {min_tier!r} is not one of the programme's tiers {list(config.tiers)}")
        if kind == "discount" and config.point_value is None:
            raise InvalidReward("a discount needs the programme's point value (PUT /v1/reward-settings)")

    async def create_reward(
        self, session: AsyncSession, tenant_id: str, body: rs.RewardCreate, *, now: datetime | None = None
    ) -> rs.Reward:
        await self._check_terms(session, tenant_id, body.kind, body.min_tier)
        now = now or utcnow()
        values = {
            **_reward_values(body),
            "reward_id": body.reward_id,
            "kind": body.kind,
            "coupon_source": body.coupon_source or ("generated" if body.kind == "coupon" else None),
            "status": "active",
            "created_at": now,
            "updated_at": now,
        }
        repo = RewardsRepository.from_session(session)
        if not await repo.create_reward(tenant_id, values):
            raise RewardExists(body.reward_id)
        return await self._reward(session, tenant_id, body.reward_id)

    async def _reward(self, session: AsyncReadSession, tenant_id: str, reward_id: str) -> rs.Reward:
        row = await RewardsRepository.from_session(session).get_reward(tenant_id, reward_id)
        if row is None:
            raise RewardNotFound(reward_id)
        return rs.Reward.model_validate(row)

    async def get_reward(self, session: AsyncReadSession, tenant_id: str, reward_id: str) -> rs.Reward:
        return await self._reward(session, tenant_id, reward_id)

    async def update_reward(
        self,
        session: AsyncSession,
        tenant_id: str,
        reward_id: str,
        body: rs.RewardUpdate,
        *,
        now: datetime | None = None,
    ) -> rs.Reward:
        repo = RewardsRepository.from_session(session)
        row = await repo.get_reward(tenant_id, reward_id, lock=True)
        if row is None:
            raise RewardNotFound(reward_id)
        await self._check_terms(session, tenant_id, row.kind, body.min_tier)
        if row.kind == "privilege" and body.duration_days is None:
            raise InvalidReward("a privilege needs duration_days")
        if row.kind != "privilege" and body.duration_days is not None:
            raise InvalidReward("duration_days is for privileges")
        if row.kind == "discount" and body.value is not None:
            raise InvalidReward("a discount's value is its points at the programme's point value")
        await repo.update_reward(tenant_id, reward_id, {**_reward_values(body), "updated_at": now or utcnow()})
        return await self._reward(session, tenant_id, reward_id)

    async def remove_reward(
        self, session: AsyncSession, tenant_id: str, reward_id: str, *, now: datetime | None = None
    ) -> rs.RewardRemoved:
        """Deletes a reward nothing refers to; a reward with orders or coupons is retired instead (it stays
        for their history and refunds, and can no longer be redeemed)."""
        repo = RewardsRepository.from_session(session)
        if await repo.get_reward(tenant_id, reward_id, lock=True) is None:
            raise RewardNotFound(reward_id)
        if await repo.reward_in_use(tenant_id, reward_id):
            await repo.update_reward(tenant_id, reward_id, {"status": "retired", "updated_at": now or utcnow()})
            return rs.RewardRemoved(reward_id=reward_id, outcome="retired")
        await repo.delete_reward(tenant_id, reward_id)
        return rs.RewardRemoved(reward_id=reward_id, outcome="deleted")

    async def list_rewards(
        self, session: AsyncReadSession, tenant_id: str, *, status: str | None, cursor: str | None, limit: int
    ) -> rs.RewardPage:
        rows = await RewardsRepository.from_session(session).list_rewards(
            tenant_id, active_only=status == "active", after=cursor, limit=limit + 1
        )
        items = [rs.Reward.model_validate(r) for r in rows[:limit] if status is None or r.status == status]
        return rs.RewardPage(items=items, next_cursor=rows[limit - 1].reward_id if len(rows) > limit else None)

    async def import_coupons(
        self, session: AsyncSession, tenant_id: str, reward_id: str, body: rs.CouponImport
    ) -> rs.CouponImported:
        repo = RewardsRepository.from_session(session)
        row = await repo.get_reward(tenant_id, reward_id)
        if row is None:
            raise RewardNotFound(reward_id)
        if row.coupon_source != "pool":
            raise InvalidReward(f"reward {reward_id!r} does not issue coupons from a pool")
        codes = list(dict.fromkeys(body.codes))
        imported = await repo.import_coupons(tenant_id, reward_id, codes)
        return rs.CouponImported(reward_id=reward_id, imported=imported, duplicates=len(body.codes) - imported)

    # --- what one customer can redeem -------------------------------------------------------------

    async def catalogue_for(
        self,
        session: AsyncReadSession,
        tenant_id: str,
        customer_id: str,
        *,
        member_id: str | None,
        cursor: str | None,
        limit: int,
        now: datetime | None = None,
    ) -> rs.CustomerCatalogue:
        now = now or utcnow()
        repo = RewardsRepository.from_session(session)
        found = await repo.catalogue(tenant_id, customer_id, after=cursor, limit=limit + 1)
        if found is None:
            raise AccountNotFound(customer_id)
        config, customer, rows = found
        items = []
        for row in rows[:limit]:
            reward = terms(row)
            reasons = unavailable_reasons(reward, config, customer, now=now, member_id=member_id)
            used = None
            if reward.limit_period is not None:
                used = used_in_period(customer.redeemed.get(reward.reward_id, []), reward.limit_period, now)
            items.append(
                rs.RewardOffer(
                    reward=rs.Reward.model_validate(row),
                    redeemable=not reasons,
                    used_in_period=used,
                    reasons=[rs.Unavailability(reason=r, detail=d) for r, d in reasons],
                )
            )
        return rs.CustomerCatalogue(
            customer_id=customer_id,
            member_id=member_id,
            available=customer.available,
            tier=customer.tier,
            items=items,
            next_cursor=rows[limit - 1]["reward_id"] if len(rows) > limit else None,
        )

    # --- customers' redeemers and entitlements ----------------------------------------------------

    async def set_redeemers(
        self,
        session: AsyncSession,
        tenant_id: str,
        customer_id: str,
        body: rs.RedeemersUpdate,
        *,
        now: datetime | None = None,
    ) -> rs.Redeemers:
        check_customer_account(customer_id)
        members = None if body.all_members else [m.model_dump() for m in body.members]
        await RewardsRepository.from_session(session).set_redeemers(tenant_id, customer_id, members, now or utcnow())
        return rs.Redeemers(customer_id=customer_id, all_members=body.all_members, members=body.members)

    async def get_redeemers(self, session: AsyncReadSession, tenant_id: str, customer_id: str) -> rs.Redeemers:
        found = await RewardsRepository.from_session(session).redeemers(tenant_id, customer_id)
        members = [rs.RedeemerIn(member_id=r.member_id, max_points=r.max_points) for r in found or ()]
        return rs.Redeemers(customer_id=customer_id, all_members=found is None, members=members)

    async def entitlements(
        self, session: AsyncReadSession, tenant_id: str, customer_id: str, *, at: datetime | None = None
    ) -> rs.Entitlements:
        at = at or utcnow()
        rows = await RewardsRepository.from_session(session).entitlements(tenant_id, customer_id, at)
        return rs.Entitlements(customer_id=customer_id, at=at, items=[rs.Entitlement.model_validate(r) for r in rows])

    # --- redemption orders ------------------------------------------------------------------------

    async def create_redemption(
        self,
        session: AsyncSession,
        tenant_id: str,
        body: rs.RedemptionCreate,
        *,
        source: str,
        actor_key_id: str | None = None,
        now: datetime | None = None,
        pending: PendingResponse | None = None,
    ) -> rs.Redemption:
        """Reserves the points (a hold) and a unit of stock in this one transaction."""
        customer_id = body.customer_id
        check_customer_account(customer_id)
        repo = RewardsRepository.from_session(session)
        # The account's lock makes the balance and the customer's limits exact. A unit of stock is taken by
        # the transaction's last statement (a conditional decrement of a share no other transaction holds):
        # the share is locked only from there to the commit, and concurrent redemptions take other shares.
        # The reward, the customer's context and the policy's hold timeout come in one statement.
        book = await self._open(session, tenant_id, [customer_id], now=now, lots_of=[customer_id], policy=False)
        context = await repo.redemption_context(tenant_id, customer_id, body.reward_id)
        assert context is not None, "the account is locked"
        row, config, unlocked = context
        if row is None:
            raise RewardNotFound(body.reward_id)
        reward = terms(row)
        if reward.kind == "discount" and (body.purchase_order_id is None or body.order_amount is None):
            raise UnprocessableEntity("a discount redemption names its purchase_order_id and order_amount")
        # The balance that counts is the locked account's, not the context's (read without the lock).
        customer = replace(unlocked, available=book.account(customer_id).available)
        check_redeemable(
            reward,
            config,
            customer,
            now=book.now,
            member_id=body.member_id,
            stock_left=row["stock"],
            account_id=customer_id,
        )
        order_id = uuid.uuid4()
        code = await self._issue_coupon(session, tenant_id, reward, order_id) if reward.kind == "coupon" else None
        hold, _ = self._hold(
            book,
            customer_id,
            reward.points,
            member_id=body.member_id,
            reference=f"redemption:{order_id}",
            timeout_s=reward.reserve_seconds or config.hold_timeout_seconds,
            source=source,
            actor_key_id=actor_key_id,
        )
        value, currency = money_value(reward, config)
        order = RedemptionOrder(
            tenant_id=tenant_id,
            order_id=order_id,
            reward_id=reward.reward_id,
            kind=reward.kind,
            customer_id=customer_id,
            member_id=body.member_id,
            points=reward.points,
            hold_id=hold.hold_id,
            state="reserved",
            value=value,
            currency=currency,
            purchase_order_id=body.purchase_order_id,
            order_amount=body.order_amount,
            refunded_amount=Decimal(0),
            points_returned=0,
            coupon_code=code,
            created_at=book.now,
            expires_at=hold.expires_at,
            updated_at=book.now,
        )
        response = rs.Redemption.model_validate(order)

        def respond() -> tuple[str, str, int, str]:
            assert pending is not None
            return pending.api_key_id, pending.key, pending.status_code, response.model_dump_json()

        # The response is stored with the hold's entries (one statement), the order with its event after.
        if await self._save(session, book, respond if pending is not None else None):
            assert pending is not None
            pending.stored = response
        values = {c.name: getattr(order, c.name) for c in RedemptionOrder.__table__.columns}
        if not await repo.place_order(values, _changed(order, "reserved", book.now), take=row["stock"] is not None):
            raise OutOfStock(reward.reward_id)  # taken meanwhile: everything above rolls back
        REDEMPTIONS.labels(order.kind, "reserved").inc()
        return response

    async def _issue_coupon(
        self, session: AsyncSession, tenant_id: str, reward: RewardTerms, order_id: uuid.UUID
    ) -> str:
        repo = RewardsRepository.from_session(session)
        if reward.coupon_source == "pool":
            code = await repo.take_pooled_coupon(tenant_id, reward.reward_id, order_id)
            if code is None:
                raise OutOfStock(reward.reward_id)
            return code
        while True:  # 80 random bits: a collision is astronomically rare, but one would be a second owner
            code = new_coupon_code()
            if await repo.insert_coupon(tenant_id, code, reward.reward_id, order_id):
                return code

    async def get_redemption(self, session: AsyncReadSession, tenant_id: str, order_id: uuid.UUID) -> rs.Redemption:
        row = await RewardsRepository.from_session(session).get_order(tenant_id, order_id)
        if row is None:
            raise RedemptionNotFound(str(order_id))
        return rs.Redemption.model_validate(row)

    async def _locked_order(
        self, session: AsyncSession, tenant_id: str, order_id: uuid.UUID, *, now: datetime | None
    ) -> tuple[Book, HoldState, RedemptionOrder]:
        """Locks the order's account and hold (the ledger's `_hold_book`), then the order row itself."""
        repo = RewardsRepository.from_session(session)
        found = await repo.get_order(tenant_id, order_id)
        if found is None:
            raise RedemptionNotFound(str(order_id))
        book, hold = await self._hold_book(session, tenant_id, found.hold_id, now=now)
        row = await repo.get_order(tenant_id, order_id, lock=True)
        assert row is not None, "orders are never deleted"
        return book, hold, row

    async def _settle(
        self, session: AsyncSession, book: Book, row: RedemptionOrder, order: Order, change: str
    ) -> rs.Redemption:
        """Saves the book and the order's new state, with its event."""
        await self._save(session, book)
        row.state, row.refunded_amount, row.points_returned = order.state, order.refunded_amount, order.points_returned
        row.updated_at = book.now
        repo = RewardsRepository.from_session(session)
        await repo.flush()
        await repo.add_outbox([_changed(row, change, book.now)])
        REDEMPTIONS.labels(row.kind, change).inc()
        return rs.Redemption.model_validate(row)

    async def _capture(
        self,
        session: AsyncSession,
        book: Book,
        hold: HoldState,
        row: RedemptionOrder,
        *,
        source: str,
        actor_key_id: str | None,
    ) -> None:
        """Captures the order's hold; a privilege becomes an entitlement from now for its duration."""
        meta = Meta(
            kind="capture",
            source=source,
            member_id=row.member_id,
            reference_id=hold.reference,
            actor_key_id=actor_key_id,
            hold_id=hold.hold_id,
        )
        book.capture(hold, hold.points, meta)
        if row.kind == "privilege":
            reward = await RewardsRepository.from_session(session).get_reward(row.tenant_id, row.reward_id)
            assert reward is not None
            assert reward.duration_days is not None, "privileges keep their duration"
            await RewardsRepository.from_session(session).insert_entitlement(
                row.tenant_id,
                {
                    "order_id": row.order_id,
                    "customer_id": row.customer_id,
                    "reward_id": row.reward_id,
                    "name": reward.name,
                    "starts_at": book.now,
                    "ends_at": book.now + timedelta(days=reward.duration_days),
                },
            )

    async def confirm_redemption(
        self,
        session: AsyncSession,
        tenant_id: str,
        order_id: uuid.UUID,
        *,
        source: str,
        actor_key_id: str | None = None,
        now: datetime | None = None,
        pending: PendingResponse | None = None,
    ) -> rs.Redemption:
        """Fulfilment confirms the order: its hold is captured (a privilege becomes an entitlement)."""
        book, hold, row = await self._locked_order(session, tenant_id, order_id, now=now)
        order = _order(row)
        order.confirm(book.now)
        await self._capture(session, book, hold, row, source=source, actor_key_id=actor_key_id)
        return await self._settle(session, book, row, order, "confirmed")

    async def cancel_redemption(
        self,
        session: AsyncSession,
        tenant_id: str,
        order_id: uuid.UUID,
        *,
        source: str,
        actor_key_id: str | None = None,
        now: datetime | None = None,
        pending: PendingResponse | None = None,
    ) -> rs.Redemption:
        """Cancels a reserved order: the hold is voided, the stock given back, a coupon voided."""
        book, hold, row = await self._locked_order(session, tenant_id, order_id, now=now)
        order = _order(row)
        order.cancel()
        book.release(
            hold, Meta(kind="void", source=source, actor_key_id=actor_key_id, hold_id=hold.hold_id), status="voided"
        )
        cancelled = await self._settle(session, book, row, order, "cancelled")
        await self._give_back(session, row)
        return cancelled

    async def _give_back(self, session: AsyncSession, row: RedemptionOrder) -> None:
        """Voids the order's coupon and gives its unit of stock back: the reward row last, as every rewards
        writer does, so it stays locked only until the commit."""
        repo = RewardsRepository.from_session(session)
        if row.coupon_code is not None:
            # A code once shown to a customer is never issued again.
            await repo.update_coupon(row.tenant_id, row.coupon_code, {"status": "void"})
        await repo.return_unit(row.tenant_id, row.reward_id, row.order_id)

    async def due_orders(
        self, session: AsyncReadSession, *, now: datetime, limit: int = 1000
    ) -> list[tuple[str, uuid.UUID]]:
        return await RewardsRepository.from_session(session).due_orders(now, limit)

    async def expire(self, session: AsyncSession, tenant_id: str, order_id: uuid.UUID, *, now: datetime) -> bool:
        """Expires a reserved order past its time: its hold is released (unless the ledger's own hold task
        released it already), the stock given back. False when it was confirmed or cancelled meanwhile."""
        book, hold, row = await self._locked_order(session, tenant_id, order_id, now=now)
        if row.state != "reserved":
            return False
        order = _order(row)
        order.expire(now)
        if hold.status == "active":
            meta = Meta(kind="hold_expired", source="task:redemptions", hold_id=hold.hold_id)
            book.release(hold, meta, status="expired")
        await self._settle(session, book, row, order, "expired")
        await self._give_back(session, row)
        return True

    # --- coupons at the checkout ------------------------------------------------------------------

    async def _coupon_view(self, session: AsyncReadSession, tenant_id: str, code: str) -> rs.Coupon:
        repo = RewardsRepository.from_session(session)
        coupon = await repo.get_coupon(tenant_id, code)
        if coupon is None or coupon.status == "pooled" or coupon.order_id is None:
            raise CouponNotFound()
        order = await repo.get_order(tenant_id, coupon.order_id)
        assert order is not None, "issued coupons belong to an order"
        now = utcnow()
        valid = coupon.status == "issued" and (
            order.state == "confirmed" or (order.state == "reserved" and now < order.expires_at)
        )
        return rs.Coupon(
            code=coupon.code,
            status=coupon.status,
            reward_id=coupon.reward_id,
            order_id=coupon.order_id,
            customer_id=order.customer_id,
            value=order.value,
            currency=order.currency,
            consumed_by=coupon.consumed_by,
            consumed_at=coupon.consumed_at,
            valid=valid,
        )

    async def validate_coupon(self, session: AsyncReadSession, tenant_id: str, code: str) -> rs.Coupon:
        return await self._coupon_view(session, tenant_id, code)

    async def consume_coupon(
        self,
        session: AsyncSession,
        tenant_id: str,
        body: rs.CouponConsume,
        *,
        source: str,
        actor_key_id: str | None = None,
        now: datetime | None = None,
        pending: PendingResponse | None = None,
    ) -> rs.Coupon:
        """Consumes a coupon on a webshop order, once: a reserved order is confirmed (captured) by it."""
        code = body.code
        repo = RewardsRepository.from_session(session)
        coupon = await repo.get_coupon(tenant_id, code)
        if coupon is None or coupon.status == "pooled" or coupon.order_id is None:
            raise CouponNotFound()
        book, hold, row = await self._locked_order(session, tenant_id, coupon.order_id, now=now)
        coupon = await repo.get_coupon(tenant_id, code, lock=True)  # after the order: the lock order
        assert coupon is not None
        order = _order(row)
        if order.consume_coupon(coupon.status, book.now):  # type: ignore[arg-type]
            await self._capture(session, book, hold, row, source=source, actor_key_id=actor_key_id)
        await repo.update_coupon(
            tenant_id, code, {"status": "consumed", "consumed_by": body.purchase_order_id, "consumed_at": book.now}
        )
        await self._settle(session, book, row, order, "coupon_consumed")
        return await self._coupon_view(session, tenant_id, code)

    # --- Kafka: tiers and refunds -----------------------------------------------------------------

    async def handle_customer_events(
        self, session: AsyncSession, batch: Sequence[Inbound[CustomersPayload]]
    ) -> list[Rejection]:
        """Records each customer's tier from `tier.changed`, once per event, the newest by event time."""
        admitted = await claim_batch(
            session, processed_events, TRACKING, batch, tracked=lambda e: e.type == "tier.changed"
        )
        rows = [
            (m.event.tenantid, m.event.data.customer_id, m.event.data.tier, m.event.time, m.event.id)
            for m in admitted.messages
            if isinstance(m.event.data, TierChanged)
        ]
        latest: dict[tuple[str, str], tuple[str, str, str, datetime, str]] = {}
        for r in rows:  # one row per customer and statement: the newest of the batch
            key = (r[0], r[1])
            if key not in latest or (r[3], r[4]) > (latest[key][3], latest[key][4]):
                latest[key] = r
        await RewardsRepository.from_session(session).save_tiers(sorted(latest.values()))
        await release(session, processed_events, admitted.release_keys(()))
        return admitted.rejections

    async def handle_purchase_events(
        self, session: AsyncSession, batch: Sequence[Inbound[PurchasesPayload]], *, now: datetime | None = None
    ) -> list[Rejection]:
        """Gives back the points of discount redemptions whose webshop order was refunded, once per refund
        (its `refund_id`), in proportion to the refunded share of the order."""
        admitted = await claim_batch(
            session,
            processed_events,
            TRACKING,
            batch,
            tracked=lambda e: e.type == "purchase.refunded",
            business_id=lambda e: ("refund_id", e.data.refund_id),
        )
        rejections = list(admitted.rejections)
        refused: list[Rejection] = []
        for message in admitted.messages:
            data = message.event.data
            if not isinstance(data, PurchaseRefunded):
                continue
            try:
                await self._refund(session, message.event.tenantid, data, message.event.id, now=now)
            except LedgerError as exc:
                refused.append(Rejection(message, f"{type(exc).__name__}: {exc.message}"))
        await release(session, processed_events, admitted.release_keys(refused))
        return rejections + refused

    async def _refund(
        self, session: AsyncSession, tenant_id: str, data: PurchaseRefunded, event_id: str, *, now: datetime | None
    ) -> None:
        amount = data.amount if data.amount is not None else sum((line.amount for line in data.lines), Decimal(0))
        repo = RewardsRepository.from_session(session)
        discounts = await repo.discounts_for_purchase(tenant_id, data.customer_id, data.original_order_id)
        # Every order is checked before any is changed: a refused event must have changed nothing.
        for _, currency in discounts:
            if currency != data.currency:
                raise RefundCurrencyMismatch(data.refund_id, data.currency, currency)
        for order_id, _ in discounts:
            book, hold, row = await self._locked_order(session, tenant_id, order_id, now=now)
            if row.state != "confirmed":
                continue  # only captured discounts paid for the order; a reservation gives back on its own
            order = _order(row)
            back = order.refund(amount)
            if back:
                meta = Meta(
                    kind="redeem_return",
                    source=f"refund:{data.refund_id}",
                    event_id=event_id,
                    member_id=row.member_id,
                    reference_id=data.original_order_id,
                    hold_id=hold.hold_id,
                )
                book.return_captured(hold, back, meta, lot_prefix=f"return:{uuid.uuid4()}")
            await self._settle(session, book, row, order, "refunded")


class RewardsOutbox:
    """The rewards outbox as the shared relay reads it: rows hold their `redemption.changed` records."""

    def __init__(self, topic: str) -> None:
        self.topic = topic

    async def claim(self, session: AsyncSession, limit: int) -> Claimed:
        rows = await RewardsRepository.from_session(session).claim_outbox(limit)
        return Claimed(ids=[r.id for r in rows], messages=[(self.topic, r.key, r.value) for r in rows])

    async def delete(self, session: AsyncSession, ids: Sequence[int]) -> None:
        await RewardsRepository.from_session(session).delete_outbox(ids)

    async def quarantine(self, session: AsyncSession, rows: Sequence[Unpublishable]) -> None:
        await RewardsRepository.from_session(session).quarantine_outbox(rows)

    async def oldest(self, session: AsyncReadSession) -> datetime | None:
        return await RewardsRepository.from_session(session).oldest_outbox_row()


rewards_service = RewardsService()
