"""Model stacks: one copy of the base weights with a global adapter merged in, wrapped by PEFT with a
fixed pool of adapter *slots* that personal adapters are bound to per batch.

Merging (:func:`build_merged_stack`, run in a background thread): the base model is deep-copied with
every parameter and buffer *outside* the LoRA target modules shared with the pristine base (only the
target weights, e.g. ``q_proj``/``v_proj``, are real copies), the global adapter is loaded with PEFT and
merged into those copies (``merge_and_unload``). A merged copy therefore costs the target weights, not
a whole model, and the pristine base is never modified.

Personal adapters (PEFT mixed-adapter batches): the merged model is wrapped again with
``get_peft_model`` and ``max_batch`` named LoRA adapters (``slot0`` ...) with the federation's config;
none is *active*, so a forward without ``adapter_names`` is exactly base + global. To serve a batch,
:meth:`ModelStack.bind` points each needed slot's ``lora_A``/``lora_B`` weights at a cached
adapter's tensors (a pointer swap per target module: no copy, no allocation, no module added), and the
forward passes ``adapter_names=[slot or "__base__" per row]``: PEFT's ``_mixed_batch_forward`` computes
the base output for the whole batch and adds each sub-batch's own LoRA delta. Slots are reused LRU,
so a hot user's binding survives across batches; slots whose adapter left the cache are reset to a
shared zero adapter after each batch, so the model never keeps an evicted or deleted adapter alive.
Because the slot count is fixed, the per-forward PEFT overhead does not grow with the number of
cached users (adding one named adapter per cached user would add modules that every forward walks).

Everything that touches a stack's model runs on the single model thread (:mod:`.batcher`).
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from schemas.errors import ConfigError
from schemas.events import FederationSpec
from schemas.records import VersionMeta
from services.models.base import BaseModel
from services.models.lora import peft_config
from services.personalization.user_adapters import PersonalAdapter

BASE_NAME = "__base__"  # PEFT's name for "no adapter" in mixed batches
_ROOT = "base_model.model."
_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


class Tokens:
    """The two tokenizer calls the service needs, for the tiny byte tokenizer and HF tokenizers."""

    def __init__(self, tokenizer: Any, max_positions: int) -> None:
        self.tokenizer = tokenizer
        eos = getattr(tokenizer, "eos_token_id", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.eos_id: int | None = None if eos is None else int(eos)
        self.pad_id: int = int(pad if pad is not None else (eos if eos is not None else 0))
        self.bos_id: int | None = getattr(tokenizer, "bos_token_id", None)
        self.max_positions = max_positions
        self._hf = hasattr(tokenizer, "convert_ids_to_tokens")  # the byte tokenizer has no such method

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        return [int(i) for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        if self._hf:
            return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))
        return str(self.tokenizer.decode(list(ids)))


def target_paths(state: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """``state key -> (module path under the PeftModel, "lora_A" | "lora_B")`` for an adapter state
    dict keyed like PEFT's (``base_model.model.<module>.lora_A.weight``)."""
    out: dict[str, tuple[str, str]] = {}
    for key in state:
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(_ROOT):
            raise ConfigError(f"unsupported adapter tensor {key!r} (only Linear LoRA A/B weights are served)")
        out[key] = (key[: -len(suffix)], suffix.split(".")[1])
    return out


def _shared_copy(model: Any, targets: set[str]) -> Any:
    """Deep copy of ``model`` in which only the modules named in ``targets`` own new tensors."""
    memo: dict[int, Any] = {}
    for name, module in model.named_modules():
        if name in targets:
            continue
        for param in module.parameters(recurse=False):
            memo[id(param)] = param
        for buffer in module.buffers(recurse=False):
            memo[id(buffer)] = buffer
    return copy.deepcopy(model, memo)


