"""A folded version's bytes are made in one worker-thread call (blob, optimizer blob, digest), and an
event model's envelope class is parametrized once."""

from __future__ import annotations

import gc
import hashlib
from types import SimpleNamespace
from typing import Any

import torch

from modeling.blobs import BLOB_ENCODING
from schemas.codec import decode_tensors
from schemas.events import AdapterUpdate, GlobalVersionPublished, envelope_type
from services.aggregator.math.server_optimizer import ServerOptState
from services.aggregator.versioning import encode_version

STATE = {"a.lora_A": torch.arange(12, dtype=torch.float32).view(3, 4), "a.lora_B": torch.ones(4, 2)}


def _result(opt: ServerOptState) -> Any:
    return SimpleNamespace(new_global=STATE, opt_state=opt)


def test_the_digest_is_the_blobs_and_the_blob_holds_the_new_global() -> None:
    encoded = encode_version(_result(ServerOptState()))
    assert encoded.digest == hashlib.sha256(encoded.blob).hexdigest()
    assert encoded.opt_blob == b""
    back = decode_tensors(encoded.blob, BLOB_ENCODING, max_decoded_bytes=1 << 20)
    assert set(back) == set(STATE)
    for name, tensor in STATE.items():
        assert torch.equal(back[name], tensor)


def test_an_optimizer_state_gets_its_own_blob() -> None:
    opt = ServerOptState(kind="momentum", buffers={"m": {k: v * 2 for k, v in STATE.items()}}, step=3)
    encoded = encode_version(_result(opt))
    tensors = decode_tensors(encoded.opt_blob, BLOB_ENCODING, max_decoded_bytes=1 << 20)
    assert ServerOptState.from_tensors(tensors).step == 3


def test_an_envelope_class_is_made_once_per_event_model() -> None:
    first = envelope_type(GlobalVersionPublished)
    gc.collect()
    assert envelope_type(GlobalVersionPublished) is first
    assert envelope_type(AdapterUpdate) is not first  # type: ignore[comparison-overlap]
    assert envelope_type(AdapterUpdate).model_fields["data"].annotation is AdapterUpdate
