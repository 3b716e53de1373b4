"""The edge agent: fetch the global adapter, train shared + personal adapters, send the shared delta.

One round (:meth:`EdgeAgent.run_round`):

1. the federation's spec and latest global adapter come through a :class:`~clients.source.GlobalSource`;
   a spec whose fingerprint (base model, task, LoRA config, seed) differs from the one the trainer was
   built for is refused with :class:`SpecMismatchError`;
2. the user's personal adapter is loaded (:class:`DiskPersonalStore`: ``<state_dir>/<user>/personal.
   safetensors``, written atomically) or starts fresh;
3. both adapters train in a worker thread (an executor, never the event loop);
4. the shared delta is clipped to ``clip_norm`` and, with ``noise_multiplier > 0``, gets Gaussian noise
   (local DP, recorded as ``DPMetadata`` in the update), then encoded (fp16 by default, or int8; zstd),
   signed with the client's HMAC key and framed (chunked when large);
5. the messages go to the durable on-disk outbox first, then the outbox is drained through the sender
   (:class:`OutboxPublisher`); the personal adapter is saved.

Delivery: an update leaves the outbox only after Kafka acknowledged every one of its messages
(idempotent producer, ``acks=all``). While the broker is unreachable, updates stay queued (bounded:
:class:`~clients.outbox.OutboxFull`) and the next round or :meth:`OutboxPublisher.flush` retries with
exponential back-off. :class:`KafkaSender` remembers the in-flight futures of an update whose send timed
out, so a retry waits for those instead of producing the messages again; only an agent restart (or a
producer that had to be replaced) can send an update twice, and the aggregator drops the copy by its
update id. Either way every update is aggregated exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import struct
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import safetensors.torch
import torch
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError

from clients.data import UserData
from clients.outbox import DrainResult, Outbox, OutboxItem, Sender
from clients.privacy import PrivatizedDelta, check_privacy_options, privatize
from clients.source import GlobalAdapter, GlobalSource
from clients.training import AdapterTrainer, TrainConfig, TrainResult
from clients.updates import build_update, update_messages
from schemas.codec import decode_tensors
from schemas.errors import CodecError, ConfigError, PFIError
from schemas.events import (
    AdapterUpdate,
    DPMetadata,
    Envelope,
    FederationSpec,
    TensorEncoding,
    TrainingMetrics,
)
from schemas.signing import MIN_KEY_BYTES, REDIS_KEYS_HASH, derive_client_key
from services.settings import EdgeSettings, PFISettings
from services.stack.topics import producer_limits

log = logging.getLogger("pfi.edge")

StateDict = dict[str, torch.Tensor]
PERSONAL_FILE = "personal.safetensors"
KEY_FILE = "client.key"
_RAW_F32 = TensorEncoding(dtype="float32", quantization="none", compression="none")


class SpecMismatchError(PFIError):
    """The federation's spec (or its global adapter) is not the one this agent's trainer was built for."""


class AgentClosedError(PFIError):
    """The sender was closed."""


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


# --------------------------------------------------------------------------------------------- keys


def _atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def key_file(state_dir: Path, client_id: str) -> Path:
    return state_dir / client_id / KEY_FILE


def read_key_file(path: Path) -> bytes:
    try:
        key = bytes.fromhex(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read the client key {path}: {err}") from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"client key {path} has {len(key)} bytes, at least {MIN_KEY_BYTES} required")
    return key


def master_key(settings: PFISettings) -> bytes | None:
    if not settings.signing_master_key:
        return None
    try:
        return bytes.fromhex(settings.signing_master_key)
    except ValueError:
        raise ConfigError("PFI_SIGNING_MASTER_KEY must be hex") from None


async def _registered_key(redis: Any, client_id: str) -> bytes | None:
    raw = await redis.hget(REDIS_KEYS_HASH, client_id)
    if raw is None:
        return None
    try:
        return bytes.fromhex(raw.decode() if isinstance(raw, bytes) else str(raw))
    except ValueError:
        return None


async def ensure_client_key(
    client_id: str,
    *,
    settings: PFISettings,
    state_dir: Path | None = None,
    redis: Any | None = None,
    key: bytes | None = None,
) -> bytes:
    """The HMAC key the agent signs with, in this order:

    1. ``key`` when given (registered in Redis too when ``redis`` is given and it is missing there);
    2. the key file ``<state_dir>/<client>/client.key`` (re-registered in Redis if the registry lost it;
       a *different* registered key is an error: two agents would share one client id);
    3. derived from ``PFISettings.signing_master_key`` (fleets, simulations; nothing is written);
    4. a fresh key registered in Redis (``admin.register_client``) and saved to the key file (0600).
    """
    from services.federation.admin import register_client

    async def registered(candidate: bytes, origin: str) -> bytes:
        if redis is None:
            return candidate
        current = await _registered_key(redis, client_id)
        if current is None:
            await register_client(redis, client_id, candidate)
        elif current != candidate:
            raise ConfigError(
                f"client {client_id!r} is registered with another key than {origin}; use another client id "
                "or remove the local key file to register a new key"
            )
        return candidate

    if key is not None:
        if len(key) < MIN_KEY_BYTES:
            raise ConfigError(f"client keys need at least {MIN_KEY_BYTES} bytes")
        return await registered(key, "the one given")
    path = key_file(state_dir, client_id) if state_dir is not None else None
    if path is not None and path.exists():
        return await registered(read_key_file(path), str(path))
    master = master_key(settings)
    if master is not None:
        return derive_client_key(master, client_id)
    if redis is None:
        raise ConfigError(
            f"no signing key for client {client_id!r}: no key file, no PFI_SIGNING_MASTER_KEY and no Redis "
            "to register one in"
        )
    new_key = await register_client(redis, client_id)
    if path is not None:
        await asyncio.to_thread(_atomic_write, path, new_key.hex().encode() + b"\n", mode=0o600)
    return new_key


# ---------------------------------------------------------------------------------- personal adapters


class PersonalStore(Protocol):
    """Where an agent keeps its user's personal adapter (it never leaves the device)."""

    def load(self, user_id: str, fingerprint: str) -> StateDict | None: ...

    def save(self, user_id: str, fingerprint: str, state: StateDict) -> None: ...


