"""The producer side of a chaos run: federations and signed clients, and a stream of updates whose every
Kafka acknowledgement is written to a :class:`Ledger`.

A send that fails (broker down, request timeout) is retried with the **same** update id, as an edge
agent's outbox does (``clients/``): if the first attempt did land, the aggregator must recognize the
second copy as a duplicate, never count it twice. The ledger is what the audit holds the federations to.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from redis.asyncio import Redis

from clients.updates import build_update
from modeling.base import TINY_LLAMA
from modeling.blobs import BLOB_ENCODING
from schemas.codec import decode_tensors
from schemas.events import AdapterUpdate, AggregationSpec, Envelope, FederationSpec, LoraSpec, TensorEncoding
from services.federation.admin import create_federation
from services.identity import ClientRegistry
from services.ingest.producer import UpdateProducer
from services.settings import PFISettings
from services.store.versions import VersionStore

#: Update encodings the streams cycle through; with ``chunk_bytes=4096`` on the tiny adapter they travel
#: as 3, 2, 2 and 1 Kafka message(s) respectively.
ENCODINGS = (
    TensorEncoding(dtype="float32", quantization="none", compression="none"),
    TensorEncoding(dtype="float32", quantization="none", compression="zstd"),
    TensorEncoding(dtype="float16", quantization="none", compression="zstd"),
    TensorEncoding(dtype="float32", quantization="int8", compression="zstd"),
)

Shapes = dict[str, tuple[int, ...]]


@dataclass
class Ledger:
    """Per federation, every update id Kafka acknowledged (in ack order), and what went wrong on the way."""

    acked: dict[str, list[str]] = field(default_factory=dict)
    abandoned: dict[str, list[str]] = field(default_factory=dict)  # never acknowledged within the limit
    retried: set[str] = field(default_factory=set)  # ids sent again after a failed attempt
    attempts: int = 0
    failures: int = 0
    messages: int = 0
    multi_chunk: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # exception type -> count

    def ack(self, federation: str, update_id: str, messages: int) -> None:
        self.acked.setdefault(federation, []).append(update_id)
        self.messages += messages
        self.multi_chunk += messages > 1

    def failure(self, update_id: str, err: BaseException) -> None:
        self.failures += 1
        self.retried.add(update_id)
        name = type(err).__name__
        self.errors[name] = self.errors.get(name, 0) + 1

    @property
    def total(self) -> int:
        return sum(len(ids) for ids in self.acked.values())

    def summary(self) -> dict[str, Any]:
        return {
            "acked": self.total,
            "abandoned": sum(len(ids) for ids in self.abandoned.values()),
            "send_attempts": self.attempts,
            "send_failures": self.failures,
            "retried_ids": len(self.retried),
            "messages": self.messages,
            "multi_chunk": self.multi_chunk,
            "errors": dict(self.errors),
        }


# ---------------------------------------------------------------------------------- federations


@dataclass(frozen=True)
class ChaosClient:
    """An edge client with a registered HMAC key; builds signed updates (the tests' ``Client`` too)."""

    spec: FederationSpec
    client_id: str
    key: bytes

    def update(
        self, delta: dict[str, torch.Tensor], base_version: int = 0, num_samples: int = 10, **kw: Any
    ) -> Envelope[AdapterUpdate]:
        """``kw``: the other arguments of :func:`clients.updates.build_update` (encoding, update_id...)."""
        return build_update(
            federation=self.spec.name,
            client_id=self.client_id,
            spec_fingerprint=self.spec.fingerprint(),
            base_version=base_version,
            num_samples=num_samples,
            delta=delta,
            key=self.key,
            **kw,
        )


def chaos_spec(name: str, **aggregation: Any) -> FederationSpec:
    """A federation on the tiny model; keeps every version so that the audit sees all of them."""
    agg = {"buffer_size": 3, "flush_timeout_s": 1.0, "max_staleness": 1000, "keep_versions": 100_000}
    # The audit wants every acknowledged update in a version: a client's backlog (after a kill) arrives in a
    # burst, so the one-update-per-client-per-buffer limit would dead-letter honest updates. Chaos tests
    # exactly-once, not poisoning (tests/fuzz/test_fuzz_poisoning.py): a client may fill a buffer.
    agg["max_client_updates"] = aggregation.get("buffer_size", agg["buffer_size"])
    return FederationSpec(
        name=name,
        base_model=TINY_LLAMA,
        lora=LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj")),
        aggregation=AggregationSpec(**{**agg, **aggregation}),
    )


async def create_federations(
    store: VersionStore, redis: Redis, names: Sequence[str], clients_per_federation: int, **aggregation: Any
) -> tuple[list[FederationSpec], list[ChaosClient], Shapes]:
    """Federations (v0 committed), registered clients, and the adapter's tensor shapes."""
    specs = [chaos_spec(name, **aggregation) for name in names]
    clients: list[ChaosClient] = []
    for spec in specs:
        await create_federation(store, spec)
        for _ in range(clients_per_federation):
            cid = f"c-{uuid.uuid4().hex[:8]}"
            clients.append(ChaosClient(spec, cid, await ClientRegistry(redis).register(spec.name, cid)))
    blob = await store.get_blob(specs[0].name, 0)
    assert blob is not None
    state = decode_tensors(blob, BLOB_ENCODING, max_decoded_bytes=1 << 30)
    return specs, clients, {k: tuple(v.shape) for k, v in state.items()}


def random_delta(shapes: Shapes, seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) * scale for k, s in shapes.items()}


