"""Synthetic, LoRA-shaped fp32 adapter updates for ``pfi bench aggregator`` (see :mod:`bench.aggregator`).

An update of "size" S is a PEFT-keyed LoRA delta whose fp32 tensors hold S bytes in total (q_proj and
v_proj per layer, ``A: [r, d]``, ``B: [d, r]``): 32 MiB is LLaMA-7B-like (d = 4096, r = 16, 32 layers),
4 MiB TinyLlama-like (d = 2048, r = 8), 64 KiB a small model (d = 512, r = 4). Updates travel
uncompressed fp32 (``compression="none"``: random deltas do not compress), so the wire payload is S
plus the safetensors header, and are signed with the client's derived key like a real edge agent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from bench.common import MIB, BenchError
from schemas.events import AggregationSpec, FederationSpec, LoraSpec, TensorEncoding

KIB = 1024
ENCODING = TensorEncoding(dtype="float32", quantization="none", compression="none")
BASE_MODEL = "bench/synthetic-lora"
MODULES = ("q_proj", "v_proj")
# (minimum size, hidden dim d, rank r): the first row whose size fits is used.
MAX_STALENESS = AggregationSpec().max_staleness
_SHAPES = ((32 * MIB, 4096, 16), (4 * MIB, 2048, 8), (64 * KIB, 512, 4), (0, 64, 4))


def parse_size(text: str) -> int:
    """``64K`` / ``4M`` / ``32MiB`` / ``1024`` -> bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)(?:i?[bB])?\s*", text)
    if match is None:
        raise BenchError(f"not a size: {text!r} (e.g. 64K, 4M, 32M)")
    value = int(match.group(1)) * {"": 1, "k": KIB, "m": MIB}[match.group(2).lower()]
    if value < 1024:
        raise BenchError(f"size {text!r} is below 1 KiB")
    return value


def size_label(size: int) -> str:
    if size % MIB == 0:
        return f"{size // MIB}m"
    return f"{size // KIB}k" if size % KIB == 0 else f"{size}b"


def lora_shapes(size: int) -> dict[str, tuple[int, ...]]:
    """PEFT-keyed LoRA tensor shapes holding ``size`` bytes of fp32 (rounded down to whole layers, >= 1)."""
    _, d, r = next(row for row in _SHAPES if size >= row[0])
    per_layer = len(MODULES) * 2 * r * d * 4
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(max(1, size // per_layer)):
        for module in MODULES:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            shapes[f"{prefix}.lora_A.weight"] = (r, d)
            shapes[f"{prefix}.lora_B.weight"] = (d, r)
    return shapes


def tensor_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    total = 0
    for shape in shapes.values():
        n = 1
        for dim in shape:
            n *= dim
        total += 4 * n
    return total


def random_delta(
    shapes: dict[str, tuple[int, ...]], seed: int, scale: float = 1e-3
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen).mul_(scale) for k, s in shapes.items()}


@dataclass(frozen=True)
class SizePoint:
    """One size of the benchmark: its federation, shapes and how many updates go through Kafka."""

    size: int
    updates: int
    federation: str
    shapes: dict[str, tuple[int, ...]]
    rank: int

    @property
    def label(self) -> str:
        return size_label(self.size)

    @property
    def payload_bytes(self) -> int:
        return tensor_bytes(self.shapes)

    def spec(self, buffer_size: int) -> FederationSpec:
        return FederationSpec(
            name=self.federation,
            base_model=BASE_MODEL,
            lora=LoraSpec(rank=self.rank, alpha=2.0 * self.rank, target_modules=MODULES),
            # FedBuff as the service runs it by default (clip mode, uniform weighting, no optimizer),
            # with a long flush timeout so that only full buffers flush, and few retained blobs. Every
            # bench update is based on v0, so max_staleness covers all M/K versions (no TOO_STALE).
            # The bench's CLIENTS (8) send round robin, fewer than K: each may fill its share of a buffer.
            aggregation=AggregationSpec(
                buffer_size=buffer_size,
                max_client_updates=buffer_size,
                flush_timeout_s=600.0,
                keep_versions=2,
                max_staleness=max(MAX_STALENESS, self.updates // buffer_size),
            ),
        )


def size_point(size: int, updates: int, tag: str) -> SizePoint:
    shapes = lora_shapes(size)
    rank = next(iter(shapes.values()))[0]
    return SizePoint(size, updates, f"bench-agg-{tag}-{size_label(size)}", shapes, rank)
