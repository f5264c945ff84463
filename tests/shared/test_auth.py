from typing import Any, cast

import pytest

from shared.auth import (
    FailureBudget,
    FailureLimiter,
    KeyStore,
    Lru,
    Principal,
    TooManyFailedAuthentications,
    generate_key,
    hash_secret,
    parse_token,
    validate_scopes,
)


class TestTokens:
    def test_token_round_trip(self) -> None:
        key = generate_key()
        assert parse_token(key.token) == (key.key_id, key.secret)

    @pytest.mark.parametrize("token", ["", "lk", "lk__x", "xx_abc_def", "lk_abc_"])
    def test_malformed_tokens(self, token: str) -> None:
        assert parse_token(token) is None

    def test_hash_is_not_the_secret(self) -> None:
        key = generate_key()
        assert hash_secret(key.secret) != key.secret
        assert len(hash_secret(key.secret)) == 64


class TestScopes:
    def test_unknown_scope_is_refused(self) -> None:
        with pytest.raises(ValueError, match="unknown scopes"):
            validate_scopes(["points:read", "points:delete"])

    def test_no_scope_is_refused(self) -> None:
        with pytest.raises(ValueError, match="at least one"):
            validate_scopes([])

    def test_admin_implies_every_scope(self) -> None:
        assert Principal("k", "t", frozenset({"admin"})).allows("rules:admin")
        assert not Principal("k", "t", frozenset({"points:read"})).allows("points:write")


class TestMalformedKeys:
    @pytest.mark.parametrize(
        "token",
        [
            "lk_" + "a" * 5000 + "_secret",  # the finding: long fake key ids were looked up and cached
            "lk_0123456789abcdeg_secret",  # not hex
            "lk_0123456789ABCDEF_secret",  # upper case: generate_key writes lower case
            "lk_0123456789abcde_secret",  # 15 digits
            "lk_0123456789abcdef_" + "s" * 129,  # a secret longer than any generated one
            "lk_0123456789abcdef_sec ret",
            "lk_0123456789abcdef_secret\n",
        ],
    )
    def test_are_refused_by_their_shape(self, token: str) -> None:
        assert parse_token(token) is None

    def test_a_generated_key_has_the_shape(self) -> None:
        for _ in range(200):  # token_urlsafe may put "_" and "-" anywhere in the secret
            key = generate_key()
            assert parse_token(key.token) == (key.key_id, key.secret)


class CountingStore(KeyStore):
    """A key store whose look-up is a counter: every id is unknown (the cache's bound is what is tested)."""

    def __init__(self, cache_size: int) -> None:
        super().__init__(cast(Any, None), cast(Any, None), cache_seconds=60, cache_size=cache_size)
        self.lookups = 0

    async def _load(self, key_id: str) -> tuple[str, str, frozenset[str]] | None:
        self.lookups += 1
        return None


class TestKeyStore:
    async def test_the_cache_keeps_at_most_its_size_and_malformed_keys_cost_no_lookup(self) -> None:
        store = CountingStore(cache_size=100)
        for i in range(3000):
            assert await store.authenticate(f"lk_{i:016x}_secret") is None
            assert await store.authenticate(f"lk_{'f' * 200}{i}_secret") is None
        assert store.lookups == 3000
        assert len(store._cache) == 100
        # The most recent ids are still cached: asking again costs no look-up.
        assert await store.authenticate(f"lk_{2999:016x}_secret") is None
        assert store.lookups == 3000

    def test_an_lru_drops_the_least_recently_used(self) -> None:
        lru: Lru[str, int] = Lru(2)
        lru.put("a", 1)
        lru.put("b", 2)
        assert lru.get("a") == 1
        lru.put("c", 3)
        assert (lru.get("a"), lru.get("b"), lru.get("c"), len(lru)) == (1, None, 3, 2)


class TestFailureLimiter:
    def test_a_client_that_spent_its_failures_waits_for_the_bucket_to_refill(self) -> None:
        clock = [1000.0]
        limiter = FailureLimiter(FailureBudget(burst=3, per_minute=6), lambda: clock[0])  # a token per 10 s
        for _ in range(3):
            limiter.check("10.0.0.1")
            limiter.failed("10.0.0.1")
        with pytest.raises(TooManyFailedAuthentications) as refused:
            limiter.check("10.0.0.1")
        assert refused.value.headers == {"Retry-After": "10"}
        assert refused.value.status_code == 429
        limiter.check("10.0.0.2")  # another client is not held back
        clock[0] += 4
        with pytest.raises(TooManyFailedAuthentications) as still:
            limiter.check("10.0.0.1")
        assert still.value.headers == {"Retry-After": "6"}
        clock[0] += 6
        limiter.check("10.0.0.1")
        limiter.failed("10.0.0.1")
        with pytest.raises(TooManyFailedAuthentications):
            limiter.check("10.0.0.1")

    def test_it_tracks_a_bounded_number_of_clients(self) -> None:
        limiter = FailureLimiter(FailureBudget(burst=1, per_minute=1, clients=50), lambda: 0.0)
        for i in range(1000):
            limiter.failed(f"10.0.{i // 256}.{i % 256}")
        assert len(limiter._buckets) == 50
