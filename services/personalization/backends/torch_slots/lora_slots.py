"""Batched personal LoRA on a merged (base + global) model: stacked adapter slots, one gather per layer.

Each LoRA target ``nn.Linear`` of a merged copy is wrapped by :class:`SlotLoRALinear`, which holds the
A and B matrices of ``slots`` personal adapters stacked in two tensors (``[slots, r, in]`` and
``[slots, out, r]``). All wrappers of a model share one :class:`Routing`: which rows of the current
batch use which slot. A forward then computes ``base(x)`` for the whole batch (the global adapter is
already merged into the base weights) and adds the personal delta

* nothing, when no row has a personal adapter (one attribute test per layer);
* ``linear(linear(x, A_s), B_s) * scaling`` when every routed row uses the same slot ``s``;
* otherwise one ``index_select`` of the rows' A/B from the stacks and two ``bmm``s (punica/S-LoRA
  style), scattered back with ``index_add_`` when some rows have no personal adapter.

This replaces PEFT's mixed-adapter batches (``adapter_names=``), whose per-forward cost is a walk of
every module of the model to install hooks plus a Python loop over the adapters of each layer; the
arithmetic is the same (``lora_B(lora_A(x)) * scaling`` added to the base output), so outputs equal
PEFT's within float rounding (``tests/unit/test_lora_slots.py``). Dropout is ignored: serving is eval.

Model-thread only: :class:`Routing` is plain mutable state read by every wrapped layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from services.personalization.backends.base import NO_SLOT


class Routing:
    """Rows -> slots for the forward(s) in progress (set by :meth:`route`, cleared afterwards)."""

    __slots__ = ("active", "index", "rows", "single")

    def __init__(self) -> None:
        self.active = False
        self.single: int | None = None  # every routed row uses this slot
        self.index: torch.Tensor | None = None  # slot of each routed row (several slots)
        self.rows: torch.Tensor | None = None  # the routed rows; None: all rows of the batch

    def clear(self) -> None:
        self.active, self.single, self.index, self.rows = False, None, None, None

    @contextlib.contextmanager
    def route(self, slots: Sequence[int]) -> Iterator[None]:
        """Serve row ``i`` with slot ``slots[i]`` (``NO_SLOT``: base + global only) inside the block."""
        routed = [i for i, s in enumerate(slots) if s != NO_SLOT]
        if routed:
            distinct = {slots[i] for i in routed}
            self.rows = None if len(routed) == len(slots) else torch.tensor(routed, dtype=torch.long)
            if len(distinct) == 1:
                self.single = next(iter(distinct))
            else:
                self.index = torch.tensor([slots[i] for i in routed], dtype=torch.long)
            self.active = True
        try:
            yield
        finally:
            self.clear()


class SlotLoRALinear(nn.Module):
    """``base`` (an ``nn.Linear`` with the global adapter merged in) plus the personal LoRA of each
    row's slot. The slot tensors are buffers (never trained); zeros until :meth:`load` fills a slot."""

    def __init__(self, base: nn.Linear, *, slots: int, rank: int, scaling: float, routing: Routing) -> None:
        super().__init__()
        self.base = base
        self.scaling = scaling
        self.routing = routing
        weight = base.weight
        self.register_buffer(
            "lora_A", torch.zeros(slots, rank, base.in_features, dtype=weight.dtype, device=weight.device)
        )
        self.register_buffer(
            "lora_B", torch.zeros(slots, base.out_features, rank, dtype=weight.dtype, device=weight.device)
        )
        self.lora_A: torch.Tensor
        self.lora_B: torch.Tensor

    @property
    def weight(self) -> torch.Tensor:  # what callers of the wrapped Linear may read (dtype, device)
        return self.base.weight

    def load(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        self.lora_A[slot].copy_(a)
        self.lora_B[slot].copy_(b)

    def clear(self, slot: int) -> None:
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x)
        routing = self.routing
        if not routing.active:
            return out
        if x.dim() < 2:
            raise ValueError(f"expected batch-first activations, got shape {tuple(x.shape)}")
        rows = routing.rows
        xs = x if rows is None else x.index_select(0, rows)
        if routing.single is not None:
            delta = F.linear(F.linear(xs, self.lora_A[routing.single]), self.lora_B[routing.single])
        else:
            index = routing.index
            assert index is not None
            flat = xs.reshape(xs.shape[0], -1, xs.shape[-1])
            hidden = torch.bmm(flat, self.lora_A.index_select(0, index).transpose(1, 2))
            delta = torch.bmm(hidden, self.lora_B.index_select(0, index).transpose(1, 2))
            delta = delta.reshape(*xs.shape[:-1], delta.shape[-1])
        delta = delta * self.scaling
        if rows is None:
            return out + delta
        return out.index_add_(0, rows, delta)


def wrap_targets(
    model: nn.Module, paths: Sequence[str], *, slots: int, rank: int, scaling: float
) -> tuple[Routing, dict[str, SlotLoRALinear]]:
    """Replace each ``nn.Linear`` at ``paths`` (module paths in ``model``) by a :class:`SlotLoRALinear`
    around it; returns the shared routing and the wrappers by path."""
    routing = Routing()
    layers: dict[str, SlotLoRALinear] = {}
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        linear = getattr(parent, child)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRA target {path!r} is a {type(linear).__name__}, not a Linear")
        layer = SlotLoRALinear(linear, slots=slots, rank=rank, scaling=scaling, routing=routing)
        setattr(parent, child, layer)
        layers[path] = layer
    return routing, layers
