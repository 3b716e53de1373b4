"""The generator's state and shared helpers: ids, deltas, signed/forged updates, raw/SDK/valid cases."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch

from clients.updates import build_update, update_messages
from modeling.lora import StateDict
from schemas.chunking import split_frame
from schemas.codec import sha256_hex
from schemas.errors import RejectReason
from schemas.events import (
    AdapterUpdate,
    Envelope,
    FederationSpec,
    TensorEncoding,
    TrainingMetrics,
    make_envelope,
)
from schemas.frame import encode_frame
from schemas.signing import sign_update
from services.settings import PFISettings
from tests.fuzz.cases.model import RAW, SDK, Case, Limits, Party


class GeneratorBase:
    """The generator's state and the helpers every category uses (see :mod:`tests.fuzz.cases`)."""

    def __init__(
        self,
        spec: FederationSpec,
        client: Party,
        other: Party,
        shapes: dict[str, tuple[int, ...]],
        limits: Limits,
        *,
        seed: int,
        honest_scale: float = 0.01,
    ) -> None:
        agg = spec.aggregation
        if agg.norm_policy != "reject" or agg.max_update_norm is None:
            raise ValueError("the fuzz target must reject over-norm updates (norm_policy='reject')")
        if agg.flush_timeout_s < 300:
            raise ValueError("the fuzz target must not flush on time (flush_timeout_s >= 300)")
        self.spec = spec
        self.client = client
        self.other = other
        self.shapes = dict(sorted(shapes.items()))
        self.names = list(self.shapes)
        self.limits = limits
        self.rng = random.Random(seed)
        self.torch_seed = seed * 1_000_003
        self.honest_scale = honest_scale
        self.K = agg.buffer_size
        self.max_staleness = agg.max_staleness
        self.norm_bound = agg.max_update_norm
        self.fingerprint = spec.fingerprint()
        self.key = spec.name.encode()
        self.ghost = spec.model_copy(update={"name": f"{spec.name}-ghost"})
        self.accepted = 0  # valid updates produced so far
        self.valid: list[Envelope[Any]] = []
        self.serial = 0

    # -- helpers ----------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        """The target's latest version when the next message is handled."""
        return self.accepted // self.K

    def uid(self, tag: str) -> str:
        self.serial += 1
        return f"fz-{tag}-{self.serial:05d}"

    def delta(self, scale: float | None = None) -> StateDict:
        self.torch_seed += 1
        gen = torch.Generator().manual_seed(self.torch_seed)
        s = self.honest_scale if scale is None else scale
        return {k: torch.randn(shape, generator=gen) * s for k, shape in self.shapes.items()}

    def fresh_base(self) -> int:
        """A base version a valid update may carry now (staleness 0..2, within max_staleness)."""
        return self.version - self.rng.randint(0, min(self.version, 2, self.max_staleness))

    def signed(
        self,
        delta: StateDict | None = None,
        *,
        party: Party | None = None,
        key: bytes | str | None = "own",
        tag: str = "u",
        **fields: Any,
    ) -> Envelope[Any]:
        """An update of the target built by the SDK (``key="own"``: signed by ``party``)."""
        party = party or self.client
        args: dict[str, Any] = {
            "federation": self.spec.name,
            "client_id": party.client_id,
            "spec_fingerprint": self.fingerprint,
            "base_version": self.fresh_base(),
            "num_samples": self.rng.randint(1, 50),
            "update_id": self.uid(tag),
            "key": party.key if key == "own" else key,
        }
        return build_update(delta=self.delta() if delta is None else delta, **{**args, **fields})

    def forged(
        self,
        payload: bytes,
        encoding: TensorEncoding,
        *,
        key: bytes | None = None,
        tag: str = "f",
        **fields: Any,
    ) -> Envelope[Any]:
        """A correctly signed update around an arbitrary ``payload`` (bypasses the SDK's encoder)."""
        values: dict[str, Any] = {
            "federation": self.spec.name,
            "client_id": self.client.client_id,
            "update_id": self.uid(tag),
            "base_version": self.fresh_base(),
            "num_samples": 5,
            "spec_fingerprint": self.fingerprint,
            "encoding": encoding,
            "payload_sha256": sha256_hex(payload),
            "payload": payload,
            **fields,
        }
        update = AdapterUpdate.model_construct(**values)  # no validation: fields may be out of range
        update = update.model_copy(update={"metrics": TrainingMetrics(), "dp": None, "signature": None})
        envelope = make_envelope(update, source=f"pfi://client/{values['client_id']}", subject=self.spec.name)
        return sign_update(envelope, key or self.client.key)

    def raw(
        self,
        category: str,
        variant: str,
        messages: list[bytes | None],
        reasons: list[tuple[int, RejectReason]] | RejectReason,
        *,
        key: bytes | str | None = "target",
        update_id: str | None = None,
    ) -> Case:
        expect = [(len(messages) - 1, reasons)] if isinstance(reasons, RejectReason) else reasons
        return Case(
            category,
            variant,
            RAW,
            key=self.key if key == "target" else key,  # type: ignore[arg-type]
            messages=messages,
            expect=expect,
            update_id=update_id,
        )

    def sdk(self, category: str, variant: str, envelope: Envelope[Any], reason: RejectReason) -> Case:
        """An SDK-sent update refused once (at its last message) with ``reason``."""
        return Case(
            category,
            variant,
            SDK,
            envelope=envelope,
            expect=[(-1, reason)],
            update_id=envelope.data.update_id,
        )

    def sdk_per_message(
        self, category: str, variant: str, envelope: Envelope[Any], reason: RejectReason
    ) -> Case:
        """An SDK-sent update whose every message (chunk) is refused on arrival with ``reason``."""
        n = len(update_messages(envelope, self.sdk_settings(), key=bytes(32)))  # only the count matters
        return Case(
            category,
            variant,
            SDK,
            envelope=envelope,
            expect=[(-1, reason)] * n,
            update_id=envelope.data.update_id,
        )

    def sdk_settings(self) -> PFISettings:
        return PFISettings(chunk_bytes=self.limits.sdk_chunk_bytes)

    def pick(self, options: dict[str, Callable[[], Case]]) -> Case:
        name = self.rng.choice(sorted(options))
        return options[name]()

    # -- valid ------------------------------------------------------------------------------------
    def valid_case(self, path: str) -> Case:
        encoding = self.rng.choice(
            [TensorEncoding(), TensorEncoding(dtype="float16"), TensorEncoding(compression="none")]
        )
        envelope = self.signed(tag="ok", encoding=encoding)
        self.accepted += 1
        self.valid.append(envelope)
        if path == SDK:
            return Case("valid", "sdk", SDK, envelope=envelope, update_id=envelope.data.update_id)
        messages: list[bytes | None] = [encode_frame(envelope)]
        if self.rng.random() < 0.3:  # a valid chunked upload on the raw path
            messages = list(self.split(envelope, self.rng.choice([1024, 2048, 3000])))
        return Case("valid", "raw", RAW, key=self.key, messages=messages, update_id=envelope.data.update_id)

    def split(self, envelope: Envelope[Any], chunk_bytes: int) -> list[bytes]:
        data = envelope.data
        return split_frame(
            encode_frame(envelope),
            federation=data.federation,
            client_id=data.client_id,
            update_id=data.update_id,
            chunk_bytes=chunk_bytes,
            source=envelope.source,
            key=self.client.key,  # chunks are signed by the client (the aggregator refuses others)
        )

    # -- the version window -----------------------------------------------------------------------
    def future_base(self) -> int:
        return self.rng.choice([self.version + 1, self.version + self.rng.randint(2, 1000), 2**62])

    def too_stale_base(self) -> int | None:
        oldest_ok = self.version - self.max_staleness
        return None if oldest_ok <= 0 else self.rng.randint(0, oldest_ok - 1)
