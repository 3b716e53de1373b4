"""Issue 15's per-update fast paths give what the general paths give (pure logic, no I/O).

- ``decode_tensors`` of an all-float32 blob: one buffer, every tensor a view of it; same names, shapes
  and values as safetensors; anything unusual falls back to safetensors (same errors as before);
- ``encode_tensors`` writes float32 safetensors itself: safetensors reads it back exactly;
- ``state_l2_norm`` over a flat buffer = the per-tensor float64 norm (to rounding);
- ``weighted_sum`` over flat deltas = the per-key sum, bit for bit;
- ``aggregate`` uses a norm given with the update (validation's) and computes it when none is given;
- ``add_chunk`` refuses an update whose ids differ from its signed chunks' (their signatures cover
  the payload only for the client that signed them).
"""

from __future__ import annotations

import json
import math
import struct

import pytest
import safetensors.torch
import torch

from clients.updates import build_update
from schemas.chunking import Reassembler, split_frame, split_update
from schemas.codec import decode_tensors, encode_tensors, flat_view, state_l2_norm
from schemas.errors import CodecError, RejectedInput, RejectReason
from schemas.events import AdapterUpdate, AggregationSpec, TensorEncoding, make_envelope
from schemas.frame import decode_frame, encode_frame
from schemas.signing import StaticKeyStore, sign_update
from services.aggregator.batch import add_chunk
from services.aggregator.math.fedbuff import BufferedUpdate, aggregate
from services.aggregator.math.strategies.weighted_mean import weighted_sum

F32 = TensorEncoding(dtype="float32", quantization="none", compression="none")
CAP = 1 << 26


