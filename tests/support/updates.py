"""Signed test updates (tests of the ingest route and the edge SDK)."""

from __future__ import annotations

import torch

from clients.updates import build_update
from schemas.events import AdapterUpdate, Envelope, TensorEncoding

RAW = TensorEncoding(dtype="float32", quantization="none", compression="none")


def signed_update(
    federation: str,
    client_id: str,
    key: bytes | None,
    numel: int,
    *,
    seed: int = 0,
    update_id: str | None = None,
) -> Envelope[AdapterUpdate]:
    """An update of one random float32 tensor of ``numel`` values (uncompressed: its size is ~4 x numel),
    signed with ``key`` (unsigned when None)."""
    generator = torch.Generator().manual_seed(seed)
    delta = {"layer.lora_A.weight": torch.randn(numel, generator=generator) * 1e-3}
    return build_update(
        federation=federation,
        client_id=client_id,
        spec_fingerprint="0" * 64,
        base_version=0,
        num_samples=1,
        delta=delta,
        key=key,
        encoding=RAW,
        update_id=update_id,
    )
