"""The OpenAI-compatible routes driven by the official ``openai`` package against the service on a real
port (uvicorn in a thread; real Redis, tiny model): completions and chat, streamed and not, give the
text of the native ``generate`` for the same parameters and seed; usage, versions (fields and headers),
OpenAI-shaped errors, the fair-queue 429 and a client that goes away mid-stream (its generation stops).
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from modeling.blobs import BLOB_ENCODING
from schemas.codec import encode_tensors
from services.personalization.app import create_app
from services.personalization.openai_compat.chat import fallback_prompt
from services.personalization.openai_compat.schemas import ChatMessage, body_cap
from services.personalization.service import PersonalizationService
from services.settings import PFISettings, ServeSettings
from services.stack.processes import free_port
from services.store.versions import VersionStore
from tests.conftest import run_in_thread
from tests.support.federations import global_state, new_federation, random_delta, shapes_of

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PROMPT = "ROMEO: But, soft! what light"
CAP = 200  # max_new_tokens cap of the service under test
SAMPLED = {"temperature": 0.9, "top_p": 0.9, "seed": 1234}
GREEDY = {"temperature": 0.0}


@dataclass
class Served:
    url: str
    fed: str
    service: PersonalizationService
    shapes: dict[str, tuple[int, ...]]

    def token(self, user: str, *, admin: bool = False, fed: str | None = None) -> str:
        return self.service.signer.issue(user, federation=fed or self.fed, role="admin" if admin else "user")

    def sdk(self, user: str = "alice", **kw: Any) -> openai.OpenAI:
        key = kw.pop("api_key", None) or self.token(user, admin=kw.pop("admin", False))
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60, **kw)

    def http(self, user: str = "alice") -> httpx.Client:
        auth = {"Authorization": f"Bearer {self.token(user)}"}
        return httpx.Client(base_url=self.url, headers=auth, timeout=60)

    def native(self, user: str = "alice", **body: Any) -> dict[str, Any]:
        with self.http(user) as client:
            response = client.post(f"/v1/federations/{self.fed}/generate", json=body)
        assert response.status_code == 200, response.text
        out: dict[str, Any] = response.json()
        return out

    def metric(self, name: str, **labels: str) -> float:
        value = self.service.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


async def _federation(redis_url: str) -> tuple[str, dict[str, tuple[int, ...]]]:
    redis = Redis.from_url(redis_url)
    try:
        store = VersionStore(redis)
        spec = await new_federation(store)
        return spec.name, shapes_of(await global_state(store, spec.name))
    finally:
        await redis.aclose()


@pytest.fixture(scope="module")
def served(redis_url: str, kafka_bootstrap: str) -> Iterator[Served]:
    fed, shapes = run_in_thread(_federation(redis_url))
    settings = PFISettings(redis_url=redis_url, kafka_bootstrap_servers=kafka_bootstrap)
    serve = ServeSettings(max_new_tokens=CAP, max_user_in_flight=1, federations=fed)
    service = PersonalizationService(settings, serve, CollectorRegistry(), secret=secrets.token_bytes(32))
    port = free_port()
    config = uvicorn.Config(
        create_app(service), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), name="openai-serve", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive(), "the service did not start"
        assert time.monotonic() < deadline, "the service did not start in time"
        time.sleep(0.05)
    try:
        yield Served(url, fed, service, shapes)
    finally:
        server.should_exit = True
        thread.join(60)


# ------------------------------------------------------------------------------------- same text as native


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_completions_equal_native_generate(served: Served, params: dict[str, Any]) -> None:
    native = served.native(prompt=PROMPT, max_new_tokens=24, **params)
    client = served.sdk()

    raw = client.completions.with_raw_response.create(
        model=served.fed, prompt=PROMPT, max_tokens=24, **params
    )
    completion = raw.parse()
    assert completion.choices[0].text == native["text"]
    assert completion.object == "text_completion"
    assert completion.model == served.fed
    assert completion.choices[0].finish_reason == (
        "length" if native["finish_reason"] == "length" else "stop"
    )
    usage = completion.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        native["prompt_tokens"],
        native["generated_tokens"],
    )
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    pfi = (completion.model_extra or {})["pfi"]
    assert pfi["global_version"] == native["global_version"] == 0
    assert pfi["personal_adapter_version"] == native["personal_adapter_version"]
    assert raw.headers["X-PFI-Global-Version"] == "0"
    assert raw.headers["X-PFI-Personal-Adapter-Version"] == str(native["personal_adapter_version"])

    chunks = list(
        client.completions.create(model=served.fed, prompt=PROMPT, max_tokens=24, stream=True, **params)
    )
    assert "".join(c.choices[0].text for c in chunks) == native["text"]
    assert sum(1 for c in chunks if c.choices[0].text) > 1  # pieces as they are generated, not one blob
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert chunks[-1].choices[0].finish_reason == completion.choices[0].finish_reason
    assert (chunks[-1].model_extra or {})["pfi"] == pfi


def test_chat_equals_native_generate_on_the_fallback_template(served: Served) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "You are a bard."},
        {"role": "user", "content": [{"type": "text", "text": "Speak of the moon."}]},
    ]
    prompt = fallback_prompt(
        [ChatMessage.model_validate(m) for m in messages]
    )  # the tiny model has no template
    assert prompt == "system: You are a bard.\nuser: Speak of the moon.\nassistant:"
    native = served.native(prompt=prompt, max_new_tokens=20, **SAMPLED)
    client = served.sdk()

    chat = client.chat.completions.create(model=served.fed, messages=messages, max_tokens=20, **SAMPLED)
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == native["text"]
    assert chat.usage is not None
    assert chat.usage.prompt_tokens == native["prompt_tokens"]
    assert chat.usage.completion_tokens == native["generated_tokens"]

    stream = client.chat.completions.create(
        model=served.fed,
        messages=messages,
        max_completion_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
        **SAMPLED,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == native["text"]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == native["generated_tokens"]
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")


def test_stop_strings_cut_the_text_and_end_the_generation(served: Served) -> None:
    native = served.native(prompt=PROMPT, max_new_tokens=40, **GREEDY)["text"]
    stop = native[10:13]
    expected = native[: native.find(stop)]
    client = served.sdk()
    completion = client.completions.create(
        model=served.fed, prompt=PROMPT, max_tokens=40, stop=[stop], **GREEDY
    )
    assert completion.choices[0].text == expected
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens < 40  # the generation ended at the stop string
    chunks = list(
        client.completions.create(
            model=served.fed, prompt=PROMPT, max_tokens=40, stop=stop, stream=True, **GREEDY
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_personal_adapter_and_pinned_versions(served: Served) -> None:
    state = random_delta(served.shapes, seed=5, scale=0.5)
    with served.http("carol") as client:
        put = client.put(
            f"/v1/federations/{served.fed}/users/carol/adapter",
            params={"trained_against": "0"},
            content=encode_tensors(state, BLOB_ENCODING),
        )
    assert put.status_code == 201, put.text
    native = served.native("carol", prompt=PROMPT, max_new_tokens=16, **GREEDY)
    assert native["personal_adapter_version"] == 1
    raw = served.sdk("carol").completions.with_raw_response.create(
        model=f"{served.fed}@0", prompt=PROMPT, max_tokens=16, **GREEDY
    )
    completion = raw.parse()
    assert completion.choices[0].text == native["text"]
    assert (completion.model_extra or {})["pfi"] == {
        "federation": served.fed,
        "global_version": 0,
        "personal_adapter_version": 1,
    }
    assert raw.headers["X-PFI-Personal-Adapter-Version"] == "1"
    # an admin acts for carol through `user`; a user token may not
    admin = served.sdk(admin=True).completions.create(
        model=served.fed, prompt=PROMPT, max_tokens=16, user="carol", **GREEDY
    )
    assert admin.choices[0].text == native["text"]
    with pytest.raises(openai.PermissionDeniedError) as denied:
        served.sdk("alice").completions.create(model=served.fed, prompt=PROMPT, max_tokens=4, user="carol")
    assert denied.value.status_code == 403
    assert denied.value.body["type"] == "permission_error"  # type: ignore[index]


def test_models_lists_the_tokens_federation_and_its_versions(served: Served) -> None:
    ids = [m.id for m in served.sdk().models.list()]
    assert ids[0] == served.fed
    assert f"{served.fed}@0" in ids
    assert all(i == served.fed or i.startswith(f"{served.fed}@") for i in ids)
    assert served.sdk().models.retrieve(f"{served.fed}@0").id == f"{served.fed}@0"
    with pytest.raises(openai.NotFoundError):
        served.sdk().models.retrieve(f"{served.fed}@77")
    paths = httpx.get(f"{served.url}/openapi.json").json()["paths"]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(paths)
    schema = paths["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "$ref" not in str(schema)  # documented inline: OpenAPI clients and the API fuzzer can use it


# ------------------------------------------------------------------------------------------------ errors


def test_errors_are_openai_shaped_with_the_right_status(served: Served) -> None:
    client = served.sdk()
    cases: list[tuple[type[openai.APIStatusError], int, str | None, dict[str, Any], openai.OpenAI]] = [
        (openai.AuthenticationError, 401, None, {}, served.sdk(api_key="pfi2.not.a-token")),
        (openai.NotFoundError, 404, "model", {"model": "no-such-fed"}, client),
        (openai.NotFoundError, 404, "model", {"model": "Not A Name!"}, client),
        (openai.NotFoundError, 404, "model", {"model": f"{served.fed}@99"}, client),
        (openai.BadRequestError, 400, "n", {"n": 2}, client),
        (openai.BadRequestError, 400, None, {"frequency_penalty": 0.5}, client),
        (openai.BadRequestError, 400, "stop", {"stop": ["a", "b", "c", "d", "e"]}, client),
        (openai.BadRequestError, 400, "temperature", {"temperature": 3.0}, client),
        (openai.UnprocessableEntityError, 422, None, {"max_tokens": CAP + 1}, client),
    ]
    for error, status, param, override, sdk in cases:
        body = {"model": served.fed, "prompt": PROMPT, "max_tokens": 4, **override}
        with pytest.raises(error) as caught:
            sdk.completions.create(**body)
        assert caught.value.status_code == status, (override, caught.value)
        detail = caught.value.body
        assert isinstance(detail, dict), detail
        assert set(detail) == {"message", "type", "param", "code"}, detail
        assert detail["param"] == param, (override, detail)
    # another federation's token sees neither its models nor its completions
    other = served.sdk(api_key=served.token("alice", fed="fed-other"))
    with pytest.raises(openai.NotFoundError):
        other.completions.create(model=served.fed, prompt=PROMPT, max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=served.fed, messages=[{"role": "tool", "content": "x"}])  # type: ignore[list-item,misc]


def test_oversized_and_malformed_bodies(served: Served) -> None:
    cap = body_cap(served.service.serve)
    with served.http() as client:
        big = client.post(
            "/v1/completions", content=b"x" * (cap + 1), headers={"Content-Type": "application/json"}
        )
        assert big.status_code == 413
        assert big.json()["error"]["type"] == "invalid_request_error"
        assert big.json()["error"]["code"] == "payload_too_large"
        bad = client.post(
            "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert bad.status_code == 400
        assert set(bad.json()["error"]) == {"message", "type", "param", "code"}
    anonymous = httpx.post(f"{served.url}/v1/completions", json={"model": served.fed, "prompt": "x"})
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.APIStatusError) as caught:
        served.sdk().completions.create(model=served.fed, prompt="y" * cap, max_tokens=1)
    assert caught.value.status_code == 413
    route = {"route": "/v1/completions", "method": "POST"}
    assert served.metric("pfi_serve_requests_total", status="413", **route) >= 1
    assert served.metric("pfi_serve_requests_total", status="200", **route) >= 1


# ------------------------------------------------------------------------------- fair queue, disconnects


def test_a_request_over_the_users_share_gets_429_with_retry_after(served: Served) -> None:
    client = served.sdk("dave")
    native = served.native("dave", prompt=PROMPT, max_new_tokens=CAP, **GREEDY)
    assert native["finish_reason"] == "length"  # a long generation: still running while we ask again
    stream = client.completions.create(model=served.fed, prompt=PROMPT, max_tokens=CAP, stream=True, **GREEDY)
    try:  # the service runs with max_user_in_flight=1
        with pytest.raises(openai.RateLimitError) as caught:
            client.completions.create(model=served.fed, prompt=PROMPT, max_tokens=4)
        assert int(caught.value.response.headers["Retry-After"]) >= 1
        assert caught.value.body["type"] == "rate_limit_error"  # type: ignore[index]
        assert caught.value.body["code"] == "user_limit"  # type: ignore[index]
        other = served.sdk("frank").completions.create(model=served.fed, prompt=PROMPT, max_tokens=4)
        assert other.choices[0].text  # other users are still served
    finally:
        stream.close()


def test_a_client_that_goes_away_mid_stream_stops_its_generation(served: Served) -> None:
    native = served.native("erin", prompt=PROMPT, max_new_tokens=CAP, **GREEDY)
    assert native["finish_reason"] == "length"  # uncancelled, the stream would run CAP tokens
    cancelled = served.metric("pfi_serve_openai_streams_total", outcome="cancelled")
    before = served.metric("pfi_serve_openai_stream_tokens_total")
    body = {"model": served.fed, "prompt": PROMPT, "max_tokens": CAP, "stream": True, **GREEDY}
    with served.http("erin") as client, client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data: ")
            if events == 3:
                break  # leave: the connection closes with the block
    deadline = time.monotonic() + 20
    while served.metric("pfi_serve_openai_streams_total", outcome="cancelled") == cancelled:
        assert time.monotonic() < deadline, "the stream was never cancelled"
        time.sleep(0.05)
    time.sleep(0.5)  # the model thread ends the row at its next token
    streamed = served.metric("pfi_serve_openai_stream_tokens_total") - before
    time.sleep(1.0)
    assert served.metric("pfi_serve_openai_stream_tokens_total") - before == streamed  # nothing runs on
    assert 3 <= streamed < CAP / 2
    # the service is free again: the user's next request is served at once
    after = served.sdk("erin").completions.create(model=served.fed, prompt=PROMPT, max_tokens=4, **GREEDY)
    assert after.choices[0].text == native["text"][: len(after.choices[0].text)]


def test_a_client_gone_before_its_first_token_never_gets_a_full_generation(served: Served) -> None:
    """The stream request waits behind another user's long generation; its client gives up before the
    response starts. When its turn comes, the first token finds nobody listening: the row ends there."""
    started = time.monotonic()
    assert served.native("gina", prompt=PROMPT, max_new_tokens=CAP, **GREEDY)["finish_reason"] == "length"
    # hank gives up well before gina's generation can end, however fast this machine generates
    give_up_s = max(0.02, (time.monotonic() - started) / 5)
    cancelled = served.metric("pfi_serve_openai_streams_total", outcome="cancelled")
    before = served.metric("pfi_serve_openai_stream_tokens_total")
    body: dict[str, Any] = {"model": served.fed, "prompt": PROMPT, "max_tokens": CAP, **GREEDY}
    long = served.sdk("gina").completions.create(stream=True, **body)  # returns at its first token
    reader = threading.Thread(target=lambda: list(long), daemon=True)  # read to the end: CAP tokens
    reader.start()
    with served.http("hank") as client, pytest.raises(httpx.ReadTimeout):
        client.post(
            "/v1/completions", json={**body, "stream": True}, timeout=httpx.Timeout(60, read=give_up_s)
        )
    reader.join(120)
    deadline = time.monotonic() + 30
    while served.metric("pfi_serve_openai_streams_total", outcome="cancelled") == cancelled:
        assert time.monotonic() < deadline, "the abandoned stream was never cancelled"
        time.sleep(0.05)
    time.sleep(1.0)
    hanks = served.metric("pfi_serve_openai_stream_tokens_total") - before - CAP
    assert 1 <= hanks <= 5  # its first token or so, not CAP
