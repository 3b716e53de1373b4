"""The serving API under abuse (real Redis, tiny model): bodies bounded before authentication and parsing,
authentication before the body is read, every numeric field bounded, a bounded and fair model queue.

Bodies are streamed from async generators that count what the server pulled: "did not read more than the
cap" is measured, not inferred from timing. One test runs a real uvicorn server on a socket and sends a
200 MiB body without a token, checking the answer time and the process RSS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
from redis.asyncio import Redis

from schemas.events import FederationSpec
from services.personalization.harness import Harness, serving
from services.personalization.limits import json_body_cap
from services.settings import PFISettings, ServeSettings
from services.stack.processes import free_port
from services.store.versions import VersionStore
from tests.support.serving import tiny_federation

pytestmark = pytest.mark.integration

MIB = 1 << 20
CHUNK = 64 * 1024
TEXT = "To be, or not to be, that is the question."


@pytest.fixture
def settings(redis_url: str, kafka_bootstrap: str) -> PFISettings:
    return PFISettings(redis_url=redis_url, kafka_bootstrap_servers=kafka_bootstrap)


@pytest.fixture
async def fed(redis_client: Redis) -> FederationSpec:
    return await tiny_federation(VersionStore(redis_client))


@pytest.fixture
async def h(settings: PFISettings, fed: FederationSpec) -> AsyncIterator[Harness]:
    serve = ServeSettings(max_upload_bytes=64 * 1024, max_new_tokens=32)
    async with serving(settings, serve, federation=fed.name) as harness:
        yield harness


class Body:
    """A streamed body of ``total`` bytes that counts how much of it the server pulled."""

    def __init__(self, total: int, chunk: int = CHUNK, data: bytes | None = None) -> None:
        self.total = total
        self.chunk = chunk
        self.pulled = 0
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        block = b"x" * self.chunk
        sent = 0
        if self.data is not None:
            self.pulled += len(self.data)
            sent += len(self.data)
            yield self.data
        while sent < self.total:
            piece = block[: min(self.chunk, self.total - sent)]
            sent += len(piece)
            self.pulled += len(piece)
            yield piece


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


# ------------------------------------------------------------------------------------- size, then token


async def test_a_declared_oversized_body_gets_413_before_auth_and_without_a_read(
    h: Harness, fed: FederationSpec
) -> None:
    name = fed.name
    routes = [
        ("POST", f"/v1/federations/{name}/generate"),
        ("POST", f"/v1/federations/{name}/score"),
        ("PUT", f"/v1/federations/{name}/users/alice/adapter?trained_against=0"),
        ("POST", f"/v1/federations/{name}/updates"),
        ("POST", f"/v1/federations/{name}/enroll"),
    ]
    before = h.sample("pfi_serve_request_body_bytes_total")
    for method, path in routes:
        for headers in ({}, h.auth("alice")):  # no token, a valid token: 413 either way, nothing read
            body = Body(200 * MIB)
            response = await h.client.request(
                method, path, content=body, headers={**headers, "Content-Length": str(200 * MIB)}
            )
            assert response.status_code == 413, (method, path, response.text)
            assert error_code(response) == "payload_too_large"
            assert response.headers["Connection"] == "close"
            assert body.pulled == 0, (method, path, body.pulled)  # answered without reading a byte
    assert h.sample("pfi_serve_request_body_bytes_total") == before
    assert h.sample("pfi_serve_body_rejections_total", reason="declared") == 2 * len(routes)
    assert (
        h.sample(
            "pfi_serve_requests_total", route="/v1/federations/{fed}/generate", method="POST", status="413"
        )
        == 2
    )


async def test_a_streamed_body_without_a_token_gets_401_and_is_never_read(
    h: Harness, fed: FederationSpec
) -> None:
    for path in ("generate", "score", "users/alice/adapter?trained_against=0"):
        body = Body(200 * MIB)
        method = "PUT" if path.startswith("users") else "POST"
        response = await h.client.request(method, f"/v1/federations/{fed.name}/{path}", content=body)
        assert response.status_code == 401, response.text
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert body.pulled == 0
    assert h.sample("pfi_serve_request_body_bytes_total") == 0


async def test_a_streamed_body_over_the_cap_gets_413_as_soon_as_it_passes(
    h: Harness, fed: FederationSpec
) -> None:
    name = fed.name
    cap = json_body_cap(h.service.serve)
    # A valid token, a JSON route: the body is counted while FastAPI reads it, cut at the cap.
    prefix = b'{"texts": ["'
    body = Body(200 * MIB, data=prefix)
    response = await h.client.post(f"/v1/federations/{name}/score", content=body, headers=h.auth("alice"))
    assert response.status_code == 413, response.text
    assert error_code(response) == "payload_too_large"
    assert cap < body.pulled <= cap + CHUNK + len(prefix)
    # The personal adapter upload: its own cap (max_upload_bytes).
    upload = Body(200 * MIB)
    response = await h.client.put(
        f"/v1/federations/{name}/users/alice/adapter",
        params={"trained_against": 0},
        content=upload,
        headers=h.auth("alice"),
    )
    assert response.status_code == 413, response.text
    assert 64 * 1024 < upload.pulled <= 64 * 1024 + CHUNK
    read = h.sample("pfi_serve_request_body_bytes_total")
    assert read <= cap + 64 * 1024 + 2 * CHUNK + len(prefix)
    assert h.sample("pfi_serve_body_rejections_total", reason="streamed") == 2
    # The service is fine afterwards.
    ok = await h.client.post(f"/v1/federations/{name}/score", json={"texts": [TEXT]}, headers=h.auth("alice"))
    assert ok.status_code == 200, ok.text


async def test_bad_json_without_a_token_is_401_not_422(h: Harness, fed: FederationSpec) -> None:
    name = fed.name
    bodies: list[dict[str, Any]] = [
        {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
        {"json": {"prompt": 1, "seed": -5}},
        {"content": b"\xff\xfe\x00", "headers": {"Content-Type": "application/json"}},
    ]
    for kw in bodies:
        for route in ("generate", "score"):
            response = await h.client.post(f"/v1/federations/{name}/{route}", **kw)
            assert response.status_code == 401, (route, kw, response.text)
            assert error_code(response) == "token_missing"
            bad = await h.client.post(
                f"/v1/federations/{name}/{route}",
                **{**kw, "headers": {**kw.get("headers", {}), "Authorization": "Bearer pfi2.x.y"}},
            )
            assert bad.status_code == 401, bad.text
    # With a valid token the same bodies are 422 (parsed only after authentication).
    response = await h.client.post(
        f"/v1/federations/{name}/generate",
        content=b"{not json",
        headers={"Content-Type": "application/json", **h.auth("alice")},
    )
    assert response.status_code == 422, response.text
    assert h.sample("pfi_serve_auth_failures_total", reason="token_missing") >= 6


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _send_raw(port: int, head: bytes, total: int) -> tuple[bytes, int, float]:
    """Send ``head`` and then up to ``total`` body bytes, stopping when the server answers or closes;
    ``(answer, body bytes written, seconds until the answer)``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.perf_counter()
    writer.write(head)
    chunked = b"chunked" in head.lower()
    block = (b"%x\r\n" % MIB + b"x" * MIB + b"\r\n") if chunked else b"x" * MIB
    sent = 0
    answer = b""
    read = asyncio.create_task(reader.read(65536))
    try:
        while sent < total and not read.done():
            writer.write(block)
            sent += len(block)
            try:
                await asyncio.wait_for(writer.drain(), 0.5)
            except TimeoutError:
                await asyncio.sleep(0)  # the server stopped reading: wait for its answer below
                break
            except (ConnectionError, OSError):
                break
        answer = await asyncio.wait_for(read, 10)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return answer, sent, time.perf_counter() - started


