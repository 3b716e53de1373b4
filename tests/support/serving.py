"""Helpers of the serving tests that need no aggregator or edge client: a federation on the tiny model,
its global state, random adapters."""

from __future__ import annotations

import uuid

import torch

from modeling.blobs import BLOB_ENCODING
from schemas.codec import decode_tensors
from schemas.events import AggregationSpec, FederationSpec, LoraSpec
from services.federation.admin import create_federation
from services.store.versions import VersionStore

TINY = "pfi/tiny-llama"


async def tiny_federation(store: VersionStore) -> FederationSpec:
    spec = FederationSpec(
        name=f"fed-{uuid.uuid4().hex[:8]}",
        base_model=TINY,
        lora=LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj")),
        aggregation=AggregationSpec(buffer_size=3, flush_timeout_s=60.0),
    )
    await create_federation(store, spec)
    return spec


async def global_state(store: VersionStore, name: str, version: int | None = None) -> dict[str, torch.Tensor]:
    v = await store.latest(name) if version is None else version
    assert v is not None
    blob = await store.get_blob(name, v)
    assert blob is not None
    return decode_tensors(blob, BLOB_ENCODING, max_decoded_bytes=1 << 30)


def shapes_of(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def random_state(
    shapes: dict[str, tuple[int, ...]], seed: int, scale: float = 0.5
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) * scale for k, s in shapes.items()}
