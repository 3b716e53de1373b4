"""schemas.codec: round trips over dtypes/quantization/compression/shapes, and every malformed input."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import safetensors.torch
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from schemas.codec import SCALE_SUFFIX, all_finite, decode_tensors, encode_tensors, sha256_hex, state_l2_norm
from schemas.errors import CodecError, PayloadTooLargeError, RejectReason
from schemas.events import TensorEncoding

MIB = 1024 * 1024
CAP = 64 * MIB
FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

RAW32 = TensorEncoding(dtype="float32", quantization="none", compression="none")
Z32 = TensorEncoding(dtype="float32", quantization="none", compression="zstd")
INT8 = TensorEncoding(quantization="int8", compression="none")
ZINT8 = TensorEncoding(quantization="int8", compression="zstd")

shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6)


def peft_key(i: int, part: str = "A") -> str:
    return f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{part}.weight"


@st.composite
def states(draw: st.DrawFn, limit: float = 1e4) -> dict[str, torch.Tensor]:
    n = draw(st.integers(min_value=1, max_value=4))
    out: dict[str, torch.Tensor] = {}
    for i in range(n):
        shape = draw(shapes)
        elements = st.floats(-limit, limit, width=32, allow_nan=False, allow_subnormal=False)
        arr = draw(hnp.arrays(np.float32, shape, elements=elements))
        out[peft_key(i, draw(st.sampled_from("AB")))] = torch.from_numpy(arr.copy())
    return out


def sample_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        peft_key(i, p): torch.randn(8 if p == "A" else 32, 32 if p == "A" else 8, generator=g)
        for i in range(3)
        for p in "AB"
    }


# ------------------------------------------------------------------------------------------ round trips


@FAST
@given(state=states(limit=6e4), dtype=st.sampled_from(["float32", "float16", "bfloat16"]), zstd=st.booleans())
def test_float_round_trip_exact_within_dtype(state: dict[str, torch.Tensor], dtype: str, zstd: bool) -> None:
    enc = TensorEncoding(dtype=dtype, quantization="none", compression="zstd" if zstd else "none")
    out = decode_tensors(encode_tensors(state, enc), enc, max_decoded_bytes=CAP)
    assert out.keys() == state.keys()
    torch_dtype = getattr(torch, dtype)
    for name, original in state.items():
        got = out[name]
        assert got.dtype == torch.float32
        assert got.shape == original.shape
        assert got.is_contiguous()
        assert torch.equal(got, original.to(torch_dtype).to(torch.float32))


@FAST
@given(state=states(), zstd=st.booleans())
def test_int8_round_trip_within_half_a_scale(state: dict[str, torch.Tensor], zstd: bool) -> None:
    enc = TensorEncoding(quantization="int8", compression="zstd" if zstd else "none")
    out = decode_tensors(encode_tensors(state, enc), enc, max_decoded_bytes=CAP)
    assert out.keys() == state.keys()
    for name, x in state.items():
        got = out[name]
        assert got.dtype == torch.float32
        assert got.shape == x.shape
        if x.numel() == 0:
            continue
        if x.dim() == 2:
            scale = (
                (x.abs().amax(dim=1) / 127.0).unsqueeze(1).expand_as(x) if x.shape[1] else torch.zeros_like(x)
            )
        else:
            scale = (x.abs().max() / 127.0).expand_as(x)
        tolerance = scale / 2 * (1 + 1e-5) + 1e-6
        assert bool(((got - x).abs() <= tolerance).all())


def test_int8_is_per_row_for_matrices() -> None:
    x = torch.tensor([[1000.0, 1.0], [0.01, -0.02], [0.0, 0.0]])
    out = decode_tensors(encode_tensors({"w": x}, INT8), INT8, max_decoded_bytes=CAP)["w"]
    assert torch.allclose(out[1], x[1], atol=0.02 / 254 + 1e-9)  # the small row keeps its precision
    assert torch.equal(out[2], torch.zeros(2))
    raw = safetensors.torch.load(encode_tensors({"w": x}, INT8))
    assert raw["w"].dtype == torch.int8
    assert raw["w" + SCALE_SUFFIX].shape == (3,)


def test_compression_shrinks_redundant_data() -> None:
    state = {"w": torch.zeros(256, 256)}
    assert len(encode_tensors(state, Z32)) < len(encode_tensors(state, RAW32)) // 10


def test_odd_inputs_are_normalized() -> None:
    base = torch.randn(16, 8)
    state = {
        "t": base.t(),  # non-contiguous
        "view": base[2],  # shares storage with "t"
        "grad": torch.randn(4, requires_grad=True),
        "f64": torch.randn(3, dtype=torch.float64),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    for enc in (RAW32, ZINT8):
        out = decode_tensors(encode_tensors(state, enc), enc, max_decoded_bytes=CAP)
        assert {k: tuple(v.shape) for k, v in out.items()} == {k: tuple(v.shape) for k, v in state.items()}
    out = decode_tensors(encode_tensors(state, RAW32), RAW32, max_decoded_bytes=CAP)
    assert torch.equal(out["t"], base.t())
    assert torch.equal(out["view"], base[2])


def test_encoding_is_deterministic() -> None:
    assert encode_tensors(sample_state(), ZINT8) == encode_tensors(sample_state(), ZINT8)


# ------------------------------------------------------------------------------------------ helpers


def test_helpers() -> None:
    state = sample_state()
    flat = torch.cat([t.flatten() for t in state.values()]).double()
    assert state_l2_norm(state) == pytest.approx(float(flat.norm()), rel=1e-9)
    assert all_finite(state)
    assert sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_nan_passes_the_codec_but_not_all_finite() -> None:
    state = {"w": torch.tensor([1.0, math.nan, math.inf])}
    for enc in (RAW32, Z32, TensorEncoding(dtype="float16", compression="none")):
        out = decode_tensors(encode_tensors(state, enc), enc, max_decoded_bytes=CAP)
        assert not all_finite(out)
        assert math.isnan(state_l2_norm(out))


def test_int8_refuses_non_finite() -> None:
    with pytest.raises(CodecError, match="non-finite"):
        encode_tensors({"w": torch.tensor([1.0, math.inf])}, INT8)


# ------------------------------------------------------------------------------------------ encoder refusals


@pytest.mark.parametrize(
    "state",
    [
        {},
        {"w": torch.ones(2, dtype=torch.int64)},
        {"w": torch.ones(2, dtype=torch.bool)},
        {"": torch.ones(2)},
        {"__metadata__": torch.ones(2)},
        {"w": [1.0, 2.0]},
    ],
)
def test_encoder_refuses_bad_state(state: dict[str, torch.Tensor]) -> None:
    with pytest.raises(CodecError):
        encode_tensors(state, RAW32)


def test_encoder_refuses_scale_suffix_names_for_int8() -> None:
    with pytest.raises(CodecError, match="must not end with"):
        encode_tensors({"w": torch.ones(2), "w" + SCALE_SUFFIX: torch.ones(())}, INT8)


# ------------------------------------------------------------------------------------------ decoder refusals


def decode(data: bytes, enc: TensorEncoding = RAW32, cap: int = CAP) -> dict[str, torch.Tensor]:
    return decode_tensors(data, enc, max_decoded_bytes=cap)


@pytest.mark.parametrize("enc", [RAW32, Z32, INT8, ZINT8])
def test_truncated_blobs_are_codec_errors(enc: TensorEncoding) -> None:
    blob = encode_tensors(sample_state(), enc)
    for cut in (0, 1, 4, 8, 9, 20, len(blob) // 2, len(blob) - 1):
        with pytest.raises(CodecError) as info:
            decode(blob[:cut], enc)
        assert info.value.reason is RejectReason.MALFORMED


@pytest.mark.parametrize("enc", [RAW32, Z32, INT8, ZINT8])
def test_garbage_and_junk(enc: TensorEncoding) -> None:
    blob = encode_tensors(sample_state(), enc)
    for bad in (b"garbage" * 10, b"\x00" * 64, blob + b"junk", b"\xff" * 8 + blob):
        with pytest.raises(CodecError):
            decode(bad, enc)


@FAST
@given(data=st.binary(max_size=512), enc=st.sampled_from([RAW32, Z32, INT8, ZINT8]))
def test_arbitrary_bytes_never_crash(data: bytes, enc: TensorEncoding) -> None:
    with contextlib.suppress(CodecError):
        decode(data, enc)


@FAST
@given(data=st.data(), enc=st.sampled_from([RAW32, Z32, INT8, ZINT8]))
def test_bit_flips_never_crash(data: st.DataObject, enc: TensorEncoding) -> None:
    blob = bytearray(encode_tensors(sample_state(), enc))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] ^= 1 << data.draw(st.integers(0, 7))
    with contextlib.suppress(CodecError):
        decode(bytes(blob), enc)


@pytest.mark.parametrize("write_content_size", [True, False])
def test_zstd_bomb_is_bounded(write_content_size: bool) -> None:
    bomb = zstandard.ZstdCompressor(level=3, write_content_size=write_content_size).compress(
        b"\0" * (64 * MIB)
    )
    assert len(bomb) < 64 * 1024
    with pytest.raises(PayloadTooLargeError) as info:
        decode(bomb, Z32, cap=1 * MIB)
    assert info.value.reason is RejectReason.OVERSIZED


def test_size_caps() -> None:
    blob = encode_tensors({"w": torch.zeros(1024, 256)}, RAW32)  # 1 MiB of fp32
    with pytest.raises(PayloadTooLargeError):
        decode(blob, RAW32, cap=len(blob) - 1)
    fp16 = TensorEncoding(dtype="float16", compression="none")
    half = encode_tensors({"w": torch.zeros(1024, 256)}, fp16)  # 0.5 MiB stored, 1 MiB as fp32
    with pytest.raises(PayloadTooLargeError, match="decoded tensors"):
        decode(half, fp16, cap=len(half) + 1024)


def test_dtype_must_match_the_encoding() -> None:
    blob = encode_tensors({"w": torch.ones(4)}, RAW32)
    with pytest.raises(CodecError, match="dtype"):
        decode(blob, TensorEncoding(dtype="float16", compression="none"))
    ints = safetensors.torch.save({"w": torch.ones(4, dtype=torch.int32)})
    with pytest.raises(CodecError, match="dtype"):
        decode(ints, RAW32)


def test_empty_blob_is_refused() -> None:
    with pytest.raises(CodecError, match="no tensors"):
        decode(safetensors.torch.save({}), RAW32)


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        ({"w": torch.ones(2, 2, dtype=torch.int8)}, "without its scale"),
        ({"w" + SCALE_SUFFIX: torch.ones(())}, "scales without a tensor"),
        ({"w": torch.ones(2, dtype=torch.int8), "x" + SCALE_SUFFIX: torch.ones(())}, "scales without"),
        ({"w": torch.ones(2, 3, dtype=torch.int8), "w" + SCALE_SUFFIX: torch.ones(3)}, "scale shape"),
        ({"w": torch.ones(2, 3, dtype=torch.int8), "w" + SCALE_SUFFIX: torch.ones(())}, "scale shape"),
        ({"w": torch.ones(2, dtype=torch.int8), "w" + SCALE_SUFFIX: torch.ones(2)}, "scale shape"),
        (
            {"w": torch.ones(2, dtype=torch.int8), "w" + SCALE_SUFFIX: torch.ones((), dtype=torch.float16)},
            "scale dtype",
        ),
        ({"w": torch.ones(2), "w" + SCALE_SUFFIX: torch.ones(())}, "dtype"),
        (
            {
                "w": torch.ones(2, dtype=torch.int8),
                "w" + SCALE_SUFFIX: torch.ones(()),
                "w" + SCALE_SUFFIX + SCALE_SUFFIX: torch.ones(()),
            },
            "scales without",
        ),
    ],
)
def test_malformed_int8_blobs(tensors: dict[str, torch.Tensor], match: str) -> None:
    with pytest.raises(CodecError, match=match):
        decode(safetensors.torch.save(tensors), INT8)
