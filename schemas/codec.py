"""Adapter state dicts (``dict[str, Tensor]``, keyed like PEFT's) ⇄ bytes.

Layout: one safetensors blob (``safetensors.torch.save``), optionally zstd-compressed as a single
zstd frame. :class:`~schemas.events.TensorEncoding` says how:

* ``dtype`` — tensors are cast to float32/float16/bfloat16 before saving; the decoder requires
  every stored tensor to have exactly that dtype.
* ``quantization="int8"`` — symmetric int8. A 2-D tensor ``[rows, cols]`` gets one scale per row
  (LoRA ``A`` is ``[r, in]``, ``B`` is ``[out, r]``: per-row keeps one outlier row from flattening
  the others); any other rank gets one scalar scale. ``q = round(x / s)`` clamped to ``[-127, 127]``
  with ``s = max|row| / 127`` (``s = 0`` for an all-zero row), so ``|x - q·s| <= s / 2``. The blob
  holds ``<name>`` (int8) and ``<name>#int8_scale`` (float32, shape ``[rows]`` or ``[]``). ``#``
  never occurs in a PEFT key (module paths are dotted identifiers); the encoder refuses keys that
  end with the suffix and the decoder refuses orphan scales, missing scales and wrong scale
  shapes/dtypes, so a name can never be read as another tensor's scale. ``dtype`` is ignored for
  int8 (scales are always float32). Non-finite values cannot be quantized: encoding refuses them.
* ``compression="zstd"`` — decompression is streamed with a hard output cap
  (``max_decoded_bytes``), so a zstd bomb raises :class:`PayloadTooLargeError` after at most a few
  MiB past the cap instead of exhausting memory.

Decoded tensors are always float32 (the aggregator does its math in fp32), contiguous, on CPU.
``max_decoded_bytes`` bounds both the decompressed blob and the float32 output.

Empty state dicts are refused (an update without tensors means nothing); zero-size dimensions
(``[0, 4]``) round trip. Non-finite float values pass the codec unchanged (use :func:`all_finite`:
rejecting them is the aggregator's job, with the NON_FINITE reason). Every malformed input raises
:class:`CodecError`; nothing else escapes the decoder.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import safetensors.torch
import torch
import zstandard

from schemas.errors import CodecError, PayloadTooLargeError
from schemas.events import TensorEncoding

SCALE_SUFFIX = "#int8_scale"
ZSTD_LEVEL = 3

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_MAX_EXPANSION = 1 << 16  # zstd emits at most ~32 KiB per input byte (RLE blocks); keep a margin


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def state_l2_norm(state: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm over every tensor of ``state`` (accumulated in float64; NaN/inf propagate)."""
    total = 0.0
    for tensor in state.values():
        norm = float(torch.linalg.vector_norm(tensor.detach(), dtype=torch.float64))
        total += norm * norm
    return math.sqrt(total)


def all_finite(state: Mapping[str, torch.Tensor]) -> bool:
    """True when no tensor of ``state`` holds a NaN or an infinity."""
    return all(bool(torch.isfinite(t.detach()).all()) for t in state.values())


# --------------------------------------------------------------------------------------------- encode


def _prepare(name: object, tensor: object) -> torch.Tensor:
    if not isinstance(name, str) or not name or name == "__metadata__":
        raise CodecError(f"tensor names must be non-empty strings other than __metadata__, got {name!r}")
    if not isinstance(tensor, torch.Tensor):
        raise CodecError(f"{name}: not a tensor ({type(tensor).__name__})")
    if not tensor.is_floating_point():
        raise CodecError(f"{name}: dtype {tensor.dtype} is not a floating point dtype")
    return tensor.detach().to("cpu")


