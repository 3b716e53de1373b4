"""Frame surgery: take a framed event apart and put (possibly altered) parts back together."""

from __future__ import annotations

import json
import struct
from typing import Any

from schemas.events import TensorEncoding
from schemas.frame import MAGIC

INT8 = TensorEncoding(quantization="int8", compression="none")


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def canonical(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def parts_of(frame: bytes) -> tuple[dict[str, Any], bytes]:
    (size,) = struct.unpack_from(">I", frame, len(MAGIC))
    start = len(MAGIC) + 4
    header: dict[str, Any] = json.loads(frame[start : start + size])
    return header, frame[start + size :]


def make_frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    body = canonical(header)
    return MAGIC + u32(len(body)) + body + payload


def lying_safetensors(name: str) -> bytes:
    header = json.dumps(
        {name: {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4000000]}}
    ).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * 64