@dataclass(eq=False)
class ModelStack:
    """One servable model: ``kind`` "merged" (base + global ``version`` merged, with PEFT slots) or
    "base" (the pristine base alone; benchmarks). Fields below ``refs`` belong to the event loop."""

    federation: str
    version: int
    kind: str
    model: Any
    tokens: Tokens
    meta: VersionMeta | None = None
    slot_names: tuple[str, ...] = ()
    build_seconds: float = 0.0
    published_at: float | None = None  # unix time of the announcement that made us build it
    refs: int = 0
    first_served: bool = False
    _handles: dict[str, Any] = field(default_factory=dict, repr=False)
    _blank: dict[str, torch.nn.Parameter] = field(default_factory=dict, repr=False)
    _bound: OrderedDict[str, PersonalAdapter | None] = field(default_factory=OrderedDict, repr=False)
    binds: int = 0

    @property
    def slots(self) -> int:
        return len(self.slot_names)

    # -- model thread ------------------------------------------------------------------------------
    def _point(self, slot: str, params: Mapping[str, torch.nn.Parameter]) -> None:
        for key, modules in self._handles.items():
            modules[slot].weight = params[key]

    def bind(self, adapters: Sequence[PersonalAdapter | None]) -> list[str]:
        """Adapter names per row (``__base__`` for rows without a personal adapter), binding slots."""
        wanted: list[PersonalAdapter] = []
        for adapter in adapters:
            if adapter is not None and not any(adapter is w for w in wanted):
                wanted.append(adapter)
        if len(wanted) > self.slots:
            raise RuntimeError(f"{len(wanted)} personal adapters in one batch, {self.slots} slots")
        slot_of: dict[int, str] = {}
        for slot, bound in self._bound.items():
            if bound is not None and any(bound is w for w in wanted):
                slot_of[id(bound)] = slot
        for slot in slot_of.values():
            self._bound.move_to_end(slot)
        for adapter in wanted:
            if id(adapter) in slot_of:
                continue
            used = set(slot_of.values())
            slot = next(s for s in self._bound if s not in used)
            self._point(slot, adapter.params)
            self._bound[slot] = adapter
            self._bound.move_to_end(slot)
            slot_of[id(adapter)] = slot
            self.binds += 1
        return [BASE_NAME if a is None else slot_of[id(a)] for a in adapters]

    def release_evicted(self) -> None:
        """Reset slots whose adapter left the cache (evicted, replaced or deleted) to zeros."""
        for slot, bound in self._bound.items():
            if bound is not None and bound.evicted:
                self._point(slot, self._blank)
                self._bound[slot] = None

    def bound_adapters(self) -> list[PersonalAdapter]:
        return [a for a in self._bound.values() if a is not None]


def build_merged_stack(
    base: BaseModel,
    spec: FederationSpec,
    version: int,
    global_state: Mapping[str, torch.Tensor],
    *,
    slots: int,
    meta: VersionMeta | None = None,
) -> ModelStack:
    """Merge ``global_state`` into a (mostly shared) copy of the base and add ``slots`` PEFT slots.
    CPU-heavy: run it off the event loop. The pristine ``base`` is only read."""
    from peft import get_peft_model, set_peft_model_state_dict

    started = time.perf_counter()
    paths = target_paths(global_state)
    modules = {path.removeprefix(_ROOT) for path, _ in paths.values()}
    config = peft_config(spec.lora)
    with torch.inference_mode(False), torch.no_grad():
        model = _shared_copy(base.model, modules)
        wrapped = get_peft_model(model, config, adapter_name="global")
        result: Any = set_peft_model_state_dict(wrapped, dict(global_state), adapter_name="global")
        if result.unexpected_keys:
            raise ConfigError(f"global adapter v{version}: PEFT did not place {result.unexpected_keys[:3]}")
        merged = wrapped.merge_and_unload()
        names = tuple(f"slot{i}" for i in range(slots))
        serving = get_peft_model(merged, peft_config(spec.lora), adapter_name=names[0])
        for name in names[1:]:
            serving.add_adapter(name, peft_config(spec.lora))
        serving.base_model.set_adapter([])  # nothing active: a plain forward is base + global
        serving.eval()
        for param in serving.parameters():
            param.requires_grad_(False)
        handles = {key: getattr(serving.get_submodule(path), kind) for key, (path, kind) in paths.items()}
        blank = {
            key: torch.nn.Parameter(torch.zeros_like(t, dtype=torch.float32), requires_grad=False)
            for key, t in global_state.items()
        }
    stack = ModelStack(
        federation=spec.name,
        version=version,
        kind="merged",
        model=serving,
        tokens=Tokens(base.tokenizer, _max_positions(base.model)),
        meta=meta,
        slot_names=names,
        _handles=handles,
        _blank=blank,
    )
    for name in names:
        stack._point(name, blank)
        stack._bound[name] = None
    stack.build_seconds = time.perf_counter() - started
    return stack


def base_stack(base: BaseModel, federation: str) -> ModelStack:
    """The pristine base alone, without PEFT (for "base only" comparisons)."""
    return ModelStack(
        federation=federation,
        version=-1,
        kind="base",
        model=base.model,
        tokens=Tokens(base.tokenizer, _max_positions(base.model)),
    )


def _max_positions(model: Any) -> int:
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else 1 << 30
