"""Model stacks: one copy of the base weights with a global adapter merged in, whose LoRA target
layers carry a fixed pool of personal adapter *slots* that personal adapters are bound to per batch.

Merging (:func:`merge_global`, run in a background thread): the base model is deep-copied with
every parameter and buffer *outside* the LoRA target modules shared with the pristine base (only the
target weights, e.g. ``q_proj``/``v_proj``, are real copies) and the global adapter is merged into
those copies (``W + B @ A * scaling``, as PEFT's ``merge_and_unload`` computes it, without building a
PEFT model first, which made every hot swap slower). A merged copy therefore costs the target
weights, not a whole model, and the pristine base is never modified.

Personal adapters (:mod:`.lora_slots`): every target ``Linear`` of the merged copy is wrapped by a
:class:`~.lora_slots.SlotLoRALinear` holding ``adapter_slots`` stacked A/B matrices. A user's gate
(``AdapterRecord.gate``, 0..1) is applied when the adapter is bound: its ``lora_B`` is copied scaled by
the gate, so every forward costs the same whatever the gates (a gate of 0 is never bound). To serve a batch,
:meth:`SlotStack.bind` copies each needed adapter that is not bound yet into a free slot (least
recently used first; a hot user's binding survives across batches) and :meth:`SlotStack.serving`
routes rows to slots for the forward(s) inside it: one gather + two ``bmm`` per target layer, the same
arithmetic as PEFT's mixed-adapter batches without their per-forward hook installation. Rows without
a personal adapter get base + global only. Slots whose adapter left the cache are zeroed after each
batch, so the model never keeps a copy of an evicted or deleted adapter. The fixed slot count bounds
both the memory and the per-forward cost, whatever the number of cached users.

:class:`SlotStack` is this backend's :class:`~services.personalization.backends.base.ModelStack`.
Everything that touches a stack's model runs on the single model thread (:mod:`...batcher`).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, cast

import torch
from torch import nn

from modeling.base import BaseModel
from schemas.errors import ConfigError
from schemas.events import FederationSpec
from schemas.records import VersionMeta
from services.personalization.backends.base import (
    NO_SLOT,
    GenOut,
    GenRow,
    ModelStack,
    ScoreOut,
    ScoreRow,
    StackKind,
)
from services.personalization.backends.torch_slots.inference import generate_rows, score_rows
from services.personalization.backends.torch_slots.lora_slots import Routing, SlotLoRALinear, wrap_targets
from services.personalization.user_adapters import PersonalAdapter

_ROOT = "base_model.model."
_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


class LMOutput(Protocol):
    @property
    def logits(self) -> torch.Tensor: ...


class CausalLM(Protocol):
    """The calls this backend makes on a Hugging Face causal LM (a ``*ForCausalLM`` model): a forward
    that returns logits, and ``generate`` (which returns the prompt ids followed by the new tokens)."""

    def __call__(
        self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> LMOutput: ...

    def generate(
        self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor: ...


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


def _shared_copy(model: nn.Module, targets: set[str]) -> nn.Module:
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


class SlotStack(ModelStack):
    """A :class:`ModelStack` on a Hugging Face causal LM: "merged" (the global merged into the target
    weights, every target wrapped with personal adapter slots) or "base" (the pristine base alone)."""

    def __init__(
        self,
        *,
        federation: str,
        version: int,
        kind: StackKind,
        model: CausalLM,
        tokens: Tokens,
        meta: VersionMeta | None = None,
        slots: int = 0,
        routing: Routing | None = None,
        layers: dict[str, tuple[SlotLoRALinear, str]] | None = None,
    ) -> None:
        super().__init__(
            federation=federation, version=version, kind=kind, tokens=tokens, slots=slots, meta=meta
        )
        self.model = model
        self.tokens: Tokens = tokens
        self.routing = routing if routing is not None else Routing()
        # state key -> (wrapped layer, "lora_A" | "lora_B")
        self._layers = layers if layers is not None else {}
        self._bound: OrderedDict[int, PersonalAdapter | None] = OrderedDict((s, None) for s in range(slots))
        self.binds = 0

    # -- model thread ------------------------------------------------------------------------------
    def _load(self, slot: int, params: Mapping[str, torch.Tensor], gate: float = 1.0) -> None:
        """Copy an adapter into ``slot``; its ``lora_B`` scaled by ``gate`` (the user's gate: the slot's
        LoRA output is ``gate * B A x * scaling``; a gate of 1 copies the tensors unchanged)."""
        with torch.no_grad():
            for key, (layer, kind) in self._layers.items():
                target = getattr(layer, kind)[slot]
                target.copy_(params[key])
                if kind == "lora_B" and gate != 1.0:
                    target.mul_(gate)

    def _clear(self, slot: int) -> None:
        with torch.no_grad():
            for layer, kind in self._layers.values():
                getattr(layer, kind)[slot].zero_()

    def bind(self, adapters: Sequence[PersonalAdapter | None]) -> list[int]:
        """The slot of each row (``NO_SLOT`` for rows without a personal adapter), loading adapters
        that are not bound yet into the least recently used slots (a copy of their A/B tensors)."""
        wanted: list[PersonalAdapter] = []
        for adapter in adapters:
            if adapter is not None and not any(adapter is w for w in wanted):
                wanted.append(adapter)
        if len(wanted) > self.slots:
            raise RuntimeError(f"{len(wanted)} personal adapters in one batch, {self.slots} slots")
        slot_of: dict[int, int] = {}
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
            self._load(slot, adapter.params, adapter.record.gate)
            self._bound[slot] = adapter
            self._bound.move_to_end(slot)
            slot_of[id(adapter)] = slot
            self.binds += 1
        return [NO_SLOT if a is None else slot_of[id(a)] for a in adapters]

    @contextlib.contextmanager
    def serving(self, adapters: Sequence[PersonalAdapter | None]) -> Iterator[None]:
        """Forwards inside the block serve row ``i`` with ``adapters[i]`` (None: base + global). A
        personal adapter whose gate is 0 is not bound at all: its rows are served exactly as global-only."""
        adapters = [None if a is not None and a.record.gate <= 0.0 else a for a in adapters]
        if self.kind != "merged" or all(a is None for a in adapters):
            yield
            return
        with self.routing.route(self.bind(adapters)):
            yield

    def score(self, rows: Sequence[ScoreRow]) -> list[ScoreOut]:
        return score_rows(self, rows)

    def generate(self, rows: Sequence[GenRow]) -> list[GenOut]:
        return generate_rows(self, rows)

    def release_evicted(self) -> None:
        """Zero the slots whose adapter left the cache (evicted, replaced or deleted)."""
        for slot, bound in self._bound.items():
            if bound is not None and bound.evicted:
                self._clear(slot)
                self._bound[slot] = None

    def bound_adapters(self) -> list[PersonalAdapter]:
        return [a for a in self._bound.values() if a is not None]


def merge_global(
    base: BaseModel, spec: FederationSpec, global_state: Mapping[str, torch.Tensor]
) -> nn.Module:
    """A copy of the base model with ``global_state`` merged into its LoRA target weights (only those
    are new tensors; everything else is shared with ``base``): ``W + (B @ A) * alpha / r`` per target,
    the arithmetic of PEFT's ``merge_and_unload``. CPU work (a few ms per target); ``base`` is only
    read."""
    paths = target_paths(global_state)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, (path, kind) in paths.items():
        pairs.setdefault(path.removeprefix(_ROOT), {})[kind] = global_state[key]
    scaling = spec.lora.alpha / spec.lora.rank  # PEFT's scaling without rslora (see models.lora)
    with torch.inference_mode(False), torch.no_grad():
        model = _shared_copy(base.model, set(pairs))
        for name, pair in pairs.items():
            layer = model.get_submodule(name)
            if not isinstance(layer, torch.nn.Linear) or set(pair) != {"lora_A", "lora_B"}:
                raise ConfigError(f"global adapter: {name!r} is not a Linear with both lora_A and lora_B")
            a = pair["lora_A"].to(layer.weight.dtype)
            b = pair["lora_B"].to(layer.weight.dtype)
            if (
                a.shape[1] != layer.in_features
                or b.shape[0] != layer.out_features
                or a.shape[0] != b.shape[1]
            ):
                raise ConfigError(
                    f"global adapter: {name!r} A {tuple(a.shape)} / B {tuple(b.shape)} do not fit "
                    f"a Linear {layer.in_features} -> {layer.out_features}"
                )
            layer.weight += (b @ a) * scaling
    model.eval()
    return model


def build_merged_stack(
    base: BaseModel,
    spec: FederationSpec,
    version: int,
    global_state: Mapping[str, torch.Tensor],
    *,
    slots: int,
    meta: VersionMeta | None = None,
) -> SlotStack:
    """Merge ``global_state`` into a (mostly shared) copy of the base and wrap its LoRA targets with
    ``slots`` personal adapter slots. CPU-heavy: run it off the event loop."""
    started = time.perf_counter()
    paths = target_paths(global_state)
    merged = merge_global(base, spec, global_state)
    lora = spec.lora
    with torch.inference_mode(False), torch.no_grad():
        for param in merged.parameters():
            param.requires_grad_(False)
        routing, layers = wrap_targets(
            merged,
            sorted({path.removeprefix(_ROOT) for path, _ in paths.values()}),
            slots=slots,
            rank=lora.rank,
            scaling=lora.alpha / lora.rank,  # PEFT's scaling without rslora (see models.lora)
        )
    stack = SlotStack(
        federation=spec.name,
        version=version,
        kind="merged",
        model=cast(CausalLM, merged),  # the base's causal LM class, with merged and wrapped targets
        tokens=Tokens(base.tokenizer, _max_positions(base.model)),
        meta=meta,
        slots=slots,
        routing=routing,
        layers={key: (layers[path.removeprefix(_ROOT)], kind) for key, (path, kind) in paths.items()},
    )
    stack.build_seconds = time.perf_counter() - started
    return stack


def base_stack(base: BaseModel, federation: str) -> SlotStack:
    """The pristine base alone, without PEFT (for "base only" comparisons)."""
    return SlotStack(
        federation=federation,
        version=-1,
        kind="base",
        model=base.model,
        tokens=Tokens(base.tokenizer, _max_positions(base.model)),
    )


def _max_positions(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else 1 << 30
