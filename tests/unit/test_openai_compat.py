"""Pure parts of the OpenAI-compatible routes (model names, body validation, incremental detokenization,
stop strings) and the generation hook they stream from (``GenRow.on_token`` on the torch backend)."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from modeling.base import TINY_LLAMA, ByteTokenizer, load_base_model
from services.personalization.backends.base import GenRow
from services.personalization.backends.torch_slots.stacks import base_stack
from services.personalization.openai_compat.errors import InvalidParam, error_body, is_openai_path
from services.personalization.openai_compat.schemas import (
    ChatRequest,
    CompletionRequest,
    parse_body,
    parse_model,
)
from services.personalization.openai_compat.streaming import Detokenizer, TokenStream, cut_at_stop

BYTES = ByteTokenizer()


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "fed", "prompt": "hi", **fields}).encode()


def test_model_names() -> None:
    assert parse_model("fed-1") == ("fed-1", None)
    assert parse_model("fed.a@0") == ("fed.a", 0)
    assert parse_model("f@12") == ("f", 12)
    for bad in ("", "Fed", "fed@", "fed@-1", "fed@01", "fed@1@2", "a" * 64, "fed@" + "9" * 17):
        with pytest.raises(ValueError, match=f"^{re.escape(bad)}$"):
            parse_model(bad)


def test_bodies_are_bounded_and_refusals_name_the_parameter() -> None:
    ok = parse_body(CompletionRequest, body(temperature=None, frequency_penalty=0, logprobs=None, n=1))
    assert (ok.temperature, ok.n, ok.stops) == (1.0, 1, [])
    assert parse_body(CompletionRequest, body(prompt=["one"])).text == "one"
    refused = {
        "n": body(n=2),
        "temperature": body(temperature=2.5),
        "top_p": body(top_p=0),
        "max_tokens": body(max_tokens=0),
        "seed": body(seed=-1),
        "stop": body(stop=["a", "b", "c", "d", "e"]),
        "user": body(user="no spaces allowed"),
        "prompt": body(prompt=["one", "two"]),
    }
    for param, raw in refused.items():
        with pytest.raises(InvalidParam) as caught:
            parse_body(CompletionRequest, raw)
        assert caught.value.param is not None
        assert caught.value.param.startswith(param), (param, caught.value.param)
    for raw in (
        body(frequency_penalty=0.5),
        body(tools=[{"type": "function"}]),
        body(bogus=1),
        b"",
        b"[1]",
        b"{",
    ):
        with pytest.raises(InvalidParam):
            parse_body(CompletionRequest, raw)
    with pytest.raises(InvalidParam):
        parse_body(CompletionRequest, body(stop=""))
    chat = parse_body(
        ChatRequest, json.dumps({"model": "fed", "messages": [{"role": "user", "content": "x"}]}).encode()
    )
    assert chat.budget is None
    with pytest.raises(InvalidParam):
        parse_body(ChatRequest, json.dumps({"model": "fed", "messages": []}).encode())


def test_openai_error_shape() -> None:
    assert error_body(429, "user_limit", "slow down") == {
        "error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": "user_limit"}
    }
    assert error_body(413, "payload_too_large", "big")["error"]["type"] == "invalid_request_error"
    assert error_body(504, "timeout", "late")["error"]["type"] == "server_error"
    assert is_openai_path("/v1/completions")
    assert is_openai_path("/v1/models/fed@1")
    assert not is_openai_path("/v1/federations/fed/generate")
    assert not is_openai_path("/v1/completionsx")


def test_detokenizer_pieces_add_up_to_the_decoded_text() -> None:
    text = "Héllo wörld, 日本語 🎉!"
    ids = BYTES.encode(text)
    detokenizer = Detokenizer(BYTES.decode)
    pieces = [detokenizer.push(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)  # a split character waits for its last byte
    assert "" in pieces  # ... so some tokens released no text


def test_token_stream_holds_back_what_may_become_a_stop_string() -> None:
    loop = asyncio.new_event_loop()
    try:
        tokens = Counter("t", "t", registry=CollectorRegistry())
        stream = TokenStream(loop, BYTES.decode, ["END", "##"], tokens)
        fed = "abc EN an ENd then END and more"
        keep = [stream(i) for i in fed.encode()]  # generated tokens (no BOS)
        stopped_at = keep.index(False)
        assert fed[: stopped_at + 1].endswith("END")  # ended on the token that completed the stop string
        assert all(keep[:stopped_at])
        loop.run_until_complete(asyncio.sleep(0))  # deliver the pieces scheduled from "the model thread"
        pieces = []
        while not stream.queue.empty():
            pieces.append(stream.queue.get_nowait())
        assert "".join(pieces) == "abc EN an ENd then "
        assert stream.stop_found
        stream.cancel()
        assert stream(65) is False
        assert cut_at_stop("x##yEND", ["END", "##"]) == ("x", True)
        assert cut_at_stop("xyz", ["END"]) == ("xyz", False)
    finally:
        loop.close()


def test_on_token_streams_each_row_and_stops_only_its_own_row() -> None:
    stack = base_stack(load_base_model(TINY_LLAMA), "fed")
    prompt = BYTES.encode("ROMEO: ")
    solo = stack.generate([GenRow(prompt, None, 30)])[0]
    assert solo.finish_reason == "length"
    seen: list[int] = []

    def stop_after_five(token: int) -> bool:
        seen.append(token)
        return len(seen) < 5

    streamed: list[int] = []
    rows = [
        GenRow(prompt, None, 30, on_token=stop_after_five),
        GenRow(
            BYTES.encode("JULIET: O"), None, 12, 0.8, 0.9, 7, on_token=lambda t: streamed.append(t) is None
        ),
        GenRow(prompt, None, 30),
    ]
    stopped, sampled, plain = stack.generate(rows)
    assert stopped.finish_reason == "stopped"
    assert stopped.tokens == seen == solo.tokens[:5]  # handed out as chosen, cut where the consumer said
    assert sampled.tokens == streamed  # every token of a row that runs to its end, once
    assert (
        sampled.tokens == stack.generate([GenRow(BYTES.encode("JULIET: O"), None, 12, 0.8, 0.9, 7)])[0].tokens
    )
    assert plain == solo  # the batch's other rows go on


def test_a_failing_consumer_ends_only_its_row() -> None:
    stack = base_stack(load_base_model(TINY_LLAMA), "fed")
    prompt = BYTES.encode("ROMEO: ")

    def broken(token: int) -> bool:
        raise RuntimeError("consumer bug")

    failed, fine = stack.generate([GenRow(prompt, None, 10, on_token=broken), GenRow(prompt, None, 10)])
    assert (failed.finish_reason, len(failed.tokens)) == ("stopped", 1)
    assert fine == stack.generate([GenRow(prompt, None, 10)])[0]
