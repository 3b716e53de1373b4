"""The edge agent: fetch the global adapter, train shared + personal adapters, send the shared delta.

One round (:meth:`EdgeAgent.run_round`):

1. the federation's spec and latest global adapter come through a :class:`~clients.source.GlobalSource`;
   a spec whose fingerprint (base model, task, LoRA config, seed) differs from the one the trainer was
   built for is refused with :class:`SpecMismatchError`;
2. the user's personal adapter is loaded (:class:`~clients.personal.DiskPersonalStore`:
   ``<state_dir>/<user>/personal.safetensors``, written atomically) or starts fresh;
3. both adapters train in a worker thread (an executor, never the event loop);
4. the shared delta is clipped to ``clip_norm`` and, with ``noise_multiplier > 0``, gets Gaussian noise
   (local DP, recorded as ``DPMetadata`` in the update), then encoded (fp16 by default, or int8; zstd),
   signed with the client's HMAC key and framed (chunked when large);
5. the messages go to the durable on-disk outbox first, then the outbox is drained through the sender
   (:class:`~clients.outbox.OutboxPublisher`); the personal adapter is saved.

Delivery: an update leaves the outbox only after the service's ingest route acknowledged every one of
its messages (stored in the update log). While the service is unreachable or throttles the device,
updates stay queued (bounded: :class:`~clients.outbox.OutboxFull`) and the next round or
:meth:`~clients.outbox.OutboxPublisher.flush` retries with exponential back-off. The sender is any
:class:`~clients.outbox.Sender`: :class:`clients.uploader.HttpUpdateSender` on a device; a resent update
is dropped by the aggregator by (client, update id), so every update is aggregated once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clients.data import UserData
from clients.outbox import DrainResult, Outbox, OutboxPublisher, Sender
from clients.personal import DiskPersonalStore, PersonalStore
from clients.personalize import PersonalizeConfig, PersonalizeResult, personalize
from clients.privacy import PrivatizedDelta, check_privacy_options, privatize
from clients.quality import DEFAULT_SEQUENCES, DiskQualityMemory, QualityProbe, QualityReport
from clients.settings import EdgeSettings
from clients.source import GlobalAdapter, GlobalSource
from clients.training import AdapterTrainer, TrainConfig, TrainResult
from clients.updates import build_update, update_messages
from modeling.lora import StateDict
from schemas.errors import ConfigError, PFIError
from schemas.events import (
    AdapterUpdate,
    DPMetadata,
    Envelope,
    FederationSpec,
    TensorEncoding,
    TrainingMetrics,
)


class SpecMismatchError(PFIError):
    """The federation's spec (or its global adapter) is not the one this agent's trainer was built for."""


# ------------------------------------------------------------------------------------------ options


def wire_encoding(dtype: str = "float16", *, int8: bool = False) -> TensorEncoding:
    """How a delta travels: ``dtype`` (float16 default) or int8 quantization, always zstd."""
    if int8:
        return TensorEncoding(dtype="float32", quantization="int8", compression="zstd")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ConfigError(f"unknown wire dtype {dtype!r}; use float32, float16 or bfloat16")
    return TensorEncoding(dtype=dtype, quantization="none", compression="zstd")


@dataclass(frozen=True)
class AgentOptions:
    """What an agent does to its delta before sending it, and how it sends."""

    clip_norm: float | None = 10.0
    noise_multiplier: float = 0.0
    encoding: TensorEncoding = field(default_factory=wire_encoding)
    noise_seed: int | None = None  # None: noise from the OS CSPRNG (tests fix it)
    drain: bool = True  # try to send right after queueing (False: leave it to flush())
    quality_sequences: int = DEFAULT_SEQUENCES  # held-out sequences scored for the quality report (0: none)

    def __post_init__(self) -> None:
        check_privacy_options(self.clip_norm, self.noise_multiplier)

    @classmethod
    def from_settings(cls, edge: EdgeSettings, **overrides: Any) -> AgentOptions:
        values: dict[str, Any] = {
            "clip_norm": edge.clip_norm,
            "noise_multiplier": edge.noise_multiplier,
            "encoding": wire_encoding(edge.dtype, int8=edge.int8),
        }
        values.update(overrides)
        return cls(**values)


def train_config(edge: EdgeSettings, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from the ``PFI_EDGE_*`` defaults; ``None`` overrides are ignored."""
    values: dict[str, Any] = {
        "steps": edge.steps,
        "batch_size": edge.batch_size,
        "seq_len": edge.seq_len,
        "lr": edge.lr,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)


# ----------------------------------------------------------------------------------------- the agent


