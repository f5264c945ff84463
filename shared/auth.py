"""API keys: bound to one tenant, carrying scopes, stored as a SHA-256 hash of a high-entropy secret.

A key reads `lk_<key id>_<secret>`: 16 lowercase hex digits, then up to 128 URL-safe characters. Only the
id and the hash are stored; the full key is shown once, when it is created. Every service keeps its own
`api_keys` table (no service reads another's tables); `loyalty keys create` writes the same key into each
service's database.

What an unauthenticated caller can cost is bounded: a malformed key is refused before any look-up, looked-up
keys (found or not) are cached in an LRU of bounded size, and each client (by IP address) has a budget of
failed authentications (a token bucket); once it is spent, its requests get 429 with `Retry-After` before
any look-up, until the bucket refills.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, Security
from fastapi.security import APIKeyHeader
from sqlalchemy import ARRAY, Column, DateTime, MetaData, String, Table, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request

from shared.errors import Forbidden, ServiceError, Unauthorized, raises

SCOPES = {
    "points:read": "read balances, history and holds",
    "points:write": "earn, redeem, hold, capture and void",
    "rules:admin": "create, validate and activate rulesets",
    "events:write": "ingest purchase and engagement events over REST",
    "metrics:read": "read KPIs and segments",
    "admin": "everything of the tenant, including adjustments and transfers",
}
KEY_PREFIX = "lk"
# What `generate_key` makes: 8 random bytes in hex, and token_urlsafe(32) (43 characters; 128 at most here).
_TOKEN = re.compile(rf"{KEY_PREFIX}_([0-9a-f]{{16}})_([A-Za-z0-9_-]{{1,128}})")


def api_keys_table(metadata: MetaData) -> Table:
    return Table(
        "api_keys",
        metadata,
        Column("key_id", String(32), primary_key=True),
        Column("tenant_id", String(63), nullable=False, index=True),
        Column("name", String(200), nullable=False),
        Column("secret_hash", String(64), nullable=False),
        Column("scopes", ARRAY(String(40)), nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        Column("revoked_at", DateTime(timezone=True), nullable=True),
    )


@dataclass(frozen=True)
class Principal:
    key_id: str
    tenant_id: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes


@dataclass(frozen=True)
class NewKey:
    key_id: str
    secret: str

    @property
    def token(self) -> str:
        return f"{KEY_PREFIX}_{self.key_id}_{self.secret}"


def generate_key() -> NewKey:
    return NewKey(key_id=secrets.token_hex(8), secret=secrets.token_urlsafe(32))


def hash_secret(secret: str) -> str:
    # A 256-bit random secret needs no slow KDF: brute force is out of reach either way.
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_token(token: str) -> tuple[str, str] | None:
    """The key id and secret of a well-formed key; None for anything else, which is never looked up."""
    match = _TOKEN.fullmatch(token)
    return None if match is None else (match[1], match[2])


def validate_scopes(scopes: list[str]) -> list[str]:
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scopes {unknown}; known: {sorted(SCOPES)}")
    if not scopes:
        raise ValueError("a key needs at least one scope")
    return sorted(set(scopes))


async def store_key(
    engine: AsyncEngine, table: Table, key: NewKey, *, tenant_id: str, name: str, scopes: list[str]
) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            insert(table).values(
                key_id=key.key_id,
                tenant_id=tenant_id,
                name=name,
                secret_hash=hash_secret(key.secret),
                scopes=validate_scopes(scopes),
            )
        )


async def revoke_key(engine: AsyncEngine, table: Table, key_id: str) -> bool:
    async with engine.begin() as conn:
        result = await conn.execute(
            update(table)
            .where(table.c.key_id == key_id, table.c.revoked_at.is_(None))
            .values(revoked_at=datetime.now(UTC))
        )
        return bool(result.rowcount)


class TooManyFailedAuthentications(ServiceError):
    """This client failed to authenticate too often; retry after `Retry-After` seconds."""

    status_code = 429

    def __init__(self, retry_after: float) -> None:
        seconds = max(1, math.ceil(retry_after))
        super().__init__(f"too many failed authentications from this client; retry in {seconds} s", retry_after=seconds)
        self.headers = {"Retry-After": str(seconds)}


K = TypeVar("K")
V = TypeVar("V")


class Lru(Generic[K, V]):
    """A mapping that keeps at most `size` items, dropping the least recently used."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class FailureBudget:
    """Failed authentications a client may make: `burst` at once, refilled at `per_minute`."""

    burst: int = 20
    per_minute: float = 10.0
    clients: int = 10_000  # clients tracked at once (least recently failed first out)


