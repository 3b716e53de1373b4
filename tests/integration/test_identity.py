"""Device identity against the real Redis and the real HTTP app (in-process ASGI): enrollment tokens,
device tokens, key-proof refresh, revocation of clients and tokens, admin scope, the registry and the
verifiers' key cache, and the ``pfi clients`` / ``pfi token`` commands."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from schemas.events import AggregationSpec, FederationSpec, LoraSpec
from services.federation.admin import create_federation
from services.identity import ClientRegistry, Enrollment, EnrollmentError, FederationKeys
from services.personalization.auth import revoke_token
from services.personalization.harness import Harness, serving
from services.personalization.identity_routes import PROOF_HEADER, make_proof
from services.settings import PFISettings, ServeSettings
from services.store import keys as rk
from services.store.versions import VersionStore

pytestmark = pytest.mark.integration


async def new_federation(store: VersionStore) -> FederationSpec:
    """A federation on the tiny model (v0 committed)."""
    spec = FederationSpec(
        name=f"id-{uuid.uuid4().hex[:8]}",
        base_model="pfi/tiny-llama",
        lora=LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj")),
        aggregation=AggregationSpec(buffer_size=3, flush_timeout_s=60.0),
    )
    await create_federation(store, spec)
    return spec


@pytest.fixture
def settings(redis_url: str, kafka_bootstrap: str) -> PFISettings:
    return PFISettings(redis_url=redis_url, kafka_bootstrap_servers=kafka_bootstrap)


@pytest.fixture
async def fed(redis_client: Redis) -> FederationSpec:
    return await new_federation(VersionStore(redis_client))


@pytest.fixture
async def h(settings: PFISettings, fed: FederationSpec) -> AsyncIterator[Harness]:
    async with serving(settings, ServeSettings(max_new_tokens=8), federation=fed.name) as harness:
        yield harness


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def enrollment_token(h: Harness, fed: str, uses: int = 1, ttl_s: int = 600) -> str:
    response = await h.client.post(
        f"/v1/federations/{fed}/enrollment-tokens",
        json={"uses": uses, "ttl_s": ttl_s},
        headers=h.auth("ops", admin=True, federation=fed),
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    assert body["token"].startswith(f"pfe1.{fed}.")
    assert body["uses"] == uses
    return str(body["token"])


async def enroll(h: Harness, fed: str, token: str, client_id: str | None = None) -> httpx.Response:
    body = {} if client_id is None else {"client_id": client_id}
    headers = {b"Authorization": f"Bearer {token}".encode()}  # bytes: garbled tokens may be non-ASCII
    return await h.client.post(f"/v1/federations/{fed}/enroll", json=body, headers=headers)


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    if code is not None:
        assert error["code"] == code, error


async def wait_for_status(
    h: Harness, path: str, headers: dict[str, str], status: int, timeout_s: float = 5.0
) -> float:
    """Seconds until ``GET path`` answers ``status``."""
    started = time.monotonic()
    while True:
        response = await h.client.get(path, headers=headers)
        if response.status_code == status:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout_s, response.text
        await asyncio.sleep(0.05)


# ----------------------------------------------------------------------------------------- enrollment


async def test_enrollment_with_a_limited_use_token(
    h: Harness, fed: FederationSpec, redis_client: Redis
) -> None:
    name = fed.name
    token = await enrollment_token(h, name, uses=2)
    first = await enroll(h, name, token, "dev-a")
    assert first.status_code == 201, first.text
    body = first.json()
    assert (body["federation"], body["client_id"]) == (name, "dev-a")
    key = bytes.fromhex(body["signing_key"])
    assert len(key) == 32
    assert body["expires_at"] > time.time() + 3000

    # a taken client id is refused without consuming a use
    assert_error(await enroll(h, name, token, "dev-a"), 409, "client_exists")
    second = await enroll(h, name, token)  # no id: a generated one
    assert second.status_code == 201, second.text
    generated = second.json()["client_id"]
    assert generated.startswith("dev-")
    assert_error(await enroll(h, name, token, "dev-c"), 401, "enrollment_used_up")

    registry = ClientRegistry(redis_client)
    record = await registry.get(name, "dev-a")
    assert record is not None
    assert record.key == key
    assert record.active
    assert record.via.startswith("enroll:")
    assert await registry.get(name, "dev-c") is None
    assert sorted(r.client_id for r in await registry.list(name)) == sorted(["dev-a", generated])

    # the device token works in its federation, as its own user
    device = bearer(body["token"])
    assert (await h.client.get(f"/v1/federations/{name}", headers=device)).status_code == 200
    assert_error(await h.client.get(f"/v1/federations/{name}/users/dev-a/adapter", headers=device), 404)
    # ... never as another user, nor in another federation, nor on admin routes
    assert_error(
        await h.client.get(f"/v1/federations/{name}/users/{generated}/adapter", headers=device),
        403,
        "forbidden",
    )
    other = await new_federation(VersionStore(redis_client))
    assert_error(await h.client.get(f"/v1/federations/{other.name}", headers=device), 403)
    assert_error(await h.client.get(f"/v1/federations/{other.name}/users/dev-a/adapter", headers=device), 403)
    assert_error(await h.client.get(f"/v1/federations/{name}/clients", headers=device), 403)
    assert_error(await h.client.get("/v1/federations", headers=device), 403)


async def test_expired_wrong_federation_and_forged_enrollment_tokens_are_refused(
    h: Harness, fed: FederationSpec, redis_client: Redis
) -> None:
    name = fed.name
    enrollment = Enrollment(redis_client)
    expired = await enrollment.issue(name, uses=5, ttl_s=60)
    await redis_client.hset(rk.enrollment(name, expired.token_id), "expires_at", repr(time.time() - 1))
    assert_error(await enroll(h, name, expired.token), 401, "enrollment_invalid")
    short = await enrollment.issue(name, uses=5, ttl_s=1)
    await asyncio.sleep(1.2)  # PEXPIRE removed it
    assert not await redis_client.exists(rk.enrollment(name, short.token_id))
    assert_error(await enroll(h, name, short.token), 401, "enrollment_invalid")

    other = await new_federation(VersionStore(redis_client))
    valid = await enrollment.issue(name, uses=1, ttl_s=600)
    assert_error(await enroll(h, other.name, valid.token), 403, "forbidden")  # wrong federation
    fed_part, token_id, secret = valid.token[len("pfe1.") :].rsplit(".", 2)
    wrong_secret = f"pfe1.{fed_part}.{token_id}.{'A' * 43}"
    unknown_id = f"pfe1.{fed_part}.{'0' * 16}.{secret}"
    assert_error(await enroll(h, name, wrong_secret), 401, "enrollment_invalid")
    assert_error(await enroll(h, name, unknown_id), 401, "enrollment_invalid")
    garbled = [
        "pfe1.",
        "pfe1....",
        f"pfe1.{name}.{token_id}",
        f"pfe1.{name}.{token_id}.{secret}.x",
        f"pfe1.{name}.{token_id.upper()}.{secret}",
        f"pfe1.{name}.{token_id}.{secret}é",
        f"pfe1.{name}.{token_id}.{'A' * 5000}",
        "pfe1." + "A" * 100_000,
        h.token("alice"),  # a bearer token is not an enrollment token
    ]
    for token in garbled:
        response = await enroll(h, name, token)
        assert response.status_code == 401, (token[:40], response.text)
    for headers in ({}, {"Authorization": "Basic eDp5"}, {"Authorization": "Bearer"}):
        response = await h.client.post(f"/v1/federations/{name}/enroll", json={}, headers=headers)
        assert_error(response, 401)
    # the valid token still has its one use (nothing above consumed it), and bad bodies keep it
    path = f"/v1/federations/{name}/enroll"
    auth = bearer(valid.token)
    assert_error(await h.client.post(path, content=b"{not json", headers=auth), 400)
    assert_error(await h.client.post(path, content=b"[1]", headers=auth), 400)
    assert_error(await h.client.post(path, json={"client_id": "a b"}, headers=auth), 400)
    assert_error(await h.client.post(path, json={"client_id": 7}, headers=auth), 400)
    assert_error(await h.client.post(path, json={"client_id": "x", "admin": True}, headers=auth), 400)
    assert_error(await h.client.post(path, content=b" " * 2000, headers=auth), 413)
    assert (await enroll(h, name, valid.token, "dev-ok")).status_code == 201
    assert_error(await enroll(h, name, valid.token, "dev-again"), 401, "enrollment_used_up")
    with pytest.raises(EnrollmentError):
        await enrollment.redeem(valid.token, name, "dev-direct")


async def test_enrollment_is_atomic_under_concurrency(h: Harness, fed: FederationSpec) -> None:
    token = await enrollment_token(h, fed.name, uses=3)
    responses = await asyncio.gather(*(enroll(h, fed.name, token, f"race-{i}") for i in range(12)))
    assert sorted(r.status_code for r in responses) == [201] * 3 + [401] * 9


# ------------------------------------------------------------------------------------------ revocation


async def test_a_revoked_clients_tokens_and_key_are_refused_within_seconds(
    h: Harness, fed: FederationSpec, redis_client: Redis
) -> None:
    name = fed.name
    enrolled = (await enroll(h, name, await enrollment_token(h, name), "dev-r")).json()
    device = bearer(enrolled["token"])
    keys = FederationKeys(min_refresh_interval_s=0.0)
    await keys.refresh(redis_client, [name])
    assert keys.view(name).get("dev-r") == bytes.fromhex(enrolled["signing_key"])
    path = f"/v1/federations/{name}"
    assert (await h.client.get(path, headers=device)).status_code == 200

    admin = h.auth("ops", admin=True)
    response = await h.client.delete(f"/v1/federations/{name}/clients/dev-r", headers=admin)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "revoked"
    took = await wait_for_status(h, path, device, 401)
    assert took < 2.0
    response = await h.client.get(path, headers=device)
    assert_error(response, 401, "token_revoked")
    await keys.refresh(redis_client, [name])
    assert keys.view(name).get("dev-r") is None
    await keys.ensure(redis_client, name, "dev-r")  # a revoked client is not re-added by ensure
    assert keys.view(name).get("dev-r") is None
    listed = (await h.client.get(f"/v1/federations/{name}/clients", headers=admin)).json()
    assert listed["clients"][0]["status"] == "revoked"
    assert "key" not in listed["clients"][0]
    assert "signing_key" not in json.dumps(listed)
    # revoking again, or an unknown client
    again = await h.client.delete(f"/v1/federations/{name}/clients/dev-r", headers=admin)
    assert again.json()["status"] == "revoked"
    assert_error(await h.client.delete(f"/v1/federations/{name}/clients/nobody", headers=admin), 404)
    # a revoked client cannot refresh its token with its (still correct) key
    proof = make_proof(bytes.fromhex(enrolled["signing_key"]), name, "dev-r")
    response = await h.client.post(
        f"/v1/federations/{name}/clients/dev-r/token", headers={PROOF_HEADER: proof}
    )
    assert_error(response, 401, "proof_invalid")


async def test_a_revoked_token_id_is_refused_within_seconds(
    h: Harness, fed: FederationSpec, redis_client: Redis
) -> None:
    issued = h.service.signer.mint("alice", federation=fed.name)
    kept = bearer(h.token("alice"))
    headers = bearer(issued.token)
    path = f"/v1/federations/{fed.name}"
    assert (await h.client.get(path, headers=headers)).status_code == 200
    await revoke_token(redis_client, issued.jti, issued.expires_at)
    assert await wait_for_status(h, path, headers, 401) < 2.0
    assert_error(await h.client.get(path, headers=headers), 401, "token_revoked")
    assert (await h.client.get(path, headers=kept)).status_code == 200  # other tokens of alice: unaffected


# -------------------------------------------------------------------------------------- admin scope


async def test_admin_tokens_are_limited_to_their_federation(
    h: Harness, fed: FederationSpec, redis_client: Redis
) -> None:
    name = fed.name
    other = await new_federation(VersionStore(redis_client))
    await ClientRegistry(redis_client).register(other.name, "other-dev")
    admin = h.auth("ops", admin=True)
    for method, path, body in (
        ("GET", f"/v1/federations/{other.name}/clients", None),
        ("DELETE", f"/v1/federations/{other.name}/clients/other-dev", None),
        ("POST", f"/v1/federations/{other.name}/enrollment-tokens", {"uses": 1, "ttl_s": 60}),
        ("GET", f"/v1/federations/{other.name}/users/bob/adapter", None),
    ):
        response = await h.client.request(method, path, json=body, headers=admin)
        assert_error(response, 403, "forbidden")
    record = await ClientRegistry(redis_client).get(other.name, "other-dev")
    assert record is not None
    assert record.active
    listed = (await h.client.get("/v1/federations", headers=admin)).json()["federations"]
    assert [f["name"] for f in listed] == [name]
    # user tokens get no admin route; bad bodies are 4xx; unknown federations are 404
    user = h.auth("alice")
    assert_error(await h.client.get(f"/v1/federations/{name}/clients", headers=user), 403)
    tokens = f"/v1/federations/{name}/enrollment-tokens"
    assert_error(await h.client.post(tokens, json={"uses": 1}, headers=user), 403)
    bad_bodies: list[Any] = [
        {"uses": 0},
        {"uses": 10**9},
        {"uses": "2"},
        {"ttl_s": -1},
        {"ttl_s": 1.5},
        {"x": 1},
    ]
    for bad in [*bad_bodies, {"x": 1}, [1]]:
        assert_error(await h.client.post(tokens, json=bad, headers=admin), 400)
    assert_error(await h.client.post(tokens, content=b"{", headers=admin), 400)
    assert_error(await h.client.post(tokens, content=b"{}" + b" " * 2000, headers=admin), 413)
    ghost = "ghost-" + uuid.uuid4().hex[:6]
    response = await h.client.post(
        f"/v1/federations/{ghost}/enrollment-tokens",
        json={},
        headers=h.auth("ops", admin=True, federation=ghost),
    )
    assert_error(response, 404)
    # unauthenticated: 401 before the body is looked at
    assert_error(await h.client.post(tokens, content=b"{not json"), 401)
    assert_error(await h.client.get(f"/v1/federations/{name}/clients"), 401)


# ----------------------------------------------------------------------------------- token refresh


async def test_token_refresh_with_a_key_proof(h: Harness, fed: FederationSpec, redis_client: Redis) -> None:
    name = fed.name
    key = await ClientRegistry(redis_client).register(name, "dev-p")
    path = f"/v1/federations/{name}/clients/dev-p/token"

    async def refresh(proof: str | None) -> httpx.Response:
        return await h.client.post(path, headers={} if proof is None else {PROOF_HEADER: proof})

    proof = make_proof(key, name, "dev-p")
    response = await refresh(proof)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["federation"], body["client_id"]) == (name, "dev-p")
    who = h.service.authenticator.verify(body["token"])
    assert (who.user, who.role, who.federation) == ("dev-p", "device", name)
    assert (await h.client.get(f"/v1/federations/{name}", headers=bearer(body["token"]))).status_code == 200

    assert_error(await refresh(proof), 401, "proof_replayed")  # each proof is good once
    now = int(time.time())
    assert_error(await refresh(make_proof(key, name, "dev-p", now - 400)), 401, "proof_stale")
    assert_error(await refresh(make_proof(key, name, "dev-p", now + 400)), 401, "proof_stale")
    assert_error(await refresh(make_proof(b"k" * 32, name, "dev-p")), 401, "proof_invalid")
    assert_error(await refresh(make_proof(key, "other-fed", "dev-p")), 401, "proof_invalid")  # bound to fed
    other_key = await ClientRegistry(redis_client).register(name, "dev-q")
    assert_error(await refresh(make_proof(other_key, name, "dev-q")), 401, "proof_invalid")  # bound to cid
    unknown = await h.client.post(
        f"/v1/federations/{name}/clients/nobody/token",
        headers={PROOF_HEADER: make_proof(key, name, "nobody")},
    )
    assert_error(unknown, 401, "proof_invalid")
    assert_error(await refresh(None), 401, "proof_missing")
    for bad in (
        "",
        "abc",
        f"{now}",
        f"{now}.zz",
        f"{now}.{'0' * 63}",
        f"-1.{'0' * 64}",
        f"{'9' * 30}.{'0' * 64}",
    ):
        assert (await refresh(bad)).status_code == 401, bad
    # a second, fresh proof (another second) still works
    await asyncio.sleep(1.05)
    assert (await refresh(make_proof(key, name, "dev-p"))).status_code == 200


# ------------------------------------------------------------------------------ registry and key cache


async def test_registry_epochs_and_federation_keys(redis_client: Redis) -> None:
    fed_a, fed_b = f"ida-{uuid.uuid4().hex[:6]}", f"idb-{uuid.uuid4().hex[:6]}"
    registry = ClientRegistry(redis_client)
    assert await registry.epoch(fed_a) == 0
    key = await registry.register(fed_a, "c1")
    assert await registry.epoch(fed_a) == 1
    await registry.register_many(fed_a, {"c2": b"2" * 32, "c3": b"3" * 32})
    assert await registry.epoch(fed_a) == 2
    await registry.register_many(fed_b, {"c1": b"b" * 32, "only-b": b"o" * 32})
    assert await registry.epoch(fed_b) == 1
    assert await registry.revoke(fed_a, "c3")
    assert await registry.epoch(fed_a) == 3
    assert not await registry.revoke(fed_a, "c3")  # already revoked: no change
    assert not await registry.revoke(fed_a, "nobody")
    assert await registry.epoch(fed_a) == 3
    revoked = await registry.get(fed_a, "c3")
    assert revoked is not None
    assert revoked.status == "revoked"
    assert revoked.revoked_at is not None
    assert await redis_client.zscore(rk.TOKENS_REVOKED_CLIENTS, f"{fed_a}/c3") is not None

    keys = FederationKeys(min_refresh_interval_s=60.0)
    await keys.refresh(redis_client, [fed_a, fed_b])
    view_a, view_b = keys.view(fed_a), keys.view(fed_b)
    assert view_a.get("c1") == key
    assert view_a.get("c2") == b"2" * 32
    assert view_a.get("c3") is None  # revoked
    assert view_a.get("only-b") is None  # another federation's client
    assert view_b.get("c1") == b"b" * 32  # the same id in another federation has its own key
    assert keys.epoch(fed_a) == 3

    # rate-limited refresh: nothing reloads inside the interval; force does
    await registry.revoke(fed_a, "c2")
    await keys.refresh(redis_client, [fed_a])
    assert view_a.get("c2") == b"2" * 32
    await keys.refresh(redis_client, [fed_a], force=True)
    assert view_a.get("c2") is None
    # a client registered a moment ago is found by ensure (one HGET), without a full reload
    await registry.register(fed_a, "new", b"n" * 32)
    assert view_a.get("new") is None
    await keys.ensure(redis_client, fed_a, "new")
    assert view_a.get("new") == b"n" * 32
    await keys.ensure(redis_client, fed_a, "never-registered")
    assert view_a.get("never-registered") is None
    # a corrupt entry is skipped, never crashes the refresh
    await redis_client.hset(rk.clients(fed_a), "bad", "{not json")
    await redis_client.incr(rk.clients_epoch(fed_a))
    await keys.refresh(redis_client, [fed_a], force=True)
    assert view_a.get("bad") is None
    assert view_a.get("c1") == key
    assert [r.client_id for r in await registry.list(fed_a)] == ["c1", "c2", "c3", "new"]
    # re-registering a revoked client re-activates it with the new key
    await registry.register(fed_a, "c3", b"r" * 32)
    await keys.refresh(redis_client, [fed_a], force=True)
    assert view_a.get("c3") == b"r" * 32


# ------------------------------------------------------------------------------------------------ CLI


def _pfi(settings: PFISettings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PFI_REDIS_URL": settings.redis(), "PFI_HOME": str(settings.home)}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


async def test_clients_and_token_commands(
    settings: PFISettings, fed: FederationSpec, redis_client: Redis, tmp_path: Any
) -> None:
    settings = settings.model_copy(update={"home": tmp_path})
    name = fed.name

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return _pfi(settings, *args)

    added = await asyncio.to_thread(run, "clients", "add", name, "cli-dev")
    assert added.returncode == 0, added.stderr
    key = bytes.fromhex(added.stdout.strip())
    record = await ClientRegistry(redis_client).get(name, "cli-dev")
    assert record is not None
    assert record.key == key
    enroll_token = await asyncio.to_thread(
        run, "clients", "enroll-token", name, "--uses", "3", "--ttl", "10m"
    )
    assert enroll_token.returncode == 0, enroll_token.stderr
    assert enroll_token.stdout.strip().startswith(f"pfe1.{name}.")
    listed = await asyncio.to_thread(run, "clients", "list", name, "--json")
    assert [c["client_id"] for c in json.loads(listed.stdout)] == ["cli-dev"]
    assert key.hex() not in listed.stdout
    revoked = await asyncio.to_thread(run, "clients", "revoke", name, "cli-dev")
    assert revoked.returncode == 0, revoked.stderr
    record = await ClientRegistry(redis_client).get(name, "cli-dev")
    assert record is not None
    assert record.status == "revoked"
    missing = await asyncio.to_thread(run, "clients", "revoke", name, "nobody")
    assert missing.returncode == 1
    unknown_fed = await asyncio.to_thread(run, "clients", "enroll-token", "no-such-fed-xyz")
    assert unknown_fed.returncode == 1
    assert "no federation" in unknown_fed.stderr

    no_fed = await asyncio.to_thread(run, "token", "issue", "alice")
    assert no_fed.returncode != 0  # --federation is required
    issued = await asyncio.to_thread(
        run, "token", "issue", "alice", "--federation", name, "--admin", "--json"
    )
    assert issued.returncode == 0, issued.stderr
    out = json.loads(issued.stdout)
    assert out["expires_at"] - time.time() <= 15 * 60 + 5  # admin default: 15 min
    too_long = await asyncio.to_thread(run, "token", "issue", "alice", "--federation", name, "--ttl", "8d")
    assert too_long.returncode == 1
    revoke = await asyncio.to_thread(run, "token", "revoke", out["jti"])
    assert revoke.returncode == 0, revoke.stderr
    assert await redis_client.zscore(rk.TOKENS_REVOKED, out["jti"]) is not None
    keys_add = await asyncio.to_thread(run, "keys", "add", "alice")
    assert keys_add.returncode != 0  # 'pfi keys add' is gone
