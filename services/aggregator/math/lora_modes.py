"""How LoRA factors are merged across clients.

A LoRA module adds ``ΔW = B·A`` (scaled by ``alpha/rank``) to a frozen weight. Averaging the
factors independently (``fedit``, FedIT; Zhang et al. 2024) is the inexact baseline:
``(avg B)(avg A) ≠ avg(B·A)`` in general. FFA-LoRA (Sun et al. 2024) freezes ``A`` at its v0
initialization for every client, so only ``B`` is trained and shared; the product is linear in
``B`` and the merge is exact: ``avg(B_i)·A = avg(B_i·A)``.

``ffa`` therefore drops every ``lora_A`` entry of a delta (a well-behaved FFA client sends a zero
or no ``A`` delta anyway); the aggregator leaves the global ``A`` untouched. Other entries (``lora_B``,
and plain trainable tensors such as ``modules_to_save`` heads, whose average is exact too) are kept.
"""

from __future__ import annotations

import re
from typing import Literal

import torch

from modeling.lora import StateDict

LoraMode = Literal["fedit", "ffa"]

_LORA_A = re.compile(r"(?:^|\.)lora_(?:embedding_)?A(?:\.|$)")
_LORA_B = re.compile(r"(?:^|\.)lora_(?:embedding_)?B(?:\.|$)")


def is_lora_a(key: str) -> bool:
    """Whether ``key`` names a LoRA down-projection ``A`` (``lora_A`` / ``lora_embedding_A``)."""
    return _LORA_A.search(key) is not None


def is_lora_b(key: str) -> bool:
    """Whether ``key`` names a LoRA up-projection ``B`` (``lora_B`` / ``lora_embedding_B``)."""
    return _LORA_B.search(key) is not None


def project_delta(delta: StateDict, mode: LoraMode) -> StateDict:
    """The part of a client delta that ``mode`` aggregates (a new dict; tensors are shared, not copied).

    ``fedit``: every entry (``A`` and ``B`` are averaged independently). ``ffa``: every entry but the
    ``lora_A`` ones, so the global ``A`` stays frozen at v0 and the merge of ``B`` is exact.
    """
    if mode == "fedit":
        return dict(delta)
    if mode == "ffa":
        return {k: v for k, v in delta.items() if not is_lora_a(k)}
    raise ValueError(f"unknown LoRA aggregation mode {mode!r}")


def _factor(state: StateDict, module_prefix: str, b_side: bool) -> torch.Tensor:
    prefix = module_prefix.rstrip(".") + "."
    pattern = _LORA_B if b_side else _LORA_A
    # the factor must sit directly under the module: "<prefix>.lora_A[.<adapter>].weight"
    found = [k for k in state if k.startswith(prefix) and pattern.match(k, len(prefix) - 1)]
    if len(found) != 1:
        side = "B" if b_side else "A"
        raise KeyError(f"expected exactly one lora_{side} tensor under {module_prefix!r}, found {found}")
    return state[found[0]].to(torch.float32)


def merged_product(state: StateDict, module_prefix: str) -> torch.Tensor:
    """``B @ A`` of the LoRA module ``module_prefix`` (e.g. ``...layers.0.self_attn.q_proj``), unscaled."""
    a = _factor(state, module_prefix, b_side=False)
    b = _factor(state, module_prefix, b_side=True)
    return b @ a