class FailureLimiter:
    """A token bucket of failed authentications per client; `monotonic` is the clock (tests pass theirs)."""

    def __init__(self, budget: FailureBudget, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.budget = budget
        self._clock = monotonic
        self._buckets: Lru[str, tuple[float, float]] = Lru(budget.clients)  # client -> (tokens, as of)

    def _tokens(self, client: str, now: float) -> float:
        bucket = self._buckets.get(client)
        if bucket is None:
            return float(self.budget.burst)
        tokens, since = bucket
        return min(float(self.budget.burst), tokens + (now - since) * self.budget.per_minute / 60)

    def check(self, client: str) -> None:
        """Raises `TooManyFailedAuthentications` while the client has no failure left to spend."""
        tokens = self._tokens(client, self._clock())
        if tokens < 1:
            raise TooManyFailedAuthentications((1 - tokens) * 60 / self.budget.per_minute)

    def failed(self, client: str) -> None:
        now = self._clock()
        self._buckets.put(client, (self._tokens(client, now) - 1, now))


class KeyStore:
    """Looks keys up by id with a short, bounded cache (an LRU of `cache_size` ids, found or not), so a
    hot endpoint does not pay a query per request and unknown ids cannot grow it without end."""

    def __init__(
        self,
        engine: AsyncEngine,
        table: Table,
        *,
        cache_seconds: float = 5.0,
        cache_size: int = 10_000,
        failures: FailureBudget = FailureBudget(),
    ) -> None:
        self._engine = engine
        self._table = table
        self._ttl = cache_seconds
        self._cache: Lru[str, tuple[float, tuple[str, str, frozenset[str]] | None]] = Lru(cache_size)
        self.limiter = FailureLimiter(failures)

    async def authenticate(self, token: str) -> Principal | None:
        parsed = parse_token(token)
        if parsed is None:
            return None
        key_id, secret = parsed
        now = time.monotonic()
        hit = self._cache.get(key_id)
        if hit is None or hit[0] < now:
            row = await self._load(key_id)
            self._cache.put(key_id, (now + self._ttl, row))
        else:
            row = hit[1]
        if row is None:
            return None
        tenant_id, secret_hash, scopes = row
        if not hmac.compare_digest(secret_hash, hash_secret(secret)):
            return None
        return Principal(key_id=key_id, tenant_id=tenant_id, scopes=scopes)

    async def _load(self, key_id: str) -> tuple[str, str, frozenset[str]] | None:
        t = self._table
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(t.c.tenant_id, t.c.secret_hash, t.c.scopes).where(
                        t.c.key_id == key_id, t.c.revoked_at.is_(None)
                    )
                )
            ).first()
        return None if row is None else (row.tenant_id, row.secret_hash, frozenset(row.scopes))


_api_key_header = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    description="An API key `lk_<id>_<secret>` (also accepted as `Authorization: Bearer`)",
)


@raises(Unauthorized, TooManyFailedAuthentications)
async def _principal(request: Request, header_key: Annotated[str | None, Security(_api_key_header)]) -> Principal:
    token = header_key
    if token is None:
        authorization = request.headers.get("authorization", "")
        if authorization.lower().startswith("bearer "):
            token = authorization[7:].strip()
    if not token:
        raise Unauthorized("an API key is required: send it in the X-API-Key header")
    store: KeyStore = request.state.key_store
    # Behind a proxy this is the proxy's address unless the server trusts its forwarded headers.
    client = request.client.host if request.client is not None else "unknown"
    store.limiter.check(client)
    if parse_token(token) is None:
        store.limiter.failed(client)
        raise Unauthorized(f"the API key is malformed: expected {KEY_PREFIX}_<16 hex digits>_<secret>")
    principal = await store.authenticate(token)
    if principal is None:
        store.limiter.failed(client)
        raise Unauthorized("the API key is unknown or revoked")
    return principal


def require(scope: str) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """A dependency that authenticates the caller and checks one scope (`admin` implies every scope)."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    @raises(Forbidden)
    async def dependency(principal: Annotated[Principal, Depends(_principal)]) -> Principal:
        if not principal.allows(scope):
            raise Forbidden(f"this API key lacks the scope {scope!r}", required_scope=scope)
        return principal

    return dependency
