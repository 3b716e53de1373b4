"""The attack rig: one ``pfi aggregator`` and one ``pfi serve`` (ingest + API) as real OS processes on the
local stack, this run's own topics (and their ACLs) and federations on ``pfi/tiny-llama``, devices enrolled
through the enrollment route with an admin-issued enrollment token, and the raw access an attacker (or a
compromised producer: the ``admin`` Kafka principal) has.

Honest uploads are recorded (federation, client, update id) when the ingest answered 202 for every one
of their messages: the exactly-once audit holds the versions to that list.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import tempfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from redis.asyncio import Redis

from bench.common import MIB, BenchError, drop_federation, say
from clients.updates import build_update, update_messages
from modeling.base import TINY_LLAMA
from modeling.blobs import BLOB_ENCODING
from modeling.lora import StateDict
from schemas.codec import decode_tensors
from schemas.events import (
    AdapterUpdate,
    AggregationSpec,
    Envelope,
    FederationSpec,
    LoraSpec,
    TensorEncoding,
    UpdateRejected,
)
from schemas.frame import decode_frame
from schemas.records import VersionMeta
from services.federation.admin import create_federation
from services.identity import Enrollment
from services.personalization.auth import TokenSigner
from services.settings import PFISettings
from services.stack.processes import ServiceProcess, child_env, free_port, pfi_command
from services.stack.topics import delete_topics, ensure_topics, producer_limits
from services.store.versions import VersionStore
from services.transport import kafka_kwargs

#: Uncompressed float32: what the aggregator decodes is exactly what the rig sent (the weighting check
#: recomputes versions from the deltas).
RAW = TensorEncoding(dtype="float32", quantization="none", compression="none")
#: Ingest limits of the serve process: small enough that one client reaches its byte quota quickly, large
#: enough for every honest upload of the run.
INGEST_BURST_BYTES = 8 * MIB
INGEST_BYTES_PER_S = 1 * MIB

Pair = tuple[str, str, str]  # (federation, client id, update id)


@dataclass(frozen=True)
class Device:
    """An enrolled device: its federation, id, signing key (from the enrollment answer) and device token."""

    spec: FederationSpec
    client_id: str
    key: bytes
    token: str

    @property
    def federation(self) -> str:
        return self.spec.name

    def update(
        self,
        delta: StateDict,
        *,
        base_version: int,
        num_samples: int = 10,
        update_id: str | None = None,
        key: bytes | bool | None = True,
    ) -> Envelope[AdapterUpdate]:
        """An update signed with the device's key (``key=False``: unsigned; bytes: signed with those)."""
        signing = self.key if key is True else (None if key is False else key)
        assert signing is None or isinstance(signing, bytes)
        return build_update(
            federation=self.federation,
            client_id=self.client_id,
            spec_fingerprint=self.spec.fingerprint(),
            base_version=base_version,
            num_samples=num_samples,
            delta=delta,
            key=signing,
            encoding=RAW,
            update_id=update_id,
        )


def tiny_spec(name: str, **aggregation: Any) -> FederationSpec:
    return FederationSpec(
        name=name,
        base_model=TINY_LLAMA,
        lora=LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj")),
        aggregation=AggregationSpec(**aggregation),
    )


def random_delta(shapes: dict[str, tuple[int, ...]], seed: int, scale: float = 0.01) -> StateDict:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) * scale for k, s in shapes.items()}


def l2(state: StateDict) -> float:
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in state.values()))


