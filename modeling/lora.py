"""LoRA adapters with PEFT: config from a federation spec, the seeded v0 adapter, expected shapes."""

from __future__ import annotations

import copy
import threading
from typing import Any

import torch

from schemas.events import FederationSpec, LoraSpec

StateDict = dict[str, torch.Tensor]
_lock = threading.Lock()


def peft_config(lora: LoraSpec) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # PEFT annotates int; it divides by r, floats work
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def init_adapter(spec: FederationSpec, base_model: Any) -> StateDict:
    """The federation's v0 global adapter, initialized the way PEFT does (A Kaiming-uniform, B zero),
    seeded by ``spec.seed`` so every process computes the same tensors. ``base_model`` is not modified."""
    from peft import get_peft_model, get_peft_model_state_dict

    with _lock:
        rng = torch.random.get_rng_state()
        try:
            torch.manual_seed(spec.seed)
            model = get_peft_model(copy.deepcopy(base_model), peft_config(spec.lora))
            state = get_peft_model_state_dict(model)
        finally:
            torch.random.set_rng_state(rng)
    return {k: v.detach().to(torch.float32).clone().contiguous() for k, v in state.items()}


def adapter_shapes(state: StateDict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}
