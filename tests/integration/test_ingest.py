"""The HTTPS ingest route (``POST /v1/federations/{fed}/updates``) against the real app, Redis and Kafka:
every abuse case is refused with a clear 4xx and produces nothing; valid whole and chunked updates are
produced, keyed by federation, and decode back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from schemas.chunking import split_update
from schemas.events import AdapterUpdate, AdapterUpdateChunk
from schemas.frame import decode_frame, encode_frame
from schemas.signing import generate_key
from services.identity.registry import ClientRegistry
from services.ingest.idempotency import UploadLedger, message_part
from services.personalization.harness import Harness, serving
from services.settings import PFISettings, ServeSettings
from tests.support.federations import fed_name, read_events
from tests.support.updates import signed_update

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

URL = "/v1/federations/{fed}/updates"


def device_token(h: Harness, client_id: str, fed: str) -> str:
    return h.service.signer.issue(client_id, federation=fed, role="device")


def user_token(h: Harness, user: str, fed: str) -> str:
    return h.service.signer.issue(user, federation=fed, role="user")


async def post(h: Harness, fed: str, body: bytes, token: str | None, **headers: str) -> Any:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    headers.setdefault("Content-Type", "application/octet-stream")
    return await h.client.post(URL.format(fed=fed), content=body, headers=headers)


class World:
    def __init__(self, h: Harness, settings: PFISettings, fed: str, keys: dict[str, bytes]) -> None:
        self.h = h
        self.settings = settings
        self.fed = fed
        self.keys = keys

    def token(self, client_id: str) -> str:
        return device_token(self.h, client_id, self.fed)

    def update(self, client_id: str, *, key: bytes | None = None, numel: int = 64, **kw: Any) -> Any:
        return signed_update(
            self.fed, client_id, key if key is not None else self.keys[client_id], numel, **kw
        )


@pytest.fixture
async def world(pfi_settings: PFISettings, redis_client: Redis) -> AsyncIterator[World]:
    fed = fed_name()
    keys = {"dev-a": generate_key(), "dev-b": generate_key()}
    await ClientRegistry(redis_client).register_many(fed, keys)
    async with serving(pfi_settings, ServeSettings()) as h:
        yield World(h, pfi_settings, fed, keys)


def error_code(response: Any) -> str:
    return str(response.json()["error"]["code"])


async def test_abuse_cases_are_refused_and_nothing_is_produced(world: World, redis_client: Redis) -> None:
    h, fed = world.h, world.fed
    frame = encode_frame(world.update("dev-a"))
    other_fed = fed_name()
    await ClientRegistry(redis_client).register(other_fed, "dev-a", world.keys["dev-a"])

    # no token / a malformed one
    r = await post(h, fed, frame, None)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    r = await post(h, fed, frame, "pfi1.garbage.token")
    assert r.status_code == 401
    # a device token of another federation
    r = await post(h, fed, frame, device_token(h, "dev-a", other_fed))
    assert (r.status_code, error_code(r)) == (403, "wrong_federation")
    # a user (or admin) token: not a device
    r = await post(h, fed, frame, user_token(h, "dev-b", fed))
    assert r.status_code == 403, r.text
    # dev-b's token, dev-a's (validly signed) message
    r = await post(h, fed, frame, world.token("dev-b"))
    assert (r.status_code, error_code(r)) == (403, "wrong_client")
    # a message for another federation under this federation's path
    foreign = encode_frame(signed_update(other_fed, "dev-a", world.keys["dev-a"], 64))
    r = await post(h, fed, foreign, world.token("dev-a"))
    assert (r.status_code, error_code(r)) == (403, "wrong_federation")
    # signed with another key
    forged = encode_frame(world.update("dev-a", key=generate_key()))
    r = await post(h, fed, forged, world.token("dev-a"))
    assert (r.status_code, error_code(r)) == (403, "bad_signature")
    # unsigned whole update
    unsigned = encode_frame(signed_update(fed, "dev-a", None, 64))
    r = await post(h, fed, unsigned, world.token("dev-a"))
    assert (r.status_code, error_code(r)) == (403, "unsigned")
    # unsigned chunk, and a chunk signed with another key
    big = world.update("dev-a", numel=300_000)
    for chunk_key, code in ((None, "unsigned"), (generate_key(), "bad_signature")):
        chunks = split_update(big, 64 * 1024, key=chunk_key)
        assert len(chunks) > 1
        r = await post(h, fed, chunks[0], world.token("dev-a"))
        assert (r.status_code, error_code(r)) == (403, code), r.text
    # a client that is not registered (valid token, self-made key)
    stranger = encode_frame(signed_update(fed, "dev-x", generate_key(), 64))
    r = await post(h, fed, stranger, world.token("dev-x"))
    assert (r.status_code, error_code(r)) == (403, "unknown_client")
    # a revoked client (verifiers reload the registry at most once a second)
    await ClientRegistry(redis_client).revoke(fed, "dev-b")
    await asyncio.sleep(1.2)
    revoked = encode_frame(world.update("dev-b"))
    r = await post(h, fed, revoked, world.token("dev-b"))
    assert r.status_code in (401, 403), r.text
    # garbage, empty
    r = await post(h, fed, b"\x00garbage" * 100, world.token("dev-a"))
    assert (r.status_code, error_code(r)) == (400, "malformed")
    r = await post(h, fed, b"", world.token("dev-a"))
    assert r.status_code == 400
    # oversized: declared, and streamed without a declared length
    limit = world.settings.kafka_max_message_bytes
    r = await post(h, fed, b"\x00" * (limit + 1), world.token("dev-a"))
    assert (r.status_code, error_code(r)) == (413, "payload_too_large")
    # the gate knows this route's cap: an oversized body without a token is 413 before any auth or read
    r = await h.client.post(URL.format(fed=fed), content=b"\x00" * (limit + 1))
    assert (r.status_code, error_code(r)) == (413, "payload_too_large")

    async def stream() -> AsyncIterator[bytes]:
        for _ in range(limit // 65536 + 2):
            yield b"\x00" * 65536

    r = await h.client.post(
        URL.format(fed=fed),
        content=stream(),
        headers={"Authorization": f"Bearer {world.token('dev-a')}"},
    )
    assert (r.status_code, error_code(r)) == (413, "payload_too_large")

    # nothing reached the topic; then a valid update does
    r = await post(h, fed, frame, world.token("dev-a"))
    assert r.status_code == 202, r.text
    events = await read_events(world.settings, world.settings.updates_topic, 2, timeout=5.0)
    assert [type(e).__name__ for e in events] == ["AdapterUpdate"]
    refused = h.sample("pfi_ingest_requests_total", outcome="refused", reason="bad_signature")
    assert refused == 2.0
    assert h.sample("pfi_ingest_requests_total", outcome="accepted", reason="ok") == 1.0


async def test_whole_and_chunked_updates_are_produced_and_decode(world: World) -> None:
    h, fed = world.h, world.fed
    whole = world.update("dev-a")
    r = await post(h, fed, encode_frame(whole), world.token("dev-a"))
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["update_id"] == whole.data.update_id
    assert body["partition"] >= 0
    assert body["offset"] >= 0

    big = world.update("dev-b", numel=300_000)
    chunks = split_update(big, 128 * 1024, key=world.keys["dev-b"])
    assert len(chunks) > 2
    partitions = set()
    for chunk in chunks:
        r = await post(h, fed, chunk, world.token("dev-b"))
        assert r.status_code == 202, r.text
        assert r.json()["update_id"] == big.data.update_id
        partitions.add(r.json()["partition"])
    assert len(partitions) == 1  # keyed by federation: one partition, in order

    events = await read_events(world.settings, world.settings.updates_topic, 1 + len(chunks))
    assert isinstance(events[0], AdapterUpdate)
    assert events[0].update_id == whole.data.update_id
    pieces = [e for e in events[1:] if isinstance(e, AdapterUpdateChunk)]
    assert [c.index for c in pieces] == list(range(len(chunks)))
    frame = b"".join(c.payload for c in pieces)
    assert frame == encode_frame(big)
    assert h.sample("pfi_ingest_messages_total", kind="chunk") == float(len(chunks))


async def test_a_resent_message_is_answered_with_its_first_position_and_never_produced_again(
    world: World, redis_client: Redis
) -> None:
    h, fed = world.h, world.fed
    original = world.update("dev-a")
    whole = encode_frame(original)
    first = await post(h, fed, whole, world.token("dev-a"))
    assert first.status_code == 202, first.text
    assert "duplicate" not in first.json()
    again = await post(h, fed, whole, world.token("dev-a"))
    assert again.status_code == 202, again.text
    assert again.json() == {**first.json(), "duplicate": True}

    # A chunked upload resent whole after it was stored: every chunk is answered, none produced again.
    big = world.update("dev-b", numel=200_000)
    chunks = split_update(big, 128 * 1024, key=world.keys["dev-b"])
    firsts = [(await post(h, fed, c, world.token("dev-b"))).json() for c in chunks]
    for chunk, stored in zip(chunks, firsts, strict=True):
        r = await post(h, fed, chunk, world.token("dev-b"))
        assert r.status_code == 202, r.text
        assert r.json() == {**stored, "duplicate": True}

    # The same ids with other content is not a retry: produced (the aggregators refuse the duplicate id).
    other = encode_frame(world.update("dev-a", update_id=original.data.update_id, seed=5))
    r = await post(h, fed, other, world.token("dev-a"))
    assert r.status_code == 202, r.text
    assert "duplicate" not in r.json()

    # Another client's message under the same update id is its own message (ids are per client).
    squatter = encode_frame(world.update("dev-b", update_id=original.data.update_id))
    r = await post(h, fed, squatter, world.token("dev-b"))
    assert r.status_code == 202, r.text
    assert "duplicate" not in r.json()

    events = await read_events(world.settings, world.settings.updates_topic, 4 + len(chunks), timeout=5.0)
    assert len(events) == 3 + len(chunks)
    assert h.sample("pfi_ingest_duplicates_total") == float(1 + len(chunks))
    assert h.sample("pfi_ingest_requests_total", outcome="accepted", reason="duplicate") == float(
        1 + len(chunks)
    )

    # The same message being stored by another request right now: 409, retry in a second; once that
    # request gave up its claim (its produce failed), the retry is produced.
    pending = encode_frame(world.update("dev-a", update_id="in-flight"))
    ledger = UploadLedger(redis_client, ttl_s=60, pending_ttl_s=60)
    part = message_part(decode_frame(pending, max_frame_bytes=len(pending)).data)
    claim = await ledger.claim(fed, "dev-a", "in-flight", part)
    assert claim.state == "new"
    r = await post(h, fed, pending, world.token("dev-a"))
    assert (r.status_code, error_code(r), r.headers["Retry-After"]) == (409, "in_progress", "1")
    await ledger.release(claim)
    r = await post(h, fed, pending, world.token("dev-a"))
    assert r.status_code == 202, r.text
    assert "duplicate" not in r.json()


async def test_per_client_byte_quota_answers_429_with_retry_after(
    pfi_settings: PFISettings, redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PFI_INGEST_CLIENT_BYTES_PER_S", "1024")
    monkeypatch.setenv("PFI_INGEST_CLIENT_BURST_BYTES", "1024")
    settings = pfi_settings.model_copy(update={"kafka_max_message_bytes": 256 * 1024})
    fed = fed_name()
    keys = {"dev-q": generate_key(), "dev-r": generate_key()}
    await ClientRegistry(redis_client).register_many(fed, keys)
    async with serving(settings, ServeSettings()) as h:
        world = World(h, settings, fed, keys)
        first = encode_frame(world.update("dev-q", numel=40_000))
        assert 100_000 < len(first) < 256 * 1024
        r = await post(h, fed, first, world.token("dev-q"))
        assert r.status_code == 202, r.text
        second = encode_frame(world.update("dev-q", numel=40_000))
        r = await post(h, fed, second, world.token("dev-q"))
        assert (r.status_code, error_code(r)) == (429, "client_bytes")
        assert int(r.headers["Retry-After"]) >= 1
        # another client is not throttled by dev-q's quota
        r = await post(h, fed, encode_frame(world.update("dev-r", numel=40_000)), world.token("dev-r"))
        assert r.status_code == 202, r.text
        events = await read_events(settings, settings.updates_topic, 3, timeout=5.0)
        assert len(events) == 2
        assert h.sample("pfi_ingest_requests_total", outcome="throttled", reason="client_bytes") == 1.0


async def test_kafka_unavailable_is_503_with_retry_after(
    pfi_settings: PFISettings, redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PFI_INGEST_PRODUCE_TIMEOUT_S", "3")
    dead = pfi_settings.model_copy(update={"kafka_bootstrap_servers": "127.0.0.1:1"})
    fed = fed_name()
    key = await ClientRegistry(redis_client).register(fed, "dev-k")
    async with serving(dead, ServeSettings()) as h:
        frame = encode_frame(signed_update(fed, "dev-k", key, 64))
        r = await post(h, fed, frame, device_token(h, "dev-k", fed))
        assert (r.status_code, error_code(r)) == (503, "kafka_unavailable")
        assert r.headers["Retry-After"]
        # The failed produce gave up its claim: the device's retry is produced, not refused as in progress.
        assert not [k async for k in redis_client.scan_iter(match=f"pfi:{{{fed}}}:ingested:*")]


async def test_per_client_in_flight_cap_answers_429(
    pfi_settings: PFISettings, redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PFI_INGEST_CLIENT_IN_FLIGHT", "1")
    fed = fed_name()
    keys = {"dev-s": generate_key()}
    await ClientRegistry(redis_client).register_many(fed, keys)
    async with serving(pfi_settings, ServeSettings()) as h:
        world = World(h, pfi_settings, fed, keys)
        frame = encode_frame(world.update("dev-s"))
        release = asyncio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            yield frame[:100]
            await release.wait()  # the first upload is still being received
            yield frame[100:]

        first = asyncio.create_task(
            h.client.post(
                URL.format(fed=fed),
                content=slow_body(),
                headers={"Authorization": f"Bearer {world.token('dev-s')}"},
            )
        )
        await asyncio.sleep(0.3)
        r = await post(h, fed, encode_frame(world.update("dev-s")), world.token("dev-s"))
        assert (r.status_code, error_code(r)) == (429, "client_in_flight")
        assert r.headers["Retry-After"] == "1"
        release.set()
        assert (await first).status_code == 202
        r = await post(h, fed, encode_frame(world.update("dev-s")), world.token("dev-s"))
        assert r.status_code == 202, r.text
