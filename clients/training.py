"""Local LoRA training of an edge agent: a shared adapter (from the global) and a personal one.

One :class:`AdapterTrainer` per process (or per worker thread) wraps the frozen base model with PEFT
**once**: two LoRA slots, ``shared`` and ``personal``, with the federation's config. Every call loads a
user's adapters into the slots, trains or evaluates, and reads them back, so any number of virtual
users share one base model in memory and only their adapters are per user.

Adapters are exchanged as state dicts keyed like :func:`modeling.lora.init_adapter` (PEFT's
``get_peft_model_state_dict`` keys, without the adapter name). Both slots are active during training
(``LoraModel.set_adapter(["shared", "personal"])``): each LoRA layer adds both adapters' outputs.

Concurrency: a trainer mutates its model, so calls are serialized by a lock; use one trainer from one
worker thread at a time (a second thread simply waits). Training runs in the calling thread; it does
not change global torch settings (threads, default dtype) and uses its own seeded generators.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from clients.data import UserData, pack_sequences, tokenize
from modeling.base import BaseModel
from modeling.lora import StateDict, peft_config
from schemas.errors import ConfigError
from schemas.events import FederationSpec

SHARED = "shared"
PERSONAL = "personal"
SLOTS = (SHARED, PERSONAL)


@dataclass(frozen=True)
class TrainConfig:
    """Local training options. ``lr`` 5e-3 suits LoRA on the tiny model; ~1e-3..2e-4 for real FMs."""

    steps: int = 20
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 5e-3
    personal_lr: float | None = None  # None: same as lr
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # None: no clipping
    seed: int = 0
    train_shared: bool = True
    train_personal: bool = True
    ffa: bool = False  # FFA-LoRA: lora_A of the shared adapter stays frozen, only B is trained
    eval_sequences: int = 16  # size of the fixed batch behind loss_before / loss_after

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.seq_len < 2 or self.eval_sequences < 1:
            raise ConfigError("TrainConfig: steps >= 0, batch_size >= 1, seq_len >= 2, eval_sequences >= 1")
        if not (self.lr > 0 and (self.personal_lr is None or self.personal_lr > 0)):
            raise ConfigError("TrainConfig: learning rates must be > 0")
        if self.weight_decay < 0 or (self.max_grad_norm is not None and self.max_grad_norm <= 0):
            raise ConfigError("TrainConfig: weight_decay >= 0 and max_grad_norm > 0 (or None)")


@dataclass(frozen=True)
class TrainResult:
    """``shared_delta`` = trained shared - global (same keys); ``personal`` = the trained personal
    adapter. Losses are mean per-token NLL with both adapters active, on up to ``eval_sequences``
    held-out sequences (``loss_on="heldout"``) or, without held-out text, the first training ones."""

    shared_delta: StateDict
    personal: StateDict
    num_samples: int
    loss_before: float
    loss_after: float
    loss_on: str
    steps: int
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    mean_nll: float
    token_accuracy: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.mean_nll, 700.0))


def _seed(*parts: object) -> int:
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") & (2**63 - 1)


def _is_a(key: str) -> bool:
    return ".lora_A." in key or "lora_embedding_A" in key


class AdapterTrainer:
    """Trains and evaluates users' shared + personal adapters on one PEFT-wrapped base model.

    The base model is wrapped in place (PEFT injects LoRA layers into ``base.model``); its own weights
    are never trained. Compute :func:`~modeling.lora.init_adapter` from an unwrapped model.
    """

    def __init__(self, base: BaseModel, spec: FederationSpec) -> None:
        from peft import get_peft_model, get_peft_model_state_dict

        if base.model_id != spec.base_model:
            raise ConfigError(f"base model {base.model_id!r} is not the federation's {spec.base_model!r}")
        self.spec = spec
        self.tokenizer: Any = base.tokenizer
        for param in base.model.parameters():
            param.requires_grad_(False)
        self.model: Any = get_peft_model(base.model, peft_config(spec.lora), adapter_name=SHARED)
        self.model.add_adapter(PERSONAL, peft_config(spec.lora))
        self.model.eval()
        self._lock = threading.Lock()
        template = get_peft_model_state_dict(self.model, adapter_name=SHARED)
        self._shapes = {k: tuple(v.shape) for k, v in template.items()}
        self._params = {
            slot: {k: p for k, p in self.model.named_parameters() if "lora_" in k and f".{slot}." in k}
            for slot in SLOTS
        }

    @property
    def keys(self) -> list[str]:
        """The adapter's tensor names (as in ``init_adapter``)."""
        return list(self._shapes)

    def fresh_adapter(self, *seed: object) -> StateDict:
        """A PEFT-style fresh adapter (A Kaiming-uniform, B zero: a no-op), seeded by ``seed`` parts;
        uses its own generator, never the global RNG."""
        gen = torch.Generator().manual_seed(_seed("personal-init", *seed))
        state: StateDict = {}
        for key, shape in self._shapes.items():
            tensor = torch.zeros(shape, dtype=torch.float32)
            if ".lora_A." in key:
                torch.nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=gen)
            elif key.endswith(".lora_embedding_B"):
                torch.nn.init.normal_(tensor, generator=gen)
            state[key] = tensor
        return state

    # -- slots -------------------------------------------------------------------------------------

    def _load(self, slot: str, state: Mapping[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        if set(state) != set(self._shapes):
            missing, extra = sorted(set(self._shapes) - set(state)), sorted(set(state) - set(self._shapes))
            raise ConfigError(f"{slot} adapter keys differ: missing {missing[:3]}, unexpected {extra[:3]}")
        for key, tensor in state.items():
            if tuple(tensor.shape) != self._shapes[key]:
                raise ConfigError(f"{slot} adapter {key}: shape {tuple(tensor.shape)} != {self._shapes[key]}")
        result: Any = set_peft_model_state_dict(self.model, dict(state), adapter_name=slot)
        if result.unexpected_keys:
            raise ConfigError(f"{slot} adapter: PEFT did not place {result.unexpected_keys[:3]}")

    def _read(self, slot: str) -> StateDict:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.model, adapter_name=slot)
        return {k: v.detach().to(torch.float32).clone().contiguous() for k, v in state.items()}

    def _activate(self, slots: list[str]) -> None:
        # PeftModel.set_adapter takes one name; LoraModel.set_adapter takes a list (several active
        # adapters, outputs summed). It also sets requires_grad=True on the active ones.
        self.model.base_model.set_adapter(slots)

    def _adapters_off(self, off: bool) -> AbstractContextManager[Any]:
        return self.model.disable_adapter() if off else nullcontext()

    # -- data ----------------------------------------------------------------------------------------

    def _blocks(self, texts: list[str], seq_len: int) -> list[torch.Tensor]:
        return [
            row for text in texts if text for row in pack_sequences(tokenize(self.tokenizer, text), seq_len)
        ]

    @staticmethod
    def _batches(blocks: list[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
        by_len: dict[int, list[torch.Tensor]] = {}
        for block in blocks:
            by_len.setdefault(block.numel(), []).append(block)
        for rows in by_len.values():
            for i in range(0, len(rows), batch_size):
                yield torch.stack(rows[i : i + batch_size])

    def _nll(self, blocks: list[torch.Tensor], batch_size: int) -> EvalResult:
        total, correct, tokens = 0.0, 0, 0
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for batch in self._batches(blocks, batch_size):
                    logits = self.model(input_ids=batch).logits[:, :-1].float()
                    target = batch[:, 1:]
                    total += float(F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum"))
                    correct += int((logits.argmax(-1) == target).sum())
                    tokens += target.numel()
        finally:
            self.model.train(was_training)
        if tokens == 0:
            raise ConfigError("no text to evaluate (every text is shorter than 2 tokens)")
        return EvalResult(mean_nll=total / tokens, token_accuracy=correct / tokens, tokens=tokens)

    # -- public API ----------------------------------------------------------------------------------

    def evaluate(
        self,
        adapters: Mapping[str, StateDict | None],
        texts: list[str],
        *,
        seq_len: int = 128,
        batch_size: int = 8,
        max_sequences: int | None = None,
    ) -> EvalResult:
        """Mean per-token NLL and next-token accuracy over ``texts`` (each packed on its own) with the
        given adapters active: ``{}`` base only, ``{"shared": g}`` global only, ``{"personal": p}``
        local only, both keys for base + global + personal. ``None`` values count as absent.
        ``max_sequences``: score only the first that many packed sequences (a cheap, fixed sample)."""
        unknown = set(adapters) - set(SLOTS)
        if unknown:
            raise ConfigError(f"unknown adapter slots {sorted(unknown)}; use {list(SLOTS)}")
        with self._lock:
            active = [slot for slot in SLOTS if adapters.get(slot) is not None]
            for slot in active:
                state = adapters[slot]
                assert state is not None
                self._load(slot, state)
            if active:
                self._activate(active)
            blocks = self._blocks(texts, seq_len)[:max_sequences]
            with self._adapters_off(not active):
                return self._nll(blocks, batch_size)

    def train(
        self,
        global_adapter: StateDict,
        personal: StateDict | None,
        data: UserData,
        cfg: TrainConfig,
    ) -> TrainResult:
        """Train both adapters on ``data`` for ``cfg.steps`` AdamW steps; see :class:`TrainResult`.

        ``personal=None`` starts from :meth:`fresh_adapter` seeded by the user id and ``cfg.seed``.
        Deterministic for the same inputs; nothing carries over from an earlier call.
        """
        with self._lock:
            started = time.perf_counter()
            blocks = self._blocks([data.train_text], cfg.seq_len)
            if not blocks:
                raise ConfigError(f"user {data.user_id!r} has no training text")
            train = torch.stack(blocks)  # one text: equal-length rows
            heldout = self._blocks([data.heldout_text], cfg.seq_len)[: cfg.eval_sequences]
            eval_blocks, loss_on = (
                (heldout, "heldout") if heldout else (blocks[: cfg.eval_sequences], "train")
            )

            self._load(SHARED, global_adapter)
            self._load(
                PERSONAL, personal if personal is not None else self.fresh_adapter(data.user_id, cfg.seed)
            )
            self._activate(list(SLOTS))
            loss_before = self._nll(eval_blocks, cfg.batch_size).mean_nll

            groups = self._param_groups(cfg)
            if cfg.steps > 0 and groups:
                self._fit(train, groups, data.user_id, cfg)
            loss_after = self._nll(eval_blocks, cfg.batch_size).mean_nll
            trained_shared = self._read(SHARED)
            delta = {
                k: trained_shared[k] - global_adapter[k].detach().to(torch.float32) for k in self._shapes
            }
            return TrainResult(
                shared_delta=delta,
                personal=self._read(PERSONAL),
                num_samples=int(train.shape[0]),
                loss_before=loss_before,
                loss_after=loss_after,
                loss_on=loss_on,
                steps=cfg.steps if groups else 0,
                seconds=time.perf_counter() - started,
            )

    def _param_groups(self, cfg: TrainConfig) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = []
        for slot, enabled, lr in (
            (SHARED, cfg.train_shared, cfg.lr),
            (PERSONAL, cfg.train_personal, cfg.personal_lr or cfg.lr),
        ):
            params = []
            for name, param in self._params[slot].items():
                trainable = enabled and not (slot == SHARED and cfg.ffa and _is_a(name))
                param.requires_grad_(trainable)
                param.grad = None
                if trainable:
                    params.append(param)
            if params:
                groups.append({"params": params, "lr": lr})
        return groups

    def _fit(self, train: torch.Tensor, groups: list[dict[str, Any]], user_id: str, cfg: TrainConfig) -> None:
        params = [p for group in groups for p in group["params"]]
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(_seed("batches", user_id, cfg.seed))
        # LoRA dropout draws from the global RNG: fork and seed it so results stay reproducible.
        rng: AbstractContextManager[Any] = (
            torch.random.fork_rng(devices=[]) if self.spec.lora.dropout > 0 else nullcontext()
        )
        order = torch.empty(0, dtype=torch.long)
        pos = 0
        self.model.train()
        try:
            with rng:
                if self.spec.lora.dropout > 0:
                    torch.manual_seed(_seed("dropout", user_id, cfg.seed))
                for _ in range(cfg.steps):
                    if pos >= order.numel():  # a new epoch: reshuffle the packed sequences
                        order, pos = torch.randperm(train.shape[0], generator=gen), 0
                    index = order[pos : pos + cfg.batch_size]
                    pos += cfg.batch_size
                    batch = train[index]
                    loss = self.model(input_ids=batch, labels=batch).loss
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
        finally:
            self.model.eval()
            for param in params:
                param.grad = None