@dataclass
class Rig:
    """Everything the attacks share; :meth:`start` / :meth:`close` bracket a run."""

    workdir: Path
    hexid: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    secret: str = field(default_factory=lambda: secrets.token_hex(32))
    honest_sent: list[Pair] = field(default_factory=list)
    honest_refused: list[Pair] = field(default_factory=list)  # honest uploads the ingest did not accept
    exits: dict[str, int] = field(default_factory=dict)  # unexpected exits seen while running

    def __post_init__(self) -> None:
        self.settings = PFISettings(topic_prefix=f"atk-{self.hexid}")
        self.signer = TokenSigner(self.secret.encode())
        # The product defaults (uniform weighting, norm bound, one update per client per buffer) with a
        # short flush timeout so that a quiet federation moves on; every version kept for the audit.
        self.main = tiny_spec(f"atk-{self.hexid}", flush_timeout_s=2.0, keep_versions=100_000)
        # Weighting: exactly 3 honest + 1 attacker per version (full buffers only), no staleness discount.
        self.weights = tiny_spec(
            f"atkw-{self.hexid}", buffer_size=4, flush_timeout_s=3600.0, staleness="constant",
            keep_versions=100_000,
        )  # fmt: skip
        self.redis: Redis = Redis.from_url(self.settings.redis())
        self.store = VersionStore(self.redis)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.procs: dict[str, ServiceProcess] = {}
        self._http: httpx.AsyncClient | None = None
        self._producer: AIOKafkaProducer | None = None
        self._created: list[str] = []

    # -- life cycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        await ensure_topics(self.settings)
        for spec in (self.main, self.weights):
            await create_federation(self.store, spec)
            self._created.append(spec.name)
        blob = await self.store.get_blob(self.main.name, 0)
        if blob is None:
            raise BenchError("v0 has no blob")
        decoded = decode_tensors(blob, BLOB_ENCODING, max_decoded_bytes=1 << 30)
        self.shapes = {k: tuple(t.shape) for k, t in decoded.items()}
        agg_port, serve_port = free_port(), free_port()
        agg_env = child_env(
            self.settings,
            PFI_AGGREGATOR_PORT=str(agg_port),
            PFI_AGGREGATOR_GROUP_ID=f"pfi-aggregator-{self.settings.topic_prefix}",  # the ACLs' prefix
            PFI_AGGREGATOR_PROGRESS_INTERVAL_S="0.5",
        )
        serve_env = child_env(
            self.settings,
            PFI_SERVE_PORT=str(serve_port),
            PFI_SERVE_TOKEN_SECRET=self.secret,
            PFI_INGEST_CLIENT_BURST_BYTES=str(INGEST_BURST_BYTES),
            PFI_INGEST_CLIENT_BYTES_PER_S=str(INGEST_BYTES_PER_S),
        )
        self.procs = {
            "aggregator": ServiceProcess(
                "aggregator", pfi_command("aggregator"), agg_env, self.workdir / "aggregator.log",
                f"http://127.0.0.1:{agg_port}",
            ),
            "serve": ServiceProcess(
                "serve", pfi_command("serve"), serve_env, self.workdir / "serve.log",
                f"http://127.0.0.1:{serve_port}",
            ),
        }  # fmt: skip
        for proc in self.procs.values():
            proc.start()
        for proc in self.procs.values():
            await proc.wait_ready(300.0)
        self._http = httpx.AsyncClient(base_url=self.procs["serve"].url, timeout=60.0)
        self._producer = AIOKafkaProducer(
            **kafka_kwargs(self.settings, "admin"), acks="all", **producer_limits(self.settings)
        )
        await self._producer.start()

    async def close(self) -> dict[str, int | None]:
        """Stop the processes (SIGTERM); their exit statuses. Drops this run's federations and topics."""
        codes: dict[str, int | None] = {}
        self.poll_exits()
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
        if self._http is not None:
            await self._http.aclose()
        for name, proc in self.procs.items():
            codes[name] = await asyncio.to_thread(proc.stop)
        with contextlib.suppress(Exception):
            for name in self._created:
                await drop_federation(self.redis, name)
        await self.redis.aclose()
        s = self.settings
        with contextlib.suppress(Exception):
            await delete_topics(s, [s.updates_topic, s.dlq_topic, s.versions_topic])
        return codes

    def poll_exits(self) -> dict[str, int]:
        """Processes that exited on their own so far (polls the Popen objects)."""
        for name, proc in self.procs.items():
            code = None if proc.proc is None else proc.proc.poll()
            if code is not None and name not in self.exits:
                self.exits[name] = code
                say(f"  !! {name} exited with status {code}; log {proc.log_path}:\n{proc.tail()}")
        return self.exits

    @property
    def http(self) -> httpx.AsyncClient:
        assert self._http is not None, "start() first"
        return self._http

    @property
    def serve_pid(self) -> int:
        return int(self.procs["serve"].pid or 0)

    @property
    def serve_port(self) -> int:
        return int(self.procs["serve"].url.rsplit(":", 1)[1])

    # -- identities ---------------------------------------------------------------------------------
    def admin_headers(self, fed: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.signer.issue('ops', federation=fed, role='admin')}"}

    async def enroll_many(self, spec: FederationSpec, client_ids: Iterable[str]) -> list[Device]:
        """Devices enrolled through ``POST /v1/federations/{fed}/enroll`` with one admin-issued token."""
        ids = list(client_ids)
        issued = await Enrollment(self.redis).issue(spec.name, uses=len(ids), ttl_s=600)
        devices = []
        for cid in ids:
            r = await self.http.post(
                f"/v1/federations/{spec.name}/enroll",
                json={"client_id": cid},
                headers={"Authorization": f"Bearer {issued.token}"},
            )
            if r.status_code != 201:
                raise BenchError(f"enrolling {cid} in {spec.name}: HTTP {r.status_code} {r.text[:300]}")
            body = r.json()
            devices.append(Device(spec, body["client_id"], bytes.fromhex(body["signing_key"]), body["token"]))
        return devices

    # -- the ingest route ---------------------------------------------------------------------------
    async def post_update(
        self, fed: str, body: bytes | Any, token: str | None, **headers: str
    ) -> httpx.Response:
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        headers.setdefault("Content-Type", "application/octet-stream")
        return await self.http.post(f"/v1/federations/{fed}/updates", content=body, headers=headers)

    def messages(
        self, device: Device, envelope: Envelope[AdapterUpdate], chunk_bytes: int | None
    ) -> list[bytes]:
        return update_messages(envelope, chunk_bytes or self.settings.chunk_bytes, key=device.key)

    async def upload(
        self, device: Device, envelope: Envelope[AdapterUpdate], *, chunk_bytes: int | None = None,
        honest: bool = True,
    ) -> list[int]:  # fmt: skip
        """Send an update's messages through the ingest with ``device``'s token; the statuses. An honest
        upload all of whose messages were accepted (202) joins the exactly-once audit."""
        statuses = []
        for message in self.messages(device, envelope, chunk_bytes):
            statuses.append((await self.post_update(device.federation, message, device.token)).status_code)
        if honest:
            pair = (device.federation, device.client_id, envelope.data.update_id)
            if set(statuses) == {202}:
                self.honest_sent.append(pair)
            else:
                say(f"  !! an honest upload of {device.client_id} was refused: {statuses}")
                self.honest_refused.append(pair)
        return statuses

    async def honest_round(self, devices: list[Device], seed: int) -> list[Pair]:
        """One update per device (against the federation's latest version); waits until all are seen."""
        sent: list[Pair] = []
        for i, device in enumerate(devices):
            base = await self.store.latest(device.federation) or 0
            env = device.update(random_delta(self.shapes, seed * 1000 + i), base_version=base)
            if set(await self.upload(device, env)) == {202}:
                sent.append((device.federation, device.client_id, env.data.update_id))
        await self.wait_seen(sent)
        return sent

    # -- raw Kafka (a compromised producer: the admin principal) ------------------------------------
    async def kafka_send(self, key: str, messages: list[bytes]) -> None:
        assert self._producer is not None
        for message in messages:
            await self._producer.send_and_wait(self.settings.updates_topic, message, key=key.encode())

    async def dead_letters(self, *, settle_s: float = 1.0) -> list[UpdateRejected]:
        """Every ``UpdateRejected`` of this run's DLQ topic so far (read until ``settle_s`` of quiet)."""
        consumer = AIOKafkaConsumer(
            self.settings.dlq_topic,
            **kafka_kwargs(self.settings, "admin"),
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        out: list[UpdateRejected] = []
        try:
            quiet_since = time.monotonic()
            while time.monotonic() - quiet_since < settle_s:
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    for r in records:
                        data = decode_frame(r.value, max_frame_bytes=1 << 24).data
                        if isinstance(data, UpdateRejected):
                            out.append(data)
                    quiet_since = time.monotonic()
        finally:
            await consumer.stop()
        return out

    async def wait_dead_letters(self, predicate: Any, *, timeout_s: float = 30.0) -> list[UpdateRejected]:
        """Wait until ``predicate(records)`` holds for the DLQ; returns the records (even on a timeout)."""
        deadline = time.monotonic() + timeout_s
        while True:
            records = await self.dead_letters(settle_s=0.5)
            if predicate(records) or time.monotonic() > deadline:
                return records
            await asyncio.sleep(0.5)

    # -- the store ----------------------------------------------------------------------------------
    async def wait_seen(self, pairs: Iterable[Pair], timeout_s: float = 60.0) -> bool:
        pending = set(pairs)
        deadline = time.monotonic() + timeout_s
        while pending:
            for pair in list(pending):
                if await self.store.is_seen(*pair):
                    pending.discard(pair)
            if not pending:
                break
            self.poll_exits()
            if time.monotonic() > deadline:
                say(f"  !! {len(pending)} update(s) not aggregated within {timeout_s:.0f}s")
                return False
            await asyncio.sleep(0.2)
        return True

    async def wait_head(self, fed: str, version: int, timeout_s: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while (await self.store.head(fed) or 0) < version:
            self.poll_exits()
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    async def metas(self, fed: str) -> list[VersionMeta]:
        out = []
        for version in range(1, (await self.store.head(fed) or 0) + 1):
            meta = await self.store.get_meta(fed, version)
            if meta is not None:
                out.append(meta)
        return out

    async def global_state(self, fed: str, version: int) -> StateDict:
        blob = await self.store.get_blob(fed, version)
        if blob is None:
            raise BenchError(f"{fed} v{version} has no blob")
        return decode_tensors(blob, BLOB_ENCODING, max_decoded_bytes=1 << 30)


def new_workdir(path: str | None) -> Path:
    target = Path(path) if path else Path(tempfile.mkdtemp(prefix="pfi-attacks-"))
    target.mkdir(parents=True, exist_ok=True)
    return target
