"""Bearer tokens of the personalization service: signing, verification, claims, scopes, revocation
(in memory), parsing edge cases, the dev secret."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from schemas.errors import ConfigError
from services.personalization.auth import (
    ADMIN_TTL_S,
    DEFAULT_TTL_S,
    MAX_TTL_S,
    Authenticator,
    Principal,
    RevocationCache,
    TokenSigner,
    _Revoked,
    load_secret,
    secret_path,
)
from services.personalization.commands import parse_ttl
from services.personalization.errors import Forbidden, Unauthorized
from services.settings import PFISettings, ServeSettings

SECRET = b"s" * 32
FED = "fed-a"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(payload: Any, secret: bytes = SECRET, raw: bytes | None = None) -> str:
    """A token with any payload, correctly signed (what a leaked secret or a bug could produce)."""
    body = _b64(raw if raw is not None else json.dumps(payload).encode())
    message = f"pfi2.{body}"
    return f"{message}.{_b64(hmac.new(secret, message.encode(), hashlib.sha256).digest())}"


def claims(**change: Any) -> dict[str, Any]:
    base = {"sub": "alice", "rol": "user", "fed": FED, "iat": 1_000_000, "exp": 1_003_600, "jti": "ab" * 16}
    base.update(change)
    return {k: v for k, v in base.items() if v is not None}


def test_issue_and_verify_round_trip() -> None:
    signer = TokenSigner(SECRET)
    issued = signer.mint("alice", federation=FED, ttl_s=60, now=1_000_000)
    who = signer.verify(issued.token, now=1_000_030)
    assert who == Principal(
        user="alice", role="user", federation=FED, expires_at=1_000_060, issued_at=1_000_000, jti=issued.jti
    )
    admin = signer.verify(signer.issue("ops", role="admin", federation=FED, now=1_000_000), now=1_000_001)
    assert admin.admin
    assert admin.federation == FED
    device = signer.verify(signer.issue("dev-1", role="device", federation=FED, now=1_000_000), now=1_000_001)
    assert device.device
    assert not device.admin
    assert signer.mint("a", federation=FED).jti != signer.mint("a", federation=FED).jti


def test_default_and_maximum_lifetimes() -> None:
    signer = TokenSigner(SECRET)
    assert signer.mint("a", federation=FED, now=0).expires_at == DEFAULT_TTL_S == 3600
    assert signer.mint("a", federation=FED, role="device", now=0).expires_at == DEFAULT_TTL_S
    assert signer.mint("a", federation=FED, role="admin", now=0).expires_at == ADMIN_TTL_S == 900
    assert signer.mint("a", federation=FED, ttl_s=MAX_TTL_S, now=0).expires_at == 7 * 86400
    with pytest.raises(ConfigError, match="at most"):
        signer.mint("a", federation=FED, ttl_s=MAX_TTL_S + 1)
    # A correctly signed token that claims more than the maximum lifetime is refused anyway.
    with pytest.raises(Unauthorized, match="lifetime"):
        signer.verify(signed(claims(exp=1_000_000 + MAX_TTL_S + 1)), now=1_000_001)


def test_every_token_needs_a_federation() -> None:
    signer = TokenSigner(SECRET)
    for fed in ("", "Has Caps", "a/b", "x" * 80):
        with pytest.raises(ConfigError):
            signer.issue("alice", federation=fed)
    for payload in (claims(fed=None), {**claims(), "fed": None}, claims(fed=7), claims(fed="")):
        with pytest.raises(Unauthorized) as err:
            signer.verify(signed(payload), now=1_000_001)
        assert err.value.code == "token_malformed"


@pytest.mark.parametrize(
    "payload",
    [
        claims(rol="root"),
        claims(rol=None),
        {**claims(), "adm": True, "rol": None},  # the old format's admin flag means nothing
        claims(sub=""),
        claims(sub="a b"),
        claims(sub=["alice"]),
        claims(iat="1000000"),
        claims(exp=1_000_000.5),
        claims(exp=True),
        claims(exp=999_999),  # expires before it was issued
        claims(jti=None),
        claims(jti="not-hex"),
        [1, 2, 3],
        "alice",
        None,
    ],
)
def test_signed_but_malformed_claims_are_refused(payload: Any) -> None:
    with pytest.raises(Unauthorized) as err:
        TokenSigner(SECRET).verify(signed(payload), now=1_000_001)
    assert err.value.code == "token_malformed"


def test_parsing_edge_cases_never_raise_anything_but_unauthorized() -> None:
    signer = TokenSigner(SECRET)
    good = signer.issue("alice", federation=FED)
    prefix, payload, signature = good.split(".")
    nested = b"[" * 100_000 + b"]" * 100_000
    cases = [
        "",
        "pfi2",
        "pfi2..",
        "..",
        f"pfi1.{payload}.{signature}",  # the old prefix
        f"{prefix}.{payload}.{signature}.extra",
        f"{prefix}.{payload}.{signature}=",  # padding is not base64url here
        f"{prefix}.{payload}.{signature[:-1]}",
        f"{prefix}.{payload}.!!!!",
        f"{prefix}.{payload}.A",  # length % 4 == 1: not base64 at all
        f"{prefix}.%%%.{signature}",
        f"{prefix}.{payload}é.{signature}",
        f"{prefix}.{payload}.{signature}\x00",
        "x" * 5000,
        f"{prefix}.{'A' * 100_000}.{signature}",  # huge
        signed(None, raw=b"\xff\xfe not utf-8"),
        signed(None, raw=b"{not json"),
        signed(None, raw=nested[:2000]),
    ]
    for token in cases:
        with pytest.raises(Unauthorized):
            signer.verify(token, now=1_000_001)
    auth = Authenticator(signer)
    for header in (f"Bearer {'A' * 1_000_000}", "Bearer \udcff", "Bearer pfi2.é.é", "Bearer " + " " * 10):
        with pytest.raises(Unauthorized):
            auth.authenticate(header)


def test_authorization_header_forms() -> None:
    signer = TokenSigner(SECRET)
    auth = Authenticator(signer)
    token = signer.issue("alice", federation=FED)
    assert auth.authenticate(f"Bearer {token}").user == "alice"
    assert auth.authenticate(f"bearer   {token}").user == "alice"
    for header, code in [
        (None, "token_missing"),
        ("", "token_missing"),
        (f"Basic {token}", "token_malformed"),
        ("Bearer", "token_malformed"),
        ("Bearer not-a-token", "token_malformed"),
        ("Bearer pfe1.fed-a.0123456789abcdef." + "A" * 43, "token_malformed"),  # an enrollment token
    ]:
        with pytest.raises(Unauthorized) as err:
            auth.authenticate(header)
        assert err.value.code == code
        assert err.value.status == 401


def test_forged_tampered_and_foreign_tokens_are_refused() -> None:
    signer = TokenSigner(SECRET)
    token = signer.issue("alice", federation=FED, now=1_000_000, ttl_s=3600)
    prefix, payload, signature = token.split(".")

    other = TokenSigner(b"x" * 32).issue("alice", federation=FED, now=1_000_000, ttl_s=3600)
    with pytest.raises(Unauthorized, match="signature"):
        signer.verify(other, now=1_000_001)

    # Claim to be bob, an admin, a device, another federation or longer-lived with alice's signature.
    original = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    for change in ({"sub": "bob"}, {"rol": "admin"}, {"rol": "device"}, {"fed": "fed-b"}, {"exp": 2_000_000}):
        forged = _b64(json.dumps({**original, **change}).encode())
        with pytest.raises(Unauthorized, match="signature"):
            signer.verify(f"{prefix}.{forged}.{signature}", now=1_000_001)
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    with pytest.raises(Unauthorized):
        signer.verify(f"{prefix}.{payload}.{flipped}", now=1_000_001)


def test_expiry() -> None:
    signer = TokenSigner(SECRET)
    token = signer.issue("alice", federation=FED, ttl_s=10, now=1_000_000)
    signer.verify(token, now=1_000_010)  # inside the small leeway
    with pytest.raises(Unauthorized) as err:
        signer.verify(token, now=1_000_100)
    assert err.value.code == "token_expired"


def test_scopes_are_one_federation_for_every_role() -> None:
    alice = Principal("alice", role="user", federation="fed-a", expires_at=0)
    alice.require_user("fed-a", "alice")
    for fed, user in (("fed-a", "bob"), ("fed-b", "alice")):
        with pytest.raises(Forbidden):
            alice.require_user(fed, user)
    with pytest.raises(Forbidden):
        alice.require_admin()
    with pytest.raises(Forbidden):
        alice.require_federation("fed-b")
    with pytest.raises(Forbidden):
        alice.require_device("fed-a")
    admin = Principal("ops", role="admin", federation="fed-a", expires_at=0)
    admin.require_admin()
    admin.require_user("fed-a", "bob")
    with pytest.raises(Forbidden):
        admin.require_user("fed-b", "bob")
    with pytest.raises(Forbidden):
        admin.require_federation("fed-b")
    device = Principal("dev-1", role="device", federation="fed-a", expires_at=0)
    device.require_device("fed-a", "dev-1")
    device.require_user("fed-a", "dev-1")
    checks: list[Callable[[], None]] = [
        lambda: device.require_device("fed-a", "dev-2"),
        lambda: device.require_device("fed-b", "dev-1"),
        lambda: device.require_user("fed-a", "dev-2"),
        device.require_admin,
    ]
    for check in checks:
        with pytest.raises(Forbidden):
            check()


def test_revocation_cache_in_memory() -> None:
    signer = TokenSigner(SECRET)
    cache = RevocationCache()
    auth = Authenticator(signer, cache)
    user = signer.mint("alice", federation=FED, now=1_000_000)
    device = signer.mint("dev-1", federation=FED, role="device", now=1_000_000)
    later = signer.mint("dev-1", federation=FED, role="device", now=1_000_100)
    other_fed = signer.mint("dev-1", federation="fed-b", role="device", now=1_000_000)
    cache._state = _Revoked(frozenset({user.jti}), {f"{FED}/dev-1": 1_000_050.0})
    for token in (user.token, device.token):
        with pytest.raises(Unauthorized) as err:
            auth.verify(token, now=1_000_200)
        assert err.value.code == "token_revoked"
    assert auth.verify(later.token, now=1_000_200).user == "dev-1"  # issued after the revocation
    assert auth.verify(other_fed.token, now=1_000_200).federation == "fed-b"  # another federation's client
    # a user token whose user happens to share the revoked client's id is not a device token
    assert not cache.is_revoked(signer.mint("dev-1", federation=FED, now=1_000_000).principal)


def test_issue_refuses_bad_input() -> None:
    signer = TokenSigner(SECRET)
    for user in ("", "has space", "a/b", "x" * 200):
        with pytest.raises(ConfigError):
            signer.issue(user, federation=FED)
    with pytest.raises(ConfigError):
        signer.issue("alice", federation=FED, ttl_s=0)
    with pytest.raises(ConfigError):
        signer.issue("alice", federation=FED, role="root")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        TokenSigner(b"short")


def test_development_secret_is_generated_once(tmp_path: Path) -> None:
    settings = PFISettings(home=tmp_path)
    first = load_secret(ServeSettings(token_secret=None), settings)
    assert len(first) >= 32
    mode = stat.S_IMODE(os.stat(secret_path(settings)).st_mode)
    assert mode == 0o600
    assert load_secret(ServeSettings(token_secret=None), settings) == first
    assert (
        load_secret(ServeSettings(token_secret="configured-secret-value"), settings)
        == b"configured-secret-value"
    )
    # Tokens minted with the dev secret verify in another "process" reading the same file.
    token = TokenSigner(first).issue("alice", federation=FED)
    assert TokenSigner(load_secret(ServeSettings(), settings)).verify(token).user == "alice"


def test_parse_ttl() -> None:
    assert parse_ttl("3600") == 3600
    assert parse_ttl("90s") == 90
    assert parse_ttl("15m") == 900
    assert parse_ttl("12h") == 43200
    assert parse_ttl("30d") == 30 * 86400
    for bad in ("", "0", "-5", "1w", "abc"):
        with pytest.raises(ConfigError):
            parse_ttl(bad)