def _safetensors_metadata(blob: bytes) -> dict[str, str]:
    if len(blob) < 8:
        raise CodecError("too short for a safetensors file")
    (size,) = struct.unpack_from("<Q", blob, 0)
    if size > len(blob) - 8:
        raise CodecError("safetensors header length past the end of the file")
    header = json.loads(blob[8 : 8 + size])
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise CodecError("safetensors metadata is not an object")
    return {str(k): str(v) for k, v in meta.items()}


class DiskPersonalStore:
    """``<state_dir>/<user>/personal.safetensors`` (fp32 safetensors, read back through
    :func:`schemas.codec.decode_tensors`), written atomically (tmp + fsync + rename). The file records
    the federation spec's fingerprint; an adapter of another spec is moved aside and a fresh one used."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def path(self, user_id: str) -> Path:
        return self.state_dir / user_id / PERSONAL_FILE

    def load(self, user_id: str, fingerprint: str) -> StateDict | None:
        path = self.path(user_id)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            meta = _safetensors_metadata(blob)
            state = decode_tensors(blob, _RAW_F32, max_decoded_bytes=max(len(blob) * 2, 1 << 20))
        except (CodecError, ValueError) as err:
            aside = path.with_name(f"{PERSONAL_FILE}.corrupt-{time.time_ns()}")
            path.rename(aside)
            log.error("personal adapter %s is unreadable (%s); moved to %s, starting fresh", path, err, aside)
            return None
        if meta.get("spec_fingerprint") != fingerprint:
            old = meta.get("spec_fingerprint", "unknown")[:12]
            aside = path.with_name(f"{PERSONAL_FILE}.spec-{old}")
            path.rename(aside)
            log.warning(
                "personal adapter %s belongs to another federation spec (%s); kept as %s, starting fresh",
                path,
                old,
                aside,
            )
            return None
        return state

    def save(self, user_id: str, fingerprint: str, state: StateDict) -> None:
        tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
        meta = {"spec_fingerprint": fingerprint, "user_id": user_id, "saved_at": f"{time.time():.3f}"}
        _atomic_write(self.path(user_id), bytes(safetensors.torch.save(tensors, metadata=meta)))


class MemoryPersonalStore:
    """Personal adapters in memory (a fleet simulation: per virtual client, only its adapter)."""

    def __init__(self) -> None:
        self._states: dict[str, tuple[str, StateDict]] = {}

    def load(self, user_id: str, fingerprint: str) -> StateDict | None:
        entry = self._states.get(user_id)
        return entry[1] if entry is not None and entry[0] == fingerprint else None

    def save(self, user_id: str, fingerprint: str, state: StateDict) -> None:
        self._states[user_id] = (fingerprint, state)

    def __len__(self) -> int:
        return len(self._states)


# ------------------------------------------------------------------------------------------ sending


@dataclass
class _InFlight:
    generation: int
    futures: list[asyncio.Future[Any]]


class KafkaSender:
    """A :class:`~clients.outbox.Sender` over an idempotent ``acks=all`` aiokafka producer that survives
    broker outages.

    * The producer starts lazily, so an agent can start (and queue updates) while the broker is down;
      a failed start is retried on the next send.
    * When a send is cancelled (the outbox's per-update timeout), its futures stay with the producer
      (an idempotent producer retries them until the broker is back) and are remembered by the content
      digest of the messages: the retry of the same outbox item awaits them instead of producing again.
    * When the producer reports a delivery failure, it is replaced by a fresh one (new producer id).
    """

    def __init__(
        self,
        settings: PFISettings,
        *,
        client_id: str = "pfi-edge",
        request_timeout_ms: int = 15_000,
        stop_timeout_s: float = 5.0,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.request_timeout_ms = request_timeout_ms
        self.stop_timeout_s = stop_timeout_s
        self._producer: AIOKafkaProducer | None = None
        self._generation = 0
        self._inflight: dict[bytes, _InFlight] = {}
        self._start_lock = asyncio.Lock()
        self._closed = False
        self.messages_sent = 0
        self.resets = 0

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap(),
            client_id=self.client_id,
            acks="all",
            enable_idempotence=True,
            request_timeout_ms=self.request_timeout_ms,
            **producer_limits(self.settings),
        )

    async def _started(self) -> AIOKafkaProducer:
        async with self._start_lock:
            if self._closed:
                raise AgentClosedError("the Kafka sender is closed")
            if self._producer is not None:
                return self._producer
            producer = self._new_producer()
            try:
                await producer.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(producer.stop(), self.stop_timeout_s)
                raise
            self._producer = producer
            self._generation += 1
            return producer

    async def _reset(self, reason: str) -> None:
        producer, self._producer = self._producer, None
        self._inflight.clear()
        self.resets += 1
        log.warning("replacing the Kafka producer: %s", reason)
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), self.stop_timeout_s)

    async def send_raw(self, federation: str, messages: list[bytes]) -> int:
        digest = hashlib.sha256(b"".join(hashlib.sha256(m).digest() for m in messages)).digest()
        producer = await self._started()
        entry = self._inflight.get(digest)
        if entry is None or entry.generation != self._generation:
            entry = _InFlight(self._generation, [])
            self._inflight[digest] = entry
        key = federation.encode()
        try:
            for message in messages[len(entry.futures) :]:
                entry.futures.append(await producer.send(self.settings.updates_topic, message, key=key))
        except KafkaTimeoutError:
            raise  # no metadata yet (broker unreachable): the producer itself is fine
        except asyncio.CancelledError:
            raise
        except Exception as err:
            await self._reset(f"send failed: {type(err).__name__}: {err}")
            raise
        try:
            for future in entry.futures:
                await asyncio.shield(future)  # a cancelled wait leaves the message in flight
        except asyncio.CancelledError:
            raise
        except Exception as err:
            await self._reset(f"delivery failed: {type(err).__name__}: {err}")
            raise
        self._inflight.pop(digest, None)
        self.messages_sent += len(messages)
        return len(messages)

    @property
    def in_flight(self) -> int:
        """Updates whose send was interrupted and whose messages may still be delivered."""
        return len(self._inflight)

    async def close(self) -> None:
        self._closed = True
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            await asyncio.wait_for(producer.stop(), self.stop_timeout_s)
        except (TimeoutError, Exception) as err:  # broker gone with messages in flight
            log.warning(
                "Kafka producer did not stop cleanly (%s); %d interrupted update(s) stay in the outbox",
                type(err).__name__,
                len(self._inflight),
            )

    async def __aenter__(self) -> KafkaSender:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()


class OutboxPublisher:
    """Queues updates in an :class:`Outbox` and drains it through a sender, one drain at a time, with
    exponential back-off (jittered) after failures. Share one publisher between agents that share an
    outbox (a fleet): the lock makes sure no item is sent by two drains at once."""

    def __init__(
        self,
        outbox: Outbox,
        sender: Sender,
        *,
        send_timeout_s: float = 30.0,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 30.0,
    ) -> None:
        self.outbox = outbox
        self.sender = sender
        self.send_timeout_s = send_timeout_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.sent_total = 0
        self.failed_attempts = 0
        self.last_error: str | None = None
        self._backoff = retry_initial_s
        self._next_attempt = 0.0
        self._lock = asyncio.Lock()
        self._rng = random.Random()

    async def enqueue(self, update_id: str, federation: str, messages: list[bytes]) -> OutboxItem:
        """Persist an update (raises :class:`~clients.outbox.OutboxFull` when the bound is reached)."""
        return await asyncio.to_thread(self.outbox.put, update_id, federation, messages)

    def backing_off(self) -> float:
        """Seconds until the next drain attempt is due (0 when due)."""
        return max(0.0, self._next_attempt - time.monotonic())

    def _failed(self, error: str) -> None:
        self.failed_attempts += 1
        self.last_error = error
        wait = self._backoff * self._rng.uniform(0.8, 1.2)
        self._next_attempt = time.monotonic() + wait
        self._backoff = min(self._backoff * 2, self.retry_max_s)
        log.warning("outbox: send failed (%s); %d queued, retrying in %.1fs", error, len(self.outbox), wait)

    def _succeeded(self) -> None:
        self._backoff = self.retry_initial_s
        self._next_attempt = 0.0
        self.last_error = None

    async def drain(self, *, force: bool = False) -> DrainResult:
        """Send everything queued, in order, until empty or the first failure. Without ``force`` a drain
        inside the back-off window after a failure sends nothing (the update stays queued)."""
        async with self._lock:
            if not force and self.backing_off() > 0:
                return DrainResult(0, len(self.outbox), f"backing off after: {self.last_error}")
            sent = 0
            while True:
                result = await self.outbox.drain(self.sender, timeout_s=self.send_timeout_s)
                sent += result.sent
                self.sent_total += result.sent
                if result.error is not None:
                    self._failed(result.error)
                    return DrainResult(sent, result.remaining, result.error)
                if len(self.outbox) == 0:  # items queued meanwhile are sent in this drain too
                    self._succeeded()
                    return DrainResult(sent, 0)

    async def flush(self, timeout_s: float) -> DrainResult:
        """Drain until the outbox is empty or ``timeout_s`` passed, retrying with back-off."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        sent = 0
        while True:
            result = await self.drain(force=True)
            sent += result.sent
            if result.remaining == 0:
                return DrainResult(sent, 0)
            left = deadline - loop.time()
            if left > 0:
                await asyncio.sleep(min(self.backing_off(), left))
            if loop.time() >= deadline:
                return DrainResult(sent, len(self.outbox), result.error)


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

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
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
    """One user's agent. ``trainer`` may be shared by many agents (a fleet): calls are serialized."""

    def __init__(
        self,
        federation: str,
        user_id: str,
        key: bytes,
        source: GlobalSource,
        trainer: AdapterTrainer,
        outbox: Outbox,
        sender: Sender,
        settings: PFISettings,
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
        self.settings = settings
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

    def _prepare(self, base_version: int, spec_fingerprint: str, result: TrainResult) -> _Prepared:
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
        return _Prepared(envelope, update_messages(envelope, self.settings), private)

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
        if pause is not None:
            await pause(result.seconds)
        prepared = await asyncio.to_thread(self._prepare, adapter.version, fingerprint, result)
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
        )

    async def flush(self, timeout_s: float) -> DrainResult:
        """Send whatever is queued, retrying with back-off for up to ``timeout_s``."""
        return await self.publisher.flush(timeout_s)

    def personal_adapter(self) -> StateDict | None:
        """The persisted personal adapter (``None`` before the first round)."""
        return self.personal_store.load(self.user_id, self.trainer.spec.fingerprint())
