import pytest

from shared.auth import Principal, generate_key, hash_secret, parse_token, validate_scopes


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