async def test_a_real_server_answers_a_200_mib_unauthenticated_body_fast_with_flat_rss(
    settings: PFISettings, fed: FederationSpec
) -> None:
    async with serving(settings, ServeSettings(), federation=fed.name) as h:
        port = free_port()
        config = uvicorn.Config(h.app, port=port, log_level="warning")
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        try:
            for _ in range(500):
                if server.started:
                    break
                await asyncio.sleep(0.02)
            rss = _rss_bytes()
            peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            path = f"/v1/federations/{fed.name}/generate"
            for head in (
                # declared: 413 before the token is even looked at
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {200 * MIB}\r\n\r\n",
                # chunked, no token: 401 before the body is read
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                "Transfer-Encoding: chunked\r\n\r\n",
            ):
                answer, sent, _seconds = await _send_raw(port, head.encode(), 200 * MIB)
                status = answer.split(b" ", 2)[1] if answer.startswith(b"HTTP/1.1 ") else answer[:60]
                assert status in (b"413", b"401"), answer[:300]
                assert sent < 64 * MIB, sent  # the server stopped reading (socket buffers aside)
            grown = _rss_bytes() - rss
            print(f"\nRSS growth under two 200 MiB unauthenticated bodies: {grown / MIB:.1f} MiB")
            assert grown < 64 * MIB, grown / MIB
            assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 64 * 1024  # KiB
            assert h.sample("pfi_serve_request_body_bytes_total") < MIB
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 10)