# ---------------------------------------------------------------------------------------- stream


class ChaosStream:
    """Clients sending valid signed updates concurrently until told to stop (or ``per_client`` each);
    every acknowledged id goes to ``ledger``; failed sends are retried with the same id."""

    def __init__(
        self,
        settings: PFISettings,
        store: VersionStore,
        clients: Sequence[ChaosClient],
        shapes: Shapes,
        *,
        seed: int,
        ledger: Ledger | None = None,
        send_timeout_s: float = 20.0,
        give_up_s: float = 240.0,
    ) -> None:
        self.settings = settings
        self.store = store
        self.clients = list(clients)
        self.shapes = shapes
        self.seed = seed
        self.ledger = ledger or Ledger()
        self.send_timeout_s = send_timeout_s
        self.give_up_s = give_up_s
        self.stop = asyncio.Event()
        self._producer: UpdateProducer | None = None
        self._generation = 0
        self._lock = asyncio.Lock()
        self._latest: dict[str, int] = {}

    async def __aenter__(self) -> ChaosStream:
        await self._new_producer()
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._producer.stop(), 30)
            self._producer = None

    async def _new_producer(self) -> None:
        old, self._producer = self._producer, None
        if old is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(old.stop(), 10)
        producer = UpdateProducer(self.settings, client_id="pfi-chaos")
        await producer.start()
        self._producer = producer
        self._generation += 1

    async def run(self, gap_s: tuple[float, float], per_client: int | None = None) -> None:
        """Send until :attr:`stop` is set (and, with ``per_client``, at most that many per client)."""
        await asyncio.gather(*(self._client(i, c, per_client, gap_s) for i, c in enumerate(self.clients)))

    async def _base_version(self, federation: str) -> int:
        """The latest version as the client last saw it (Redis may be down: keep the old one)."""
        with contextlib.suppress(Exception):
            latest = await asyncio.wait_for(self.store.latest(federation), 2.0)
            self._latest[federation] = latest or 0
        return self._latest.get(federation, 0)

    async def _client(
        self, index: int, client: ChaosClient, count: int | None, gap_s: tuple[float, float]
    ) -> None:
        rng = random.Random(self.seed * 1000 + index)
        i = 0
        while not self.stop.is_set() and (count is None or i < count):
            envelope = client.update(
                random_delta(self.shapes, seed=rng.randrange(1 << 30)),
                base_version=await self._base_version(client.spec.name),
                num_samples=rng.randint(1, 64),
                encoding=ENCODINGS[(index + i) % len(ENCODINGS)],
            )
            await self.deliver(envelope, key=client.key)
            i += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), rng.uniform(*gap_s))

    async def deliver(self, envelope: Envelope[AdapterUpdate], *, key: bytes | None = None) -> bool:
        """Send until Kafka acknowledges (same update id on every attempt); False when abandoned. ``key``:
        the client's, to sign the chunks of a large update (the aggregator refuses unsigned chunks)."""
        federation, update_id = envelope.data.federation, envelope.data.update_id
        deadline = time.monotonic() + self.give_up_s
        delay, failed_here = 0.2, 0
        while True:
            self.ledger.attempts += 1
            generation = self._generation
            try:
                producer = self._producer
                if producer is None:
                    raise ConnectionError("no producer")
                sent = await asyncio.wait_for(producer.send(envelope, key=key), self.send_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # broker down, timeouts, a producer in a bad state: retry
                self.ledger.failure(update_id, err)
                failed_here += 1
                if time.monotonic() > deadline:
                    self.ledger.abandoned.setdefault(federation, []).append(update_id)
                    return False
                if failed_here >= 3:  # a fresh producer (once per generation, whoever comes first)
                    async with self._lock:
                        if generation == self._generation:
                            with contextlib.suppress(Exception):
                                await self._new_producer()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self.ledger.ack(federation, update_id, sent)
            return True
