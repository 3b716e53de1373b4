"""Server optimizers: apply an aggregated pseudo-gradient ``Δ`` to the global adapter (Reddi et al. 2021).

The optimizers themselves are strategies, one per file (:mod:`.strategies`: ``none`` = FedAvg,
``momentum`` = FedAvgM, ``adam`` = FedAdam, ``yogi`` = FedYogi); this module runs the one the spec names
over every key and keeps its state.

``Δ`` is a *delta* (new - old), so the update is an ascent along it. Keys of the global absent from
``Δ`` (e.g. ``lora_A`` under FFA-LoRA) are left untouched, and so are their moment buffers. The
state is persisted with every global version through :meth:`ServerOptState.to_tensors`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from modeling.lora import StateDict
from schemas.events import AggregationSpec
from services.aggregator.math.strategies import SERVER_OPTIMIZERS, get_server_optimizer

OptimizerKind = str
"""A key of :data:`~services.aggregator.math.strategies.SERVER_OPTIMIZERS` (``server_optimizer``)."""

SEP = "::"
_STEP_KEY = f"meta{SEP}step"
_KIND_KEY = f"meta{SEP}kind"


@dataclass
class ServerOptState:
    """Named moment buffers (``"m"``, ``"v"``: each a StateDict keyed like the global) and a step count.

    Treated as immutable by this module: :func:`apply_server_update` returns a new state.
    """

    kind: OptimizerKind = "none"
    buffers: dict[str, StateDict] = field(default_factory=dict)
    step: int = 0

    def to_tensors(self) -> StateDict:
        """Flat tensors (safetensors-compatible): ``<buffer>::<key>``, ``meta::step`` and ``meta::kind``."""
        out: StateDict = {
            _STEP_KEY: torch.tensor([self.step], dtype=torch.int64),
            _KIND_KEY: torch.tensor(list(self.kind.encode("ascii")), dtype=torch.uint8),
        }
        for name, tensors in self.buffers.items():
            if SEP in name or name == "meta":
                raise ValueError(f"invalid buffer name {name!r}")
            for key, tensor in tensors.items():
                out[f"{name}{SEP}{key}"] = tensor
        return out

    @classmethod
    def from_tensors(cls, tensors: StateDict) -> ServerOptState:
        """Inverse of :meth:`to_tensors`."""
        if _STEP_KEY not in tensors or _KIND_KEY not in tensors:
            raise ValueError("not a serialized server optimizer state (meta::step / meta::kind missing)")
        kind = bytes(tensors[_KIND_KEY].to(torch.uint8).tolist()).decode("ascii")
        if kind not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimizer kind {kind!r}")
        buffers: dict[str, StateDict] = {}
        for flat, tensor in tensors.items():
            if flat in (_STEP_KEY, _KIND_KEY):
                continue
            name, sep, key = flat.partition(SEP)
            if not sep or not key:
                raise ValueError(f"malformed server optimizer state key {flat!r}")
            buffers.setdefault(name, {})[key] = tensor.to(torch.float32)
        step = int(tensors[_STEP_KEY].reshape(-1)[0])
        return cls(kind=kind, buffers=buffers, step=step)


def apply_server_update(
    global_state: StateDict,
    delta: StateDict,
    spec: AggregationSpec,
    state: ServerOptState | None = None,
) -> tuple[StateDict, StateDict, ServerOptState]:
    """Apply pseudo-gradient ``delta`` to ``global_state`` with the optimizer of ``spec``.

    Returns ``(new_global, step, new_state)`` where ``new_global = global + step`` key by key
    (``step`` has the keys of ``delta``). All output tensors are new float32 tensors; the inputs are not
    modified. A ``state`` of another optimizer kind (the spec was changed) is discarded.
    Raises ``ValueError`` if ``delta`` has a key that the global lacks or a shape that differs.
    """
    for key, tensor in delta.items():
        if key not in global_state:
            raise ValueError(f"delta key {key!r} is not in the global state")
        if tensor.shape != global_state[key].shape:
            raise ValueError(
                f"shape of {key!r}: delta {tuple(tensor.shape)} != global {tuple(global_state[key].shape)}"
            )
    kind: OptimizerKind = spec.server_optimizer
    optimizer = get_server_optimizer(kind)
    if state is None or state.kind != kind:
        state = ServerOptState(kind=kind)
    old = {name: state.buffers.get(name, {}) for name in optimizer.buffers}
    new_buffers: dict[str, StateDict] = {name: dict(bufs) for name, bufs in old.items()}
    step: StateDict = {}
    for key, raw in delta.items():
        step[key], moments = optimizer.step(
            raw.to(torch.float32), {name: bufs.get(key) for name, bufs in old.items()}, spec
        )
        for name, tensor in moments.items():
            new_buffers[name][key] = tensor
    new_global: StateDict = {}
    for key, tensor in global_state.items():
        g = tensor.to(torch.float32, copy=True)
        if key in step:
            g.add_(step[key])
        new_global[key] = g
    return new_global, step, ServerOptState(kind=kind, buffers=new_buffers, step=state.step + 1)