@dataclass(frozen=True)
class RoundResult:
    """What one round did. ``published``: Kafka acknowledged the update; otherwise it is queued in the
    outbox (``queued`` items in all) and will be sent by a later drain."""

    federation: str
    client_id: str
    update_id: str
    base_version: int
    num_samples: int
    loss_before: float
    loss_after: float
    loss_on: str
    steps: int
    train_seconds: float
    delta_norm: float  # before clipping
    clipped: bool
    dp: DPMetadata | None
    encoding: TensorEncoding
    payload_bytes: int
    message_bytes: int
    messages: int
    published: bool
    queued: int
    send_error: str | None
    quality: QualityReport = field(default_factory=QualityReport)  # what the update reported (issue 16)

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["quality"] = self.quality.fields()
        out["dp"] = self.dp.model_dump() if self.dp is not None else None
        out["encoding"] = self.encoding.model_dump()
        return out


@dataclass(frozen=True)
class _Prepared:
    envelope: Envelope[AdapterUpdate]
    messages: list[bytes]
    private: PrivatizedDelta


Pause = Callable[[float], Awaitable[None]]


def _finite(value: float) -> float | None:
    return value if value == value and abs(value) != float("inf") else None


class EdgeAgent:
    """One user's agent. ``trainer`` may be shared by many agents (a fleet): calls are serialized.

    ``key`` is the client's signing key (its credential's); every update and each of its chunks is
    signed with it. ``edge_settings`` gives the chunk size and the outbox's retry timing."""

    def __init__(
        self,
        federation: str,
        user_id: str,
        key: bytes,
        source: GlobalSource,
        trainer: AdapterTrainer,
        outbox: Outbox,
        sender: Sender,
        state_dir: Path | None = None,
        options: AgentOptions | None = None,
        *,
        client_id: str | None = None,
        executor: Executor | None = None,
        personal_store: PersonalStore | None = None,
        publisher: OutboxPublisher | None = None,
        edge_settings: EdgeSettings | None = None,
    ) -> None:
        if personal_store is None:
            if state_dir is None:
                raise ConfigError("an edge agent needs a state_dir or a personal_store")
            personal_store = DiskPersonalStore(state_dir)
        edge = edge_settings or EdgeSettings()
        self.federation = federation
        self.user_id = user_id
        self.client_id = client_id or user_id
        self.key = key
        self.source = source
        self.trainer = trainer
        self.edge = edge
        self.state_dir = state_dir
        self.options = options or AgentOptions()
        self.executor = executor
        self.personal_store = personal_store
        self.publisher = publisher or OutboxPublisher(
            outbox,
            sender,
            send_timeout_s=edge.send_timeout_s,
            retry_initial_s=edge.retry_initial_s,
            retry_max_s=edge.retry_max_s,
        )
        self.rounds = 0
        memory = DiskQualityMemory(state_dir) if state_dir is not None else None
        self.quality = QualityProbe(memory, sequences=self.options.quality_sequences)

    @property
    def outbox(self) -> Outbox:
        return self.publisher.outbox

    # -- checks ------------------------------------------------------------------------------------

    def check_spec(self, spec: FederationSpec) -> None:
        """Refuse a federation whose adapter is not the trainer's (base model, task, LoRA, seed)."""
        mine = self.trainer.spec
        if spec.fingerprint() == mine.fingerprint():
            return
        differs = [
            f"{name} {theirs!r} (agent: {ours!r})"
            for name, theirs, ours in (
                ("base model", spec.base_model, mine.base_model),
                ("task", spec.task, mine.task),
                ("LoRA config", spec.lora.model_dump(), mine.lora.model_dump()),
                ("seed", spec.seed, mine.seed),
            )
            if theirs != ours
        ]
        raise SpecMismatchError(
            f"federation {spec.name!r} has spec fingerprint {spec.fingerprint()[:12]}, this agent was built "
            f"for {mine.fingerprint()[:12]}: "
            + ("; ".join(differs) or "different spec")
            + "; refusing to train against its global adapter"
        )

    def check_adapter(self, adapter: GlobalAdapter) -> None:
        expected = set(self.trainer.keys)
        if set(adapter.state) != expected:
            missing = sorted(expected - set(adapter.state))[:2]
            extra = sorted(set(adapter.state) - expected)[:2]
            raise SpecMismatchError(
                f"global adapter {adapter.federation!r} v{adapter.version} does not fit this agent's LoRA "
                f"config (missing {missing}, unexpected {extra}); refusing to train against it"
            )

    # -- a round -------------------------------------------------------------------------------------

    def _measure_quality(
        self, adapter: GlobalAdapter, personal: StateDict | None, data: UserData, cfg: TrainConfig
    ) -> QualityReport:
        """The round's quality report (``personal``: as it will be served); blocking, like training."""
        return self.quality.measure(
            self.trainer,
            self.federation,
            adapter.version,
            adapter.state,
            personal,
            data,
            seq_len=cfg.seq_len,
            batch_size=cfg.batch_size,
        )

    def _prepare(
        self,
        base_version: int,
        spec_fingerprint: str,
        result: TrainResult,
        quality: QualityReport | None = None,
    ) -> _Prepared:
        seed = None
        if self.options.noise_seed is not None:
            seed = (self.options.noise_seed * 1_000_003 + self.rounds) & (2**63 - 1)
        private = privatize(
            result.shared_delta,
            clip_norm=self.options.clip_norm,
            noise_multiplier=self.options.noise_multiplier,
            seed=seed,
        )
        metrics = TrainingMetrics(
            loss_before=_finite(result.loss_before),
            loss_after=_finite(result.loss_after),
            steps=result.steps,
            train_seconds=max(result.seconds, 0.0),
            **(quality or QualityReport()).fields(),
        )
        envelope = build_update(
            federation=self.federation,
            client_id=self.client_id,
            spec_fingerprint=spec_fingerprint,
            base_version=base_version,
            num_samples=max(result.num_samples, 1),
            delta=private.delta,
            key=self.key,
            encoding=self.options.encoding,
            metrics=metrics,
            dp=private.dp,
        )
        return _Prepared(envelope, update_messages(envelope, self.edge.chunk_bytes, key=self.key), private)

    async def run_round(
        self,
        data: UserData,
        cfg: TrainConfig,
        *,
        train_slot: contextlib.AbstractAsyncContextManager[Any] | None = None,
        pause: Pause | None = None,
    ) -> RoundResult:
        """Fetch → train (worker thread) → clip/noise/encode/sign → outbox → drain. See the module doc.

        ``train_slot`` (e.g. a semaphore) is held while fetching the global adapter and training, so a
        fleet fetches right before its turn on the trainer (less staleness). ``pause(train_seconds)`` runs
        after training, before sending (simulated slowness and network delay).
        """
        if data.user_id != self.user_id:
            raise ConfigError(f"agent of {self.user_id!r} got the data of {data.user_id!r}")
        loop = asyncio.get_running_loop()
        async with train_slot if train_slot is not None else contextlib.nullcontext():
            spec = await self.source.spec(self.federation)
            self.check_spec(spec)
            fingerprint = spec.fingerprint()
            adapter = await self.source.latest(self.federation)
            self.check_adapter(adapter)
            personal = await asyncio.to_thread(self.personal_store.load, self.user_id, fingerprint)
            result = await loop.run_in_executor(
                self.executor, self.trainer.train, adapter.state, personal, data, cfg
            )
            quality = await loop.run_in_executor(
                self.executor, self._measure_quality, adapter, result.personal, data, cfg
            )
        if pause is not None:
            await pause(result.seconds)
        prepared = await asyncio.to_thread(self._prepare, adapter.version, fingerprint, result, quality)
        update = prepared.envelope.data
        item = await self.publisher.enqueue(update.update_id, self.federation, prepared.messages)
        await asyncio.to_thread(self.personal_store.save, self.user_id, fingerprint, result.personal)
        self.rounds += 1
        drained = await self.publisher.drain() if self.options.drain else None
        published = not item.path.exists()
        return RoundResult(
            federation=self.federation,
            client_id=self.client_id,
            update_id=update.update_id,
            base_version=adapter.version,
            num_samples=update.num_samples,
            loss_before=result.loss_before,
            loss_after=result.loss_after,
            loss_on=result.loss_on,
            steps=result.steps,
            train_seconds=result.seconds,
            delta_norm=prepared.private.norm,
            clipped=prepared.private.clipped,
            dp=prepared.private.dp,
            encoding=update.encoding,
            payload_bytes=len(update.payload),
            message_bytes=sum(len(m) for m in prepared.messages),
            messages=len(prepared.messages),
            published=published,
            queued=len(self.outbox),
            send_error=None if published or drained is None else drained.error,
            quality=quality,
        )

    async def flush(self, timeout_s: float) -> DrainResult:
        """Send whatever is queued, retrying with back-off for up to ``timeout_s``."""
        return await self.publisher.flush(timeout_s)

    async def personalize(self, data: UserData, cfg: PersonalizeConfig) -> tuple[PersonalizeResult, int]:
        """The on-device personalization step (:mod:`clients.personalize`) against the latest global:
        the personal adapter is fitted with the global frozen and kept (unscaled) as the user's personal
        adapter; returns the result (with its gate) and the global version it was fitted against."""
        if data.user_id != self.user_id:
            raise ConfigError(f"agent of {self.user_id!r} got the data of {data.user_id!r}")
        spec = await self.source.spec(self.federation)
        self.check_spec(spec)
        fingerprint = spec.fingerprint()
        adapter = await self.source.latest(self.federation)
        self.check_adapter(adapter)
        personal = await asyncio.to_thread(self.personal_store.load, self.user_id, fingerprint)
        result = await asyncio.get_running_loop().run_in_executor(
            self.executor, personalize, self.trainer, adapter.state, personal, data, cfg
        )
        await asyncio.to_thread(self.personal_store.save, self.user_id, fingerprint, result.personal)
        return result, adapter.version

    def personal_adapter(self) -> StateDict | None:
        """The persisted personal adapter (``None`` before the first round)."""
        return self.personal_store.load(self.user_id, self.trainer.spec.fingerprint())
