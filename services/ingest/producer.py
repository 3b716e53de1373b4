"""The one Kafka producer of adapter updates on the server side (the ingest route, harnesses, tests).

:class:`UpdateProducer` wraps an idempotent ``acks=all`` aiokafka producer that connects through
:func:`services.transport.kafka_kwargs` (the ``ingest`` principal by default) with the topic's size
limits (:func:`services.stack.topics.producer_limits`). Every message of an update is keyed by its
federation, so its chunks land on one partition, in order.

It survives broker outages, so it also serves as an outbox :class:`Sender` (``send_raw``) for harnesses
that act as devices and the ingest at once:

* the producer starts lazily (or explicitly with :meth:`start` / ``async with``), and a failed start is
  retried on the next send;
* when a send is cancelled (an outbox's per-update timeout), its futures stay with the producer (an
  idempotent producer retries them until the broker is back) and are remembered by the content digest of
  the messages: the retry of the same messages awaits them instead of producing again;
* when the producer reports a delivery failure, it is replaced by a fresh one (new producer id).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError

from schemas.chunking import split_update
from schemas.errors import PFIError
from schemas.events import AdapterUpdate, Envelope
from services.settings import PFISettings
from services.stack.topics import producer_limits
from services.transport import Principal, kafka_kwargs

log = logging.getLogger("pfi.ingest.producer")


class ProducerClosedError(PFIError):
    """The producer was closed."""


@dataclass(frozen=True)
class Produced:
    """Where Kafka stored a message."""

    partition: int
    offset: int


@dataclass
class _InFlight:
    generation: int
    futures: list[asyncio.Future[Any]]


class UpdateProducer:
    """Produces updates to the updates topic; ``send``/``send_raw``/``produce`` return once Kafka
    acknowledged (``acks=all``) every message."""

    def __init__(
        self,
        settings: PFISettings,
        *,
        principal: Principal = "ingest",
        client_id: str = "pfi-ingest",
        request_timeout_ms: int = 15_000,
        stop_timeout_s: float = 5.0,
    ) -> None:
        self.settings = settings
        self.principal: Principal = principal
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

    @property
    def producer(self) -> AIOKafkaProducer:
        """The started aiokafka producer (raw access for tests and harnesses: other keys, raw bytes)."""
        if self._producer is None:
            raise ProducerClosedError("the update producer is not started (use start() or async with)")
        return self._producer

    @property
    def topic(self) -> str:
        return self.settings.updates_topic

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            client_id=self.client_id,
            acks="all",
            enable_idempotence=True,
            request_timeout_ms=self.request_timeout_ms,
            **producer_limits(self.settings),
            **kafka_kwargs(self.settings, self.principal),
        )

    async def _started(self) -> AIOKafkaProducer:
        async with self._start_lock:
            if self._closed:
                raise ProducerClosedError("the update producer is closed")
            if self._producer is None:
                producer = self._new_producer()
                try:
                    await producer.start()
                except BaseException:
                    await _stop_quietly(producer, self.stop_timeout_s)
                    raise
                self._producer = producer
            return self._producer

    async def start(self) -> None:
        """Connect now (raises when the broker is unreachable); otherwise the first send connects."""
        await self._started()

    async def _reset(self, reason: str) -> None:
        """Replace the producer after a delivery failure (its in-flight futures are abandoned)."""
        async with self._start_lock:
            producer, self._producer = self._producer, None
            self._generation += 1
            self._inflight.clear()
            self.resets += 1
        log.warning("Kafka producer reset (%s)", reason)
        if producer is not None:
            await _stop_quietly(producer, self.stop_timeout_s)

    async def produce(self, federation: str, message: bytes, *, key: str | None = None) -> Produced:
        """Produce one message keyed by ``key`` (default ``federation``; see :func:`update_key`); raises the
        Kafka error when it is not stored."""
        producer = await self._started()
        try:
            future = await producer.send(self.topic, message, key=(key or federation).encode())
        except KafkaTimeoutError:
            raise  # no metadata (broker unreachable): the producer itself is fine
        except asyncio.CancelledError:
            raise
        except Exception as err:
            await self._reset(f"send failed: {type(err).__name__}: {err}")
            raise
        try:
            meta = await future
        except asyncio.CancelledError:
            raise
        except Exception as err:
            await self._reset(f"delivery failed: {type(err).__name__}: {err}")
            raise
        self.messages_sent += 1
        return Produced(int(meta.partition), int(meta.offset))

    async def send_raw(self, federation: str, messages: list[bytes], *, key: str | None = None) -> int:
        """Produce the messages of one update in order (the outbox :class:`Sender` interface); returns
        how many. A retry of messages whose earlier send was interrupted awaits those sends."""
        producer = await self._started()
        digest = hashlib.sha256(b"".join(hashlib.sha256(m).digest() for m in messages)).digest()
        entry = self._inflight.get(digest)
        if entry is None or entry.generation != self._generation:
            entry = _InFlight(self._generation, [])
            self._inflight[digest] = entry
        kafka_key = (key or federation).encode()
        try:
            for message in messages[len(entry.futures) :]:
                entry.futures.append(await producer.send(self.topic, message, key=kafka_key))
        except KafkaTimeoutError:
            raise
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

    async def send(
        self, envelope: Envelope[AdapterUpdate], *, key: bytes | None = None, kafka_key: str | None = None
    ) -> int:
        """Produce an update (chunked at ``settings.chunk_bytes`` when large; chunks signed with ``key``);
        returns the number of Kafka messages. ``kafka_key``: the message key (default: the federation)."""
        messages = split_update(envelope, self.settings.chunk_bytes, key=key)
        return await self.send_raw(envelope.data.federation, messages, key=kafka_key)

    @property
    def in_flight(self) -> int:
        """Updates whose send was interrupted and whose messages may still be delivered."""
        return len(self._inflight)

    async def close(self) -> None:
        self._closed = True
        producer, self._producer = self._producer, None
        if producer is None:
            return
        if not await _stop_quietly(producer, self.stop_timeout_s):
            log.warning("Kafka producer did not stop cleanly; %d interrupted update(s)", len(self._inflight))

    async def stop(self) -> None:
        await self.close()

    async def __aenter__(self) -> UpdateProducer:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()


async def _stop_quietly(producer: AIOKafkaProducer, timeout_s: float) -> bool:
    try:
        await asyncio.wait_for(producer.stop(), timeout_s)
    except (TimeoutError, Exception):  # broker gone with messages in flight
        return False
    return True


def update_key(federation: str, client_id: str, topology: str = "single") -> str:
    """The Kafka key of a federation's update messages (issue 15). ``single``: the federation (one
    partition, one aggregator); ``hierarchical``: ``federation/client`` (spread over the partitions by
    client: every chunk of one upload, and every upload of one client, on one partition and one leaf).
    Names and client ids never contain ``/`` (``schemas.events``)."""
    return federation if topology == "single" else f"{federation}/{client_id}"
