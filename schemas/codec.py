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
import json
import math
import struct
from collections.abc import Mapping

import numpy as np
import safetensors.torch
import torch
import zstandard

from schemas.errors import CodecError, PayloadTooLargeError
from schemas.events import TensorEncoding

SCALE_SUFFIX = "#int8_scale"
# Level 1: adapter deltas are float noise that every level compresses alike (measured: 0.914 at level 3, 0.914
# at 1, for 64 KiB of fp32) at twice the speed (4 MiB: 30 ms at level 3, 15 ms at 1).
ZSTD_LEVEL = 1

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_U64 = struct.Struct("<Q")
_NORM_CHUNK = 1 << 16  # float32 values per float64 norm call (256 KiB: stays in cache)
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_MAX_EXPANSION = 1 << 16  # zstd emits at most ~32 KiB per input byte (RLE blocks); keep a margin


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def state_l2_norm(state: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm over every tensor of ``state`` (accumulated in float64; NaN/inf propagate).

    When the tensors tile one contiguous float32 buffer in order (what :func:`decode_tensors` returns),
    the norm is one float64 pass over that buffer instead of one call per tensor (issue 15)."""
    flat = flat_view(state)
    if flat is not None:
        if flat.numel() <= _NORM_CHUNK:
            return float(torch.linalg.vector_norm(flat, dtype=torch.float64))
        # In cache-sized pieces: one float64 pass over millions of values is 3x slower than this.
        squares = 0.0
        for piece in torch.split(flat, _NORM_CHUNK):
            norm = float(torch.linalg.vector_norm(piece, dtype=torch.float64))
            squares += norm * norm
        return math.sqrt(squares)
    total = 0.0
    for tensor in state.values():
        norm = float(torch.linalg.vector_norm(tensor.detach(), dtype=torch.float64))
        total += norm * norm
    return math.sqrt(total)


def flat_view(state: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """A 1-D float32 view of the memory the tensors of ``state`` tile back to back (in the mapping's
    order, each contiguous, all inside the first one's storage), or None."""
    tensors = list(state.values())
    if not tensors:
        return None
    first = tensors[0]
    if first.device.type != "cpu":
        return None
    f32 = torch.float32
    ptr = first.data_ptr()
    total = 0
    for t in tensors:
        if t.dtype is not f32 or t.requires_grad or not t.is_contiguous() or t.data_ptr() != ptr:
            return None
        n = t.numel()
        ptr += 4 * n
        total += n
    storage = first.untyped_storage()
    offset = first.storage_offset()
    if 4 * (offset + total) > storage.nbytes():
        return None  # the next tensor only happens to lie next to the first one's storage
    flat: torch.Tensor = torch.empty(0, dtype=f32).set_(storage, offset, (total,), (1,))
    return flat


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
    fast = _serialize_f32(tensors)
    if fast is not None:
        return fast
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


def _serialize_f32(tensors: dict[str, torch.Tensor]) -> bytes | None:
    """A safetensors blob of float32 CPU tensors written directly (one copy of the values, in the
    dict's order; readers find tensors by their offsets), or None for anything else."""
    header: dict[str, dict[str, object]] = {}
    parts: list[torch.Tensor] = []
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype != torch.float32 or tensor.device.type != "cpu" or tensor.requires_grad:
            return None
        size = 4 * tensor.numel()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        parts.append(tensor.reshape(-1))
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # safetensors pads its header to 8 bytes: the values stay aligned
    flat = flat_view(tensors)
    values = flat if flat is not None else torch.cat(parts) if parts else torch.empty(0)
    return b"".join((_U64.pack(len(head)), head, values.numpy().tobytes()))


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


_MAX_FAST_HEADER = 16 << 20


def _strict_object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def _load_f32(blob: bytes, max_decoded_bytes: int) -> dict[str, torch.Tensor] | None:
    """The common case of :func:`decode_tensors` (an all-``F32`` safetensors blob, tensors back to back)
    in one copy: one float32 buffer, every tensor a view of it (so :func:`state_l2_norm` is one pass).
    None for anything else, which then takes the safetensors path (and its errors): this parser only
    ever accepts a layout safetensors accepts too, with the same names, shapes, values and order."""
    if len(blob) < 8:
        return None
    (header_len,) = _U64.unpack_from(blob, 0)
    if header_len > _MAX_FAST_HEADER or 8 + header_len > len(blob):
        return None
    try:
        header = json.loads(blob[8 : 8 + header_len].decode("utf-8"), object_pairs_hook=_strict_object)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(header, dict):
        return None
    data_len = len(blob) - 8 - header_len
    entries: list[tuple[int, int, str, tuple[int, ...]]] = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                return None
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            return None
        shape, offsets = info["shape"], info["data_offsets"]
        if info["dtype"] != "F32" or not isinstance(shape, list) or not isinstance(offsets, list):
            return None
        if not all(type(d) is int and d >= 0 for d in shape) or len(offsets) != 2:
            return None
        begin, end = offsets
        if type(begin) is not int or type(end) is not int or not 0 <= begin <= end:
            return None
        if end - begin != 4 * math.prod(shape):
            return None
        entries.append((begin, end, name, tuple(shape)))
    if not entries:
        return None
    by_offset = sorted(entries)
    position = 0
    for begin, end, _, _ in by_offset:
        if begin != position:
            return None  # a gap or an overlap: safetensors decides (it refuses)
        position = end
    if position != data_len:
        return None
    if data_len > max_decoded_bytes:
        raise PayloadTooLargeError(f"decoded tensors need {data_len} bytes, cap {max_decoded_bytes}")
    values = torch.from_numpy(
        np.frombuffer(blob, dtype="<f4", count=data_len // 4, offset=8 + header_len).copy()
    )
    # In offset order (safetensors returns its tensors in no fixed order): the views tile ``values``.
    return {name: values[begin // 4 : end // 4].view(shape) for begin, end, name, shape in by_offset}


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
    if encoding.quantization == "none" and encoding.dtype == "float32":
        fast = _load_f32(blob, max_decoded_bytes)
        if fast is not None:
            return fast
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
