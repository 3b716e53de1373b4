"""Where an agent keeps its user's personal adapter (it never leaves the device).

:class:`DiskPersonalStore`: ``<state_dir>/<user>/personal.safetensors``, fp32, written atomically, with
the federation spec's fingerprint in its metadata (an adapter of another spec is moved aside).
:class:`MemoryPersonalStore`: in memory (a simulated fleet).
"""

from __future__ import annotations

import json
import logging
import struct
import time
from pathlib import Path
from typing import Protocol

import safetensors.torch
import torch

from clients.files import atomic_write
from modeling.lora import StateDict
from schemas.codec import decode_tensors
from schemas.errors import CodecError
from schemas.events import TensorEncoding

log = logging.getLogger("pfi.edge")

PERSONAL_FILE = "personal.safetensors"
_RAW_F32 = TensorEncoding(dtype="float32", quantization="none", compression="none")


class PersonalStore(Protocol):
    """Where an agent keeps its user's personal adapter (it never leaves the device)."""

    def load(self, user_id: str, fingerprint: str) -> StateDict | None: ...

    def save(self, user_id: str, fingerprint: str, state: StateDict) -> None: ...


def _safetensors_metadata(blob: bytes) -> dict[str, str]:
    if len(blob) < 8:
        raise CodecError("too short for a safetensors file")
    (size,) = struct.unpack_from("<Q", blob, 0)
    if size > len(blob) - 8:
        raise CodecError("safetensors header length past the end of the file")
    header = json.loads(blob[8 : 8 + size])
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise CodecError("safetensors metadata is not an object")
    return {str(k): str(v) for k, v in meta.items()}


class DiskPersonalStore:
    """``<state_dir>/<user>/personal.safetensors`` (fp32 safetensors, read back through
    :func:`schemas.codec.decode_tensors`), written atomically (tmp + fsync + rename). The file records
    the federation spec's fingerprint; an adapter of another spec is moved aside and a fresh one used."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def path(self, user_id: str) -> Path:
        return self.state_dir / user_id / PERSONAL_FILE

    def load(self, user_id: str, fingerprint: str) -> StateDict | None:
        path = self.path(user_id)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            meta = _safetensors_metadata(blob)
            state = decode_tensors(blob, _RAW_F32, max_decoded_bytes=max(len(blob) * 2, 1 << 20))
        except (CodecError, ValueError) as err:
            aside = path.with_name(f"{PERSONAL_FILE}.corrupt-{time.time_ns()}")
            path.rename(aside)
            log.error("personal adapter %s is unreadable (%s); moved to %s, starting fresh", path, err, aside)
            return None
        if meta.get("spec_fingerprint") != fingerprint:
            old = meta.get("spec_fingerprint", "unknown")[:12]
            aside = path.with_name(f"{PERSONAL_FILE}.spec-{old}")
            path.rename(aside)
            log.warning(
                "personal adapter %s belongs to another federation spec (%s); kept as %s, starting fresh",
                path,
                old,
                aside,
            )
            return None
        return state

    def save(self, user_id: str, fingerprint: str, state: StateDict) -> None:
        tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
        meta = {"spec_fingerprint": fingerprint, "user_id": user_id, "saved_at": f"{time.time():.3f}"}
        atomic_write(self.path(user_id), bytes(safetensors.torch.save(tensors, metadata=meta)))


class MemoryPersonalStore:
    """Personal adapters in memory (a fleet simulation: per virtual client, only its adapter)."""

    def __init__(self) -> None:
        self._states: dict[str, tuple[str, StateDict]] = {}

    def load(self, user_id: str, fingerprint: str) -> StateDict | None:
        entry = self._states.get(user_id)
        return entry[1] if entry is not None and entry[0] == fingerprint else None

    def save(self, user_id: str, fingerprint: str, state: StateDict) -> None:
        self._states[user_id] = (fingerprint, state)

    def __len__(self) -> int:
        return len(self._states)
