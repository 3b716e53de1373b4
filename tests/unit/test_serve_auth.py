"""Bearer tokens of the personalization service: signing, verification, scopes, the dev secret."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from schemas.errors import ConfigError
from services.personalization.auth import Principal, TokenSigner, load_secret, secret_path
from services.personalization.commands import parse_ttl
from services.personalization.errors import Forbidden, Unauthorized
from services.settings import PFISettings, ServeSettings

SECRET = b"s" * 32


def test_issue_and_verify_round_trip() -> None:
    signer = TokenSigner(SECRET)
    token = signer.issue("alice", ttl_s=60, now=1_000_000)
    who = signer.verify(token, now=1_000_030)
    assert who == Principal(user="alice", admin=False, expires_at=1_000_060, federation=None)
    admin = signer.verify(signer.issue("ops", admin=True, federation="fed-a", now=1_000_000), now=1_000_001)
    assert admin.admin
    assert admin.federation == "fed-a"


def test_authorization_header_forms() -> None:
    signer = TokenSigner(SECRET)
    token = signer.issue("alice")
    assert signer.authenticate(f"Bearer {token}").user == "alice"
    assert signer.authenticate(f"bearer   {token}").user == "alice"
    for header, code in [
        (None, "token_missing"),
        ("", "token_missing"),
        (f"Basic {token}", "token_malformed"),
        ("Bearer", "token_malformed"),
        ("Bearer not-a-token", "token_malformed"),
    ]:
        with pytest.raises(Unauthorized) as err:
            signer.authenticate(header)
        assert err.value.code == code
        assert err.value.status == 401


def test_forged_tampered_and_foreign_tokens_are_refused() -> None:
    signer = TokenSigner(SECRET)
    token = signer.issue("alice", now=1_000_000, ttl_s=3600)
    prefix, payload, signature = token.split(".")

    other = TokenSigner(b"x" * 32).issue("alice", now=1_000_000, ttl_s=3600)
    with pytest.raises(Unauthorized, match="signature"):
        signer.verify(other, now=1_000_001)

    # Claim to be bob (or admin) with alice's signature.
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    for change in ({"sub": "bob"}, {"adm": True}, {"exp": 9_999_999_999}):
        forged = base64.urlsafe_b64encode(json.dumps({**claims, **change}).encode()).rstrip(b"=").decode()
        with pytest.raises(Unauthorized, match="signature"):
            signer.verify(f"{prefix}.{forged}.{signature}", now=1_000_001)

    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    for bad in (
        f"{prefix}.{payload}.{flipped}",
        f"pfi2.{payload}.{signature}",
        f"{prefix}.{payload}",
        "a.b.c.d",
    ):
        with pytest.raises(Unauthorized):
            signer.verify(bad, now=1_000_001)
    with pytest.raises(Unauthorized):
        signer.verify("x" * 5000)


def test_expiry() -> None:
    signer = TokenSigner(SECRET)
    token = signer.issue("alice", ttl_s=10, now=1_000_000)
    signer.verify(token, now=1_000_010)  # inside the small leeway
    with pytest.raises(Unauthorized) as err:
        signer.verify(token, now=1_000_100)
    assert err.value.code == "token_expired"


def test_scopes() -> None:
    alice = Principal("alice", admin=False, expires_at=0)
    alice.require_user("fed-a", "alice")
    with pytest.raises(Forbidden):
        alice.require_user("fed-a", "bob")
    with pytest.raises(Forbidden):
        alice.require_admin()
    scoped = Principal("alice", admin=False, expires_at=0, federation="fed-a")
    scoped.require_user("fed-a", "alice")
    with pytest.raises(Forbidden):
        scoped.require_user("fed-b", "alice")
    with pytest.raises(Forbidden):
        scoped.require_federation("fed-b")
    admin = Principal("ops", admin=True, expires_at=0)
    admin.require_admin()
    admin.require_user("fed-a", "bob")


def test_issue_refuses_bad_input() -> None:
    signer = TokenSigner(SECRET)
    for user in ("", "has space", "a/b", "x" * 200):
        with pytest.raises(ConfigError):
            signer.issue(user)
    with pytest.raises(ConfigError):
        signer.issue("alice", ttl_s=0)
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
    token = TokenSigner(first).issue("alice")
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