# ---------------------------------------------------------------------------------------- numeric bounds


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        ("generate", {"prompt": "hi", "seed": 2**31}, "seed"),
        ("generate", {"prompt": "hi", "seed": -1}, "seed"),
        ("generate", {"prompt": "hi", "seed": 10**30}, "seed"),
        ("generate", {"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
        ("generate", {"prompt": "hi", "max_new_tokens": 10**9}, "max_new_tokens"),
        ("generate", {"prompt": "hi", "temperature": -0.1}, "temperature"),
        ("generate", {"prompt": "hi", "temperature": 11}, "temperature"),
        ("generate", {"prompt": "hi", "top_p": 0}, "top_p"),
        ("generate", {"prompt": "hi", "top_p": 1.5}, "top_p"),
        ("generate", {"prompt": "hi", "global_version": -1}, "global_version"),
        ("generate", {"prompt": "hi", "global_version": 2**63}, "global_version"),
        ("generate", {"prompt": "x" * ((1 << 20) + 1)}, "prompt"),
        ("score", {"texts": []}, "texts"),
        ("score", {"texts": ["ab"] * 1025}, "texts"),
        ("score", {"texts": ["x" * ((1 << 20) + 1)]}, "texts.0"),
        ("score", {"texts": [TEXT], "global_version": 2**60}, "global_version"),
    ],
)
async def test_out_of_range_numbers_are_422_naming_the_field(
    settings: PFISettings, fed: FederationSpec, route: str, body: dict[str, Any], field: str
) -> None:
    serve = ServeSettings(max_prompt_chars=1 << 21, max_score_texts=2048)  # the schema bounds, not these
    async with serving(settings, serve, federation=fed.name) as h:
        response = await h.client.post(f"/v1/federations/{fed.name}/{route}", json=body, headers=h.auth("u"))
        assert response.status_code == 422, response.text
        message = response.json()["error"]["message"]
        assert message.startswith(f"{field}:") or f"; {field}:" in message, message


async def test_non_finite_numbers_and_huge_query_values_are_422(h: Harness, fed: FederationSpec) -> None:
    name = fed.name
    for raw in (b'{"prompt": "hi", "temperature": NaN}', b'{"prompt": "hi", "top_p": Infinity}'):
        response = await h.client.post(
            f"/v1/federations/{name}/generate",
            content=raw,
            headers={"Content-Type": "application/json", **h.auth("alice")},
        )
        assert response.status_code == 422, response.text
    response = await h.client.put(
        f"/v1/federations/{name}/users/alice/adapter",
        params={"trained_against": str(2**64)},
        content=b"x",
        headers=h.auth("alice"),
    )
    assert response.status_code == 422, response.text
    assert "trained_against" in response.json()["error"]["message"]
    # In range: a seed at the bound is served, and reproducibly.
    body = {"prompt": "ROMEO:", "seed": 2**31 - 1, "temperature": 0.8, "max_new_tokens": 4}
    first = await h.client.post(f"/v1/federations/{name}/generate", json=body, headers=h.auth("alice"))
    again = await h.client.post(f"/v1/federations/{name}/generate", json=body, headers=h.auth("alice"))
    assert first.status_code == 200, first.text
    assert first.json()["tokens"] == again.json()["tokens"]


# ------------------------------------------------------------------------------------------- the queue


async def test_a_flooding_user_gets_429_and_the_others_are_still_served(
    settings: PFISettings, fed: FederationSpec
) -> None:
    serve = ServeSettings(max_user_in_flight=2, max_queue=64, max_new_tokens=64)
    async with serving(settings, serve, federation=fed.name) as h:
        name = fed.name

        async def generate(user: str) -> httpx.Response:
            return await h.client.post(
                f"/v1/federations/{name}/generate",
                json={"prompt": "KING:", "max_new_tokens": 48},
                headers=h.auth(user),
            )

        await generate("warm-up")
        flood = [asyncio.create_task(generate("mallory")) for _ in range(40)]
        await asyncio.sleep(0.05)
        others = await asyncio.gather(*(generate(f"user-{i}") for i in range(4)))
        flooded = await asyncio.gather(*flood)
        assert [r.status_code for r in others] == [200] * 4, [r.text for r in others]
        statuses = [r.status_code for r in flooded]
        assert statuses.count(429) >= 30, statuses
        assert set(statuses) <= {200, 429}
        refused = next(r for r in flooded if r.status_code == 429)
        assert int(refused.headers["Retry-After"]) >= 1
        assert error_code(refused) == "user_limit"
        assert h.sample("pfi_serve_overload_rejections_total", reason="user_limit") == statuses.count(429)
        text = (await h.client.get("/metrics")).text
        assert "mallory" not in text


async def test_a_full_queue_answers_429_with_retry_after(settings: PFISettings, fed: FederationSpec) -> None:
    serve = ServeSettings(max_queue=2, max_user_in_flight=8, max_new_tokens=64, batch_wait_ms=0)
    async with serving(settings, serve, federation=fed.name, batching=False) as h:
        name = fed.name
        warm = await h.client.post(
            f"/v1/federations/{name}/score", json={"texts": [TEXT]}, headers=h.auth("w")
        )
        assert warm.status_code == 200, warm.text
        responses = await asyncio.gather(
            *(
                h.client.post(
                    f"/v1/federations/{name}/generate",
                    json={"prompt": "KING:", "max_new_tokens": 32},
                    headers=h.auth(f"u{i}"),
                )
                for i in range(16)
            )
        )
        statuses = [r.status_code for r in responses]
        assert 200 in statuses, statuses
        assert 429 in statuses, statuses
        full = next(r for r in responses if r.status_code == 429)
        assert error_code(full) == "queue_full"
        assert "Retry-After" in full.headers
        assert json.loads(full.text)["error"]["message"]
        assert h.sample("pfi_serve_overload_rejections_total", reason="queue_full") == statuses.count(429)
