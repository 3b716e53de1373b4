"""The personalization service's HTTP API against the real Redis (and Kafka for readiness), tiny model.

Most tests drive the FastAPI app in-process (httpx + ASGI transport, see
:mod:`services.personalization.harness`); one starts ``pfi serve`` as a subprocess on a free port.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from redis.asyncio import Redis

from clients.http_source import HttpGlobalSource, upload_personal_adapter
from modeling.blobs import BLOB_ENCODING
from schemas.codec import encode_tensors
from schemas.events import FederationSpec, TensorEncoding
from services.personalization.harness import BASE_URL, Harness, serving
from services.personalization.user_adapters import events_key, user_key
from services.settings import PFISettings, ServeSettings
from services.stack.processes import free_port
from services.store import keys
from services.store.versions import VersionStore
from services.transport import kafka_env
from tests.support.federations import global_state, new_federation, random_delta, shapes_of

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TEXT = "To be, or not to be, that is the question."


@pytest.fixture
def settings(redis_url: str, kafka_bootstrap: str) -> PFISettings:
    return PFISettings(redis_url=redis_url, kafka_bootstrap_servers=kafka_bootstrap)


@pytest.fixture
async def fed(redis_client: Redis) -> FederationSpec:
    return await new_federation(VersionStore(redis_client))


@pytest.fixture
async def shapes(redis_client: Redis, fed: FederationSpec) -> dict[str, tuple[int, ...]]:
    return shapes_of(await global_state(VersionStore(redis_client), fed.name))


@pytest.fixture
async def h(settings: PFISettings, fed: FederationSpec) -> AsyncIterator[Harness]:
    async with serving(settings, ServeSettings(max_new_tokens=64), federation=fed.name) as harness:
        yield harness


def personal_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """A personal adapter that visibly changes the model (A and B both non-zero)."""
    return random_delta(shapes, seed=seed, scale=0.5)


async def upload(
    h: Harness, fed: str, user: str, state: dict[str, torch.Tensor], **kw: Any
) -> dict[str, Any]:
    return await upload_personal_adapter(
        h.client, h.token(user), fed, user, state, trained_against=kw.pop("trained_against", 0), **kw
    )


async def score(h: Harness, fed: str, user: str, **body: Any) -> dict[str, Any]:
    response = await h.client.post(
        f"/v1/federations/{fed}/score", json={"texts": [TEXT], **body}, headers=h.auth(user)
    )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def generate(h: Harness, fed: str, user: str, **body: Any) -> dict[str, Any]:
    response = await h.client.post(
        f"/v1/federations/{fed}/generate",
        json={"prompt": "ROMEO: ", "max_new_tokens": 16, **body},
        headers=h.auth(user),
    )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


# ------------------------------------------------------------------------------------------------ serving


async def test_a_personal_adapter_changes_outputs_versus_global_only(
    h: Harness, fed: FederationSpec, shapes: dict[str, tuple[int, ...]]
) -> None:
    name = fed.name
    before = await score(h, name, "alice")
    assert before["global_version"] == 0
    assert before["personal_adapter_version"] is None
    greedy_before = await generate(h, name, "alice")

    info = await upload(h, name, "alice", personal_state(shapes, 1))
    assert (info["version"], info["trained_against"], info["user_id"]) == (1, 0, "alice")

    personal = await score(h, name, "alice")
    global_only = await score(h, name, "alice", use_personal=False)
    bob = await score(h, name, "bob")  # no adapter: base + global
    assert personal["personal_adapter_version"] == 1
    assert global_only["personal_adapter_version"] is None
    assert bob["personal_adapter_version"] is None
    nll = personal["results"][0]["mean_nll"]
    assert abs(nll - global_only["results"][0]["mean_nll"]) > 1e-3
    assert global_only["results"][0]["mean_nll"] == pytest.approx(before["results"][0]["mean_nll"], abs=1e-5)
    assert bob["results"][0]["mean_nll"] == pytest.approx(before["results"][0]["mean_nll"], abs=1e-5)

    greedy = await generate(h, name, "alice")
    assert greedy["tokens"] != greedy_before["tokens"]
    assert (greedy["global_version"], greedy["personal_adapter_version"]) == (0, 1)
    assert (await generate(h, name, "bob"))["tokens"] == greedy_before["tokens"]
    for key in ("queue_ms", "compute_ms", "total_ms", "batch_rows"):
        assert key in greedy["timing"]

    # A second upload is a new version that replaces the first everywhere at once.
    await upload(h, name, "alice", personal_state(shapes, 2), trained_against=0)
    again = await score(h, name, "alice")
    assert again["personal_adapter_version"] == 2
    assert abs(again["results"][0]["mean_nll"] - nll) > 1e-4


async def test_concurrent_users_share_batches_and_get_their_own_adapter(
    h: Harness, fed: FederationSpec, shapes: dict[str, tuple[int, ...]]
) -> None:
    name = fed.name
    users = [f"u{i}" for i in range(6)]
    for i, user in enumerate(users[:4]):  # u4, u5: no personal adapter
        await upload(h, name, user, personal_state(shapes, 10 + i))
    solo = {user: (await score(h, name, user))["results"][0]["mean_nll"] for user in users}
    greedy_solo = {user: (await generate(h, name, user))["tokens"] for user in users}
    assert len({round(v, 4) for v in solo.values()}) == 5  # 4 personal + 1 shared global-only value

    for _ in range(3):
        scored = await asyncio.gather(*(score(h, name, u) for u in users * 3))
        generated = await asyncio.gather(*(generate(h, name, u) for u in users))
        for user, result in zip(users * 3, scored, strict=True):
            assert result["results"][0]["mean_nll"] == pytest.approx(solo[user], abs=1e-4)
        for user, result in zip(users, generated, strict=True):
            assert result["tokens"] == greedy_solo[user]
        if max(r["timing"]["batch_requests"] for r in scored) > 1:
            break
    assert max(r["timing"]["batch_requests"] for r in scored) > 1, "no request was micro-batched"
    assert h.sample("pfi_serve_batch_personal_adapters_count", kind="score") > 0


async def test_sampling_is_reproducible_with_a_seed(h: Harness, fed: FederationSpec) -> None:
    body = {"temperature": 0.9, "top_p": 0.9, "seed": 7, "max_new_tokens": 12}
    first = await generate(h, fed.name, "alice", **body)
    again = await generate(h, fed.name, "alice", **body)
    assert first["tokens"] == again["tokens"]
    assert len(first["tokens"]) == 12 or first["finish_reason"] == "eos"


# -------------------------------------------------------------------------------------------------- auth


async def test_the_401_403_isolation_matrix(
    h: Harness, fed: FederationSpec, shapes: dict[str, tuple[int, ...]], redis_client: Redis
) -> None:
    name = fed.name
    bob_info = await upload(h, name, "bob", personal_state(shapes, 3))
    blob = encode_tensors(personal_state(shapes, 4), BLOB_ENCODING)
    c = h.client
    adapter = f"/v1/federations/{name}/users/bob/adapter"
    routes: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/v1/federations", {}),
        ("GET", f"/v1/federations/{name}", {}),
        ("GET", f"/v1/federations/{name}/versions/latest/adapter", {}),
        ("GET", adapter, {}),
        ("PUT", adapter, {"content": blob, "params": {"trained_against": 0}}),
        ("DELETE", adapter, {}),
        ("POST", f"/v1/federations/{name}/generate", {"json": {"prompt": "x", "user_id": "bob"}}),
        ("POST", f"/v1/federations/{name}/score", {"json": {"texts": ["xy"], "user_id": "bob"}}),
    ]
    other = h.token("bob", ttl_s=60).rsplit(".", 1)[0] + ".AAAA"
    expired = h.service.signer.issue("bob", federation=name, ttl_s=1, now=time.time() - 3600)
    for method, path, kw in routes:
        for headers in ({}, {"Authorization": f"Bearer {other}"}, {"Authorization": f"Bearer {expired}"},
                        {"Authorization": "Basic Ym9iOmJvYg=="}):  # fmt: skip
            response = await c.request(method, path, headers=headers, **kw)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert response.json()["error"]["code"].startswith("token_")

    # Alice's valid token: may read federation data, never bob's adapter.
    alice = h.auth("alice")
    for method, path, kw in routes:
        response = await c.request(method, path, headers=alice, **kw)
        if path in (f"/v1/federations/{name}", f"/v1/federations/{name}/versions/latest/adapter"):
            assert response.status_code == 200, (method, path, response.text)
        else:
            assert response.status_code == 403, (method, path, response.text)
            assert response.json()["error"]["code"] == "forbidden"
    # Bob's adapter is untouched, in Redis and as served.
    stored = await redis_client.hget(keys.user_adapter(name, "bob"), "version")
    assert stored == b"1"
    assert (await score(h, name, "bob"))["personal_adapter_version"] == 1
    meta = (await c.get(adapter, headers=h.auth("bob"))).json()
    assert meta["digest"] == bob_info["digest"]

    # A token limited to another federation cannot touch this one.
    scoped = {"Authorization": f"Bearer {h.token('bob', federation='other-fed')}"}
    assert (await c.get(adapter, headers=scoped)).status_code == 403
    assert (await c.get(f"/v1/federations/{name}", headers=scoped)).status_code == 403

    # Admin: any user of its federation, and the admin route (which lists only that federation).
    admin = h.auth("ops", admin=True)
    listed = await c.get("/v1/federations", headers=admin)
    assert listed.status_code == 200
    assert [f["name"] for f in listed.json()["federations"]] == [name]
    assert (await c.get(adapter, headers=admin)).json()["version"] == 1
    other_admin = h.auth("ops", admin=True, federation="other-fed")
    assert (await c.get(adapter, headers=other_admin)).status_code == 403
    assert (await c.get("/v1/federations", headers=other_admin)).json()["federations"] == []
    as_admin = await c.post(
        f"/v1/federations/{name}/score", json={"texts": [TEXT], "user_id": "bob"}, headers=admin
    )
    assert as_admin.json()["personal_adapter_version"] == 1
    assert h.sample("pfi_serve_auth_failures_total", reason="token_signature") > 0


# ------------------------------------------------------------------------------------------------ delete


async def test_delete_leaves_no_trace(
    h: Harness, fed: FederationSpec, shapes: dict[str, tuple[int, ...]], redis_client: Redis
) -> None:
    name = fed.name
    baseline = (await score(h, name, "alice"))["results"][0]["mean_nll"]
    await upload(h, name, "alice", personal_state(shapes, 5))
    assert (await score(h, name, "alice"))["personal_adapter_version"] == 1
    key = user_key(name, "alice")
    assert key in h.service.engine.cache

    path = f"/v1/federations/{name}/users/alice/adapter"
    response = await h.client.delete(path, headers=h.auth("alice"))
    assert response.status_code == 204
    assert await redis_client.exists(keys.user_adapter(name, "alice")) == 0
    federation_keys = [k async for k in redis_client.scan_iter(match=keys.prefix(name) + "*")]
    assert [k for k in federation_keys if b"alice" in k] == []
    # The invalidation stream other replicas read names users by a digest only.
    entries = await redis_client.xrange(events_key(name))
    assert [e for e in entries if any(b"alice" in v for v in e[1].values())] == []
    assert {e[1][b"op"] for e in entries} == {b"put", b"delete"}
    assert key not in h.service.engine.cache
    runtime = h.service.engine.runtimes[name]
    await asyncio.sleep(0.1)  # the model thread lets go of the tensors right away
    assert all(a.key != key for s in runtime.stacks.values() for a in s.bound_adapters())

    after = await score(h, name, "alice")
    assert after["personal_adapter_version"] is None
    assert after["results"][0]["mean_nll"] == pytest.approx(baseline, abs=1e-5)
    assert (await h.client.get(path, headers=h.auth("alice"))).status_code == 404
    assert (await h.client.delete(path, headers=h.auth("alice"))).status_code == 404


# ------------------------------------------------------------------------------------------- bad input


async def test_bad_inputs_are_4xx_and_the_service_stays_up(
    settings: PFISettings, fed: FederationSpec, shapes: dict[str, tuple[int, ...]]
) -> None:
    serve = ServeSettings(
        max_upload_bytes=64 * 1024, max_prompt_chars=500, max_new_tokens=32, max_score_texts=4
    )
    async with serving(settings, serve, federation=fed.name) as h:
        name = fed.name
        c = h.client
        alice = h.auth("alice")
        put = f"/v1/federations/{name}/users/alice/adapter"
        good = personal_state(shapes, 6)

        async def put_raw(body: bytes, status: int, code: str | None = None, **params: Any) -> None:
            response = await c.put(put, content=body, params={"trained_against": 0, **params}, headers=alice)
            assert response.status_code == status, response.text
            if code is not None:
                assert response.json()["error"]["code"] == code, response.text

        blob = encode_tensors(good, BLOB_ENCODING)
        await put_raw(b"", 400)
        await put_raw(os.urandom(2048), 400, "corrupt_adapter")
        await put_raw(blob[: len(blob) // 2], 400, "corrupt_adapter")  # truncated zstd frame
        flipped = blob[:20] + bytes(b ^ 0xFF for b in blob[20:60]) + blob[60:]
        await put_raw(flipped, 400, "corrupt_adapter")
        first = next(iter(good))
        wrong_shape = {**good, first: torch.zeros(3, 3)}
        await put_raw(encode_tensors(wrong_shape, BLOB_ENCODING), 422, "shape_mismatch")
        missing = {k: v for k, v in good.items() if k != first}
        await put_raw(encode_tensors(missing, BLOB_ENCODING), 422, "shape_mismatch")
        extra = {**good, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}
        await put_raw(encode_tensors(extra, BLOB_ENCODING), 422, "shape_mismatch")
        nan = {**good, first: torch.full(shapes[first], float("nan"))}
        await put_raw(encode_tensors(nan, BLOB_ENCODING), 422, "non_finite")
        inf = {**good, first: torch.full(shapes[first], float("inf"))}
        await put_raw(encode_tensors(inf, BLOB_ENCODING), 422, "non_finite")
        await put_raw(blob, 422, "unknown_version", trained_against=99)
        await put_raw(blob, 422, None, dtype="float64")
        fp16 = TensorEncoding(dtype="float16", quantization="none", compression="none")
        await put_raw(encode_tensors(good, fp16), 400, "corrupt_adapter")  # declared float32, is float16
        await put_raw(encode_tensors(good, fp16), 201, None, dtype="float16")
        await put_raw(b"\0" * (65 * 1024), 413, "payload_too_large")

        gen = f"/v1/federations/{name}/generate"
        ghost = h.auth("alice", federation="no-such-fed")  # a token of that (unknown) federation
        checks: list[tuple[str, str, dict[str, Any], int]] = [
            ("POST", gen, {"json": {"prompt": "x" * 501}}, 413),
            ("POST", gen, {"json": {"prompt": "hi", "max_new_tokens": 33}}, 422),
            ("POST", gen, {"json": {"prompt": "hi", "max_new_tokens": 0}}, 422),
            ("POST", gen, {"json": {"prompt": "hi", "temperature": -1}}, 422),
            ("POST", gen, {"json": {"prompt": "hi", "surprise": 1}}, 422),
            ("POST", gen, {"json": {"prompt": "hi", "user_id": "bad id"}}, 422),
            ("POST", gen, {"json": {"prompt": "hi", "global_version": 42}}, 404),
            ("POST", gen, {"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 422),
            ("POST", gen, {"json": {}}, 422),
            ("POST", f"/v1/federations/{name}/score", {"json": {"texts": []}}, 422),
            ("POST", f"/v1/federations/{name}/score", {"json": {"texts": ["ab"] * 5}}, 413),
            ("POST", f"/v1/federations/{name}/score", {"json": {"texts": ["x" * 501]}}, 413),
            ("POST", f"/v1/federations/{name}/score", {"json": {"texts": [""]}}, 422),
            (
                "POST",
                "/v1/federations/no-such-fed/generate",
                {"json": {"prompt": "hi"}, "headers": ghost},
                404,
            ),
            ("POST", "/v1/federations/no-such-fed/score", {"json": {"texts": ["hi"]}, "headers": ghost}, 404),
            ("GET", "/v1/federations/no-such-fed", {"headers": ghost}, 404),
            ("GET", "/v1/federations/Bad_Name!", {}, 422),
            ("GET", f"/v1/federations/{name}/versions/7/adapter", {}, 404),
            ("GET", f"/v1/federations/{name}/versions/seven/adapter", {}, 400),
            ("GET", f"/v1/federations/{name}/users/nobody/adapter", {"admin": True}, 404),
            ("DELETE", f"/v1/federations/{name}/users/nobody/adapter", {"admin": True}, 404),
        ]
        for method, path, kw, status in checks:
            headers = h.auth("ops", admin=True) if kw.pop("admin", False) else alice
            headers = {**headers, **kw.pop("headers", {})}
            response = await c.request(method, path, headers=headers, **kw)
            assert response.status_code == status, (method, path, kw, response.text)
            assert response.json()["error"]["message"], response.text

        assert (await c.get("/readyz")).status_code == 200
        ok = await score(h, name, "alice")
        assert ok["personal_adapter_version"] == 1  # the float16 upload
        assert h.sample("pfi_serve_adapter_uploads_total", outcome="rejected") >= 8
        assert (
            h.sample(
                "pfi_serve_request_errors_total",
                route="/v1/federations/{fed}/users/{user}/adapter",
                method="PUT",
                code="corrupt_adapter",
            )
            >= 3
        )


# ----------------------------------------------------------------------------------------------- cache


async def test_cache_evicts_under_a_tiny_byte_budget(
    settings: PFISettings, fed: FederationSpec, shapes: dict[str, tuple[int, ...]]
) -> None:
    per_adapter = sum(4 * math.prod(s) for s in shapes.values())
    budget = int(2.5 * per_adapter)
    async with serving(settings, ServeSettings(cache_bytes=budget), federation=fed.name) as h:
        name = fed.name
        users = [f"c{i}" for i in range(4)]
        for i, user in enumerate(users):
            await upload(h, name, user, personal_state(shapes, 20 + i))
        cache = h.service.engine.cache
        assert cache.bytes <= budget
        first = {u: (await score(h, name, u))["results"][0]["mean_nll"] for u in users}
        assert cache.bytes <= budget
        assert len(cache) <= 3  # 2 adapters + at most a few negatives
        assert h.sample("pfi_serve_adapter_cache_evictions_total", reason="capacity") >= 2

        misses = h.sample("pfi_serve_adapter_cache_misses_total")
        again = await score(h, name, users[0])  # evicted long ago: loaded from Redis again
        assert again["timing"]["cache"] == "miss"
        assert h.sample("pfi_serve_adapter_cache_misses_total") == misses + 1
        assert again["results"][0]["mean_nll"] == pytest.approx(first[users[0]], abs=1e-5)
        hit = await score(h, name, users[0])
        assert hit["timing"]["cache"] == "hit"
        assert h.sample("pfi_serve_adapter_cache_bytes") <= budget

        # A user without an adapter is cached as a small negative entry: no Redis read per request.
        await score(h, name, "nobody")
        assert (await score(h, name, "nobody"))["timing"]["cache"] == "hit"


# --------------------------------------------------------------------------------- global adapter, SDK


async def test_edge_agents_download_the_global_adapter_over_http(
    h: Harness, fed: FederationSpec, redis_client: Redis, shapes: dict[str, tuple[int, ...]]
) -> None:
    source = HttpGlobalSource(BASE_URL, h.token("edge-1"), client=h.client)
    spec = await source.spec(fed.name)
    assert spec == fed
    adapter = await source.latest(fed.name)
    expected = await global_state(VersionStore(redis_client), fed.name)
    assert adapter.version == 0
    assert set(adapter.state) == set(expected)
    for k, v in expected.items():
        assert torch.equal(adapter.state[k], v)
    # Unchanged: a conditional request, answered 304, served from the source's cache.
    assert await source.latest(fed.name) is adapter
    pinned = await h.client.get(f"/v1/federations/{fed.name}/versions/0/adapter", headers=h.auth("edge-1"))
    assert pinned.status_code == 200
    assert pinned.headers["Cache-Control"] == "no-cache"  # a number alone may be re-made (failover)
    digest = pinned.headers["ETag"].strip('"')
    by_digest = await h.client.get(
        f"/v1/federations/{fed.name}/versions/0/adapter", params={"digest": digest}, headers=h.auth("edge-1")
    )
    assert "immutable" in by_digest.headers["Cache-Control"]  # the URL names the content
    assert pinned.content == (await VersionStore(redis_client).get_blob(fed.name, 0))

    info = await source.upload_personal(fed.name, "edge-1", personal_state(shapes, 9), trained_against=0)
    assert info["version"] == 1
    assert (await source.personal_info(fed.name, "edge-1") or {})["digest"] == info["digest"]
    assert await source.delete_personal(fed.name, "edge-1")
    assert await source.personal_info(fed.name, "edge-1") is None
    assert not await source.delete_personal(fed.name, "edge-1")


async def test_metrics_and_probes(h: Harness, fed: FederationSpec) -> None:
    await score(h, fed.name, "alice")
    await generate(h, fed.name, "alice")
    # a route of a router added with include_router (FastAPI keeps it as one entry without a path)
    listed = await h.client.get(f"/v1/federations/{fed.name}/users/alice/documents", headers=h.auth("alice"))
    assert listed.status_code == 200, listed.text
    health = await h.client.get("/healthz")
    assert health.status_code == 200
    ready = await h.client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["kafka"] == "ok"
    text = (await h.client.get("/metrics")).text
    for name in (
        'pfi_serve_requests_total{method="POST",route="/v1/federations/{fed}/score",status="200"}',
        'pfi_serve_requests_total{method="GET",route="/v1/federations/{fed}/users/{user}/documents",'
        'status="200"}',
        "pfi_serve_request_duration_seconds_bucket",
        "pfi_serve_tokens_generated_total",
        "pfi_serve_adapter_cache_hits_total",
        "pfi_serve_adapter_cache_misses_total",
        "pfi_serve_adapter_cache_bytes",
        "pfi_serve_adapter_load_duration_seconds_bucket",
        "pfi_serve_global_swap_duration_seconds_bucket",
        f'pfi_serve_global_version{{federation="{fed.name}"}} 0.0',
        "pfi_serve_global_freshness_seconds",
        "pfi_serve_batch_rows_bucket",
    ):
        assert name in text, name
    assert "alice" not in text  # no user ids in labels
    assert 'route="None"' not in text  # every request labelled by its route's template
    openapi = (await h.client.get("/openapi.json")).json()
    assert "/v1/federations/{fed}/generate" in openapi["paths"]


# ------------------------------------------------------------------------------------------- subprocess


async def test_pfi_serve_as_a_subprocess(settings: PFISettings, fed: FederationSpec, tmp_path: Path) -> None:
    port = free_port()
    secret = uuid.uuid4().hex + uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("PFI_")}
    env.update(
        PFI_REDIS_URL=settings.redis(),
        **kafka_env(settings),  # the stack's credentials file, although PFI_HOME differs
        PFI_HOME=str(tmp_path / "home"),
        PFI_SERVE_TOKEN_SECRET=secret,
        PFI_SERVE_FEDERATIONS=fed.name,
    )
    issued = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.cli", "token", "issue", "alice", "--federation", fed.name,
         "--ttl", "1h"],
        env=env, capture_output=True, text=True, timeout=120, cwd=ROOT, check=True,
    )  # fmt: skip
    token = issued.stdout.strip()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once; everything after it awaits
        [sys.executable, "-m", "services.cli", "serve", "--port", str(port)],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            deadline = time.monotonic() + 120
            ready: httpx.Response | None = None
            while time.monotonic() < deadline:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                try:
                    ready = await client.get("/readyz")
                    if ready.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.2)
            assert ready is not None, (tmp_path / "serve.log").read_text()
            assert ready.status_code == 200, (tmp_path / "serve.log").read_text()
            assert fed.name in ready.json()["checks"]["models"]
            metrics = await client.get("/metrics")
            assert metrics.status_code == 200
            assert f'pfi_serve_global_version{{federation="{fed.name}"}} 0.0' in metrics.text
            headers = {"Authorization": f"Bearer {token}"}
            scored = await client.post(
                f"/v1/federations/{fed.name}/score", json={"texts": [TEXT]}, headers=headers
            )
            assert scored.status_code == 200, scored.text
            assert scored.headers["X-PFI-Global-Version"] == "0"
            assert (await client.get(f"/v1/federations/{fed.name}")).status_code == 401
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()
    # uvicorn shuts down gracefully, then re-raises SIGTERM (exit by signal, as a supervisor expects).
    output = (tmp_path / "serve.log").read_text()
    assert proc.returncode in (0, -signal.SIGTERM), output
    assert "personalization service stopped" in output