def lora_state(seed: int, layers: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for i in range(layers):
        for module in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{module}"
            out[f"{prefix}.lora_A.weight"] = torch.randn(4, 24, generator=g)
            out[f"{prefix}.lora_B.weight"] = torch.randn(24, 4, generator=g)
    return out


def blob_of(header: dict[str, object], data: bytes) -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


def test_decode_is_one_buffer_with_safetensors_values() -> None:
    state = lora_state(1)
    blob = encode_tensors(state, F32)
    decoded = decode_tensors(blob, F32, max_decoded_bytes=CAP)
    reference = safetensors.torch.load(blob)
    assert decoded.keys() == reference.keys() == state.keys()
    for name, tensor in decoded.items():
        assert torch.equal(tensor, reference[name])
        assert torch.equal(tensor, state[name])
        assert tensor.dtype == torch.float32
        assert tensor.is_contiguous()
    flat = flat_view(decoded)
    assert flat is not None
    assert flat.numel() == sum(t.numel() for t in state.values())


def f32(shape: list[int], begin: int, end: int) -> dict[str, object]:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


@pytest.mark.parametrize(
    "header",
    [
        {"a": f32([1], 0, 4), "b": f32([1], 8, 12)},  # a gap
        {"a": f32([2], 0, 8), "b": f32([2], 4, 12)},  # an overlap
        {"a": f32([4], 0, 12)},  # the shape does not fit the bytes
        {"a": f32([3], 0, 12), "extra": 5},  # not a tensor entry
    ],
)
def test_layouts_safetensors_refuses_are_still_refused(header: dict[str, object]) -> None:
    with pytest.raises(CodecError):
        decode_tensors(blob_of(header, b"\0" * 12), F32, max_decoded_bytes=CAP)


def test_unusual_but_valid_layouts_fall_back_and_decode() -> None:
    # Tensors stored out of name order, with metadata: decoded like safetensors decodes them.
    header = {
        "__metadata__": {"format": "pt"},
        "z": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    out = decode_tensors(blob_of(header, struct.pack("<3f", 1, 2, 3)), F32, max_decoded_bytes=CAP)
    assert out.keys() == {"a", "z"}
    assert out["z"].tolist() == [1.0]
    assert out["a"].tolist() == [2.0, 3.0]
    # A float16 tensor in a float32 blob is the encoding's business: refused as before.
    f16: dict[str, object] = {"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}
    with pytest.raises(CodecError, match="dtype"):
        decode_tensors(blob_of(f16, b"\0" * 4), F32, max_decoded_bytes=CAP)


def test_duplicate_names_in_the_header_never_take_the_fast_path() -> None:
    entry = b'{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    head = b'{"a":' + entry + b',"a":' + entry + b"}"
    blob = struct.pack("<Q", len(head)) + head + b"\0" * 4
    try:
        out = decode_tensors(blob, F32, max_decoded_bytes=CAP)
    except CodecError:
        return  # refused, as safetensors does
    assert list(out) == ["a"]  # or read as safetensors reads it (never two tensors of one name)


def test_encoded_float32_blob_reads_back_exactly() -> None:
    state = {"b": torch.randn(3, 4), "a": torch.randn(0, 2), "c": torch.randn(()), "d": torch.randn(9)[::2]}
    blob = encode_tensors(state, F32)
    reference = safetensors.torch.load(blob)
    assert reference.keys() == state.keys()
    assert all(torch.equal(reference[k], state[k]) for k in state)
    zstd = TensorEncoding(dtype="float32", quantization="none", compression="zstd")
    again = decode_tensors(encode_tensors(state, zstd), zstd, max_decoded_bytes=CAP)
    assert all(torch.equal(again[k], state[k]) for k in state)


def test_flat_norm_equals_the_per_tensor_norm() -> None:
    big = {"x": torch.randn(200_000) * 1e-3, "y": torch.randn(3, 5)}
    for state in (lora_state(2), big, {"huge": torch.full((4,), 1e20)}):
        decoded = decode_tensors(encode_tensors(state, F32), F32, max_decoded_bytes=CAP)
        assert flat_view(decoded) is not None
        separate = {k: v.clone() for k, v in decoded.items()}  # own storages: the per-tensor path
        assert flat_view(separate) is None or len(separate) == 1
        assert state_l2_norm(decoded) == pytest.approx(state_l2_norm(separate), rel=1e-12)
    nan = decode_tensors(
        encode_tensors({"a": torch.tensor([1.0, math.nan])}, F32), F32, max_decoded_bytes=CAP
    )
    assert math.isnan(state_l2_norm(nan))


def test_flat_view_refuses_what_does_not_tile() -> None:
    base = torch.arange(10, dtype=torch.float32)
    assert flat_view({"a": base[:4], "b": base[4:]}) is not None
    assert flat_view({"b": base[4:], "a": base[:4]}) is None  # not in order
    assert flat_view({"a": base[:4], "b": base[5:]}) is None  # a gap
    assert flat_view({"a": base[:4].double(), "b": base[4:]}) is None  # another dtype
    assert flat_view({"a": base.view(2, 5).t()}) is None  # not contiguous
    assert flat_view({}) is None


def test_flat_weighted_sum_is_bit_identical_to_the_per_key_sum() -> None:
    global_state = {k: torch.zeros_like(v) for k, v in lora_state(0).items()}
    flat = [decode_tensors(encode_tensors(lora_state(s), F32), F32, max_decoded_bytes=CAP) for s in (1, 2, 3)]
    separate = [{k: v.clone() for k, v in d.items()} for d in flat]
    coefs = [0.3, 0.2, 0.5]
    fast, slow = weighted_sum(global_state, flat, coefs), weighted_sum(global_state, separate, coefs)
    assert list(fast) == list(slow) == list(global_state)
    for key in global_state:
        assert torch.equal(fast[key], slow[key]), key


def test_aggregate_uses_a_given_norm_and_computes_a_missing_one() -> None:
    global_state = {k: torch.zeros_like(v) for k, v in lora_state(0).items()}
    delta = lora_state(5)
    spec = AggregationSpec(max_update_norm=1.0)
    norm = state_l2_norm(delta)
    computed = aggregate(global_state, [BufferedUpdate("u", "c", delta, 1, 0)], spec)
    given = aggregate(global_state, [BufferedUpdate("u", "c", delta, 1, 0, norm)], spec)
    assert computed.norms["u"] == pytest.approx(norm)
    assert given.norms["u"] == norm
    for key in global_state:
        assert torch.equal(computed.new_global[key], given.new_global[key])


def _update(client: str, update_id: str, key: bytes) -> AdapterUpdate:
    envelope = build_update(
        federation="fed",
        client_id=client,
        spec_fingerprint="0" * 64,
        base_version=0,
        num_samples=1,
        delta=lora_state(7, layers=8),
        key=key,
        encoding=F32,
        update_id=update_id,
    )
    return envelope.data


def test_add_chunk_refuses_an_update_other_than_its_signed_chunks() -> None:
    keys = {"alice": b"a" * 32, "mallory": b"m" * 32}
    store = StaticKeyStore(keys)
    alice = _update("alice", "u1", keys["alice"])
    # Mallory chunks (and signs) alice's signed update under her own client id and update id.
    wrapped = sign_update(make_envelope(alice, source="test"), keys["alice"])
    frame = encode_frame(wrapped)
    messages = split_frame(
        frame,
        federation="fed",
        client_id="mallory",
        update_id="u9",
        chunk_bytes=4096,
        source="t",
        key=keys["mallory"],
    )
    assert len(messages) > 1
    reassembler: Reassembler[tuple[int, int]] = Reassembler(CAP, 60.0, CAP)
    for i, message in enumerate(messages[:-1]):
        assert add_chunk(reassembler, decode_frame(message, max_frame_bytes=CAP), store, (0, i), CAP) is None
    last = decode_frame(messages[-1], max_frame_bytes=CAP)
    with pytest.raises(RejectedInput) as info:
        add_chunk(reassembler, last, store, (0, len(messages) - 1), CAP)
    assert info.value.reason is RejectReason.SCHEMA_INVALID
    # Her own update, chunked by herself, goes through.
    own = split_update(wrapped, 4096, key=keys["alice"])
    whole = None
    for i, message in enumerate(own):
        whole = (
            add_chunk(reassembler, decode_frame(message, max_frame_bytes=CAP), store, (1, i), CAP) or whole
        )
    assert whole is not None
    assert whole.data.update_id == "u1"