def _quantize(name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = tensor.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise CodecError(f"{name}: non-finite values cannot be int8-quantized")
    if x.dim() == 2:
        amax = x.abs().amax(dim=1) if x.shape[1] > 0 else torch.zeros(x.shape[0])
        scale = amax / 127.0
        divisor = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
    else:
        amax = x.abs().max() if x.numel() > 0 else torch.zeros(())
        scale = (amax / 127.0).reshape(())
        divisor = scale if float(scale) > 0 else torch.ones(())
    q = torch.round(x / divisor).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(torch.float32)


def _serialize(tensors: dict[str, torch.Tensor]) -> bytes:
    # safetensors refuses tensors sharing storage and non-contiguous ones: give each its own buffer.
    seen: set[tuple[int, int]] = set()
    ready: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        t = tensor.contiguous()
        if t.numel() > 0:
            ident = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if ident in seen:
                t = t.clone()
            seen.add(ident)
        ready[name] = t
    try:
        blob = safetensors.torch.save(ready)
    except Exception as err:  # safetensors raises RuntimeError/ValueError/SafetensorError
        raise CodecError(f"safetensors refused the state dict: {err}") from None
    return bytes(blob)


def encode_tensors(state: Mapping[str, torch.Tensor], encoding: TensorEncoding) -> bytes:
    """Serialize ``state`` as ``encoding`` says. Raises :class:`CodecError` for unusable input."""
    if len(state) == 0:
        raise CodecError("refusing to encode an empty state dict")
    out: dict[str, torch.Tensor] = {}
    if encoding.quantization == "int8":
        for name, tensor in state.items():
            t = _prepare(name, tensor)
            if name.endswith(SCALE_SUFFIX):
                raise CodecError(f"{name}: tensor names must not end with {SCALE_SUFFIX!r}")
            out[name], out[name + SCALE_SUFFIX] = _quantize(name, t)
    else:
        dtype = _DTYPES[encoding.dtype]
        for name, tensor in state.items():
            out[name] = _prepare(name, tensor).to(dtype)
    blob = _serialize(out)
    if encoding.compression == "zstd":
        return bytes(zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(blob))
    return blob


# --------------------------------------------------------------------------------------------- decode


def _decompress(data: bytes, max_decoded_bytes: int) -> bytes:
    if data[:4] != _ZSTD_MAGIC:
        raise CodecError("not a zstd frame (bad magic)")
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as err:
        raise CodecError(f"bad zstd frame header: {err}") from None
    if declared > max_decoded_bytes:  # -1 when the header does not say
        raise PayloadTooLargeError(f"zstd frame declares {declared} bytes, cap {max_decoded_bytes}")
    dobj = zstandard.ZstdDecompressor().decompressobj()
    view = memoryview(data)
    parts: list[bytes] = []
    produced = 0
    pos = 0
    try:
        while pos < len(view) and not dobj.eof:
            # Feed little enough input that one call cannot overshoot the cap by much.
            step = max(64, min(1 << 20, (max_decoded_bytes - produced) // _MAX_EXPANSION))
            out = dobj.decompress(view[pos : pos + step])
            pos += step
            produced += len(out)
            if produced > max_decoded_bytes:
                raise PayloadTooLargeError(
                    f"decompressed payload exceeds the cap of {max_decoded_bytes} bytes"
                )
            parts.append(out)
    except zstandard.ZstdError as err:
        raise CodecError(f"corrupt zstd data: {err}") from None
    if not dobj.eof:
        raise CodecError("truncated zstd frame")
    if pos < len(view) or dobj.unused_data:
        raise CodecError("trailing bytes after the zstd frame")
    return b"".join(parts)


def _load(blob: bytes) -> dict[str, torch.Tensor]:
    try:
        loaded = safetensors.torch.load(blob)
    except Exception as err:  # SafetensorError and friends: never let them escape
        raise CodecError(f"not a safetensors blob: {err}") from None
    if not isinstance(loaded, dict):
        raise CodecError("safetensors blob did not decode to a dict")
    return {str(k): v for k, v in loaded.items()}


def _dequantize(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    scales = {n[: -len(SCALE_SUFFIX)]: t for n, t in raw.items() if n.endswith(SCALE_SUFFIX)}
    values = {n: t for n, t in raw.items() if not n.endswith(SCALE_SUFFIX)}
    orphans = sorted(set(scales) - set(values))
    if orphans:
        raise CodecError(f"int8 blob has scales without a tensor (name collision?): {orphans[:3]}")
    out: dict[str, torch.Tensor] = {}
    for name, q in values.items():
        scale = scales.get(name)
        if scale is None:
            raise CodecError(f"{name}: int8 tensor without its scale")
        if q.dtype != torch.int8:
            raise CodecError(f"{name}: dtype {q.dtype} in an int8 blob")
        if scale.dtype != torch.float32:
            raise CodecError(f"{name}: scale dtype {scale.dtype}, expected float32")
        want = torch.Size([q.shape[0]]) if q.dim() == 2 else torch.Size([])
        if scale.shape != want:
            raise CodecError(f"{name}: scale shape {tuple(scale.shape)}, expected {tuple(want)}")
        factor = scale.unsqueeze(1) if q.dim() == 2 else scale
        out[name] = (q.to(torch.float32) * factor).contiguous()
    return out


def decode_tensors(
    data: bytes, encoding: TensorEncoding, *, max_decoded_bytes: int
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode_tensors`: float32 CPU tensors.

    Raises :class:`PayloadTooLargeError` when the (decompressed) blob or the float32 output would
    exceed ``max_decoded_bytes``, :class:`CodecError` for anything malformed.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_decoded_bytes:
        raise PayloadTooLargeError(f"payload of {len(data)} bytes exceeds the cap of {max_decoded_bytes}")
    blob = _decompress(data, max_decoded_bytes) if encoding.compression == "zstd" else data
    raw = _load(blob)
    if not raw:
        raise CodecError("the blob holds no tensors")
    if encoding.quantization == "int8":
        fp32_bytes = sum(t.numel() * 4 for n, t in raw.items() if not n.endswith(SCALE_SUFFIX))
        if fp32_bytes > max_decoded_bytes:
            raise PayloadTooLargeError(f"decoded tensors need {fp32_bytes} bytes, cap {max_decoded_bytes}")
        return _dequantize(raw)
    dtype = _DTYPES[encoding.dtype]
    fp32_bytes = sum(t.numel() * 4 for t in raw.values())
    if fp32_bytes > max_decoded_bytes:
        raise PayloadTooLargeError(f"decoded tensors need {fp32_bytes} bytes, cap {max_decoded_bytes}")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        if tensor.dtype != dtype:
            raise CodecError(f"{name}: dtype {tensor.dtype}, the encoding says {encoding.dtype}")
        out[name] = tensor.to(torch.float32).contiguous()
    return out
