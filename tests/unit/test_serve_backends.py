"""The serving backend interface: the registry and ``PFI_SERVE_BACKEND`` choose the backend, the model
thread serves any backend's stacks through the interface alone, and the torch backend keeps the
contract."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest
import torch
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from modeling.base import TINY_LLAMA, BaseModel, load_base_model
from modeling.lora import init_adapter
from schemas.errors import ConfigError
from schemas.events import FederationSpec, LoraSpec
from schemas.records import VersionMeta
from services.personalization.backends import BACKENDS, DEFAULT_BACKEND, backend_for
from services.personalization.backends.base import (
    NO_SLOT,
    GenOut,
    GenRow,
    ModelStack,
    ScoreOut,
    ScoreRow,
    ServingBackend,
)
from services.personalization.backends.torch_slots import TorchSlotsBackend
from services.personalization.batcher import Batcher
from services.personalization.engine import Engine
from services.personalization.metrics import ServeMetrics
from services.personalization.user_adapters import PersonalAdapter
from services.settings import PFISettings, ServeSettings


class Codec:
    max_positions = 64

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode()


class EchoStack(ModelStack):
    """A backend's stack that computes nothing: each row's "NLL" is its length."""

    def bind(self, adapters: Sequence[PersonalAdapter | None]) -> list[int]:
        return [NO_SLOT for _ in adapters]

    def score(self, rows: Sequence[ScoreRow]) -> list[ScoreOut]:
        return [ScoreOut(nll_sum=float(len(r.ids)), correct=0, tokens=len(r.ids) - 1) for r in rows]

    def generate(self, rows: Sequence[GenRow]) -> list[GenOut]:
        return [GenOut(list(reversed(r.ids))[: r.max_new_tokens], "length") for r in rows]

    def release_evicted(self) -> None:
        pass

    def bound_adapters(self) -> list[PersonalAdapter]:
        return []


class EchoBackend(ServingBackend):
    name = "echo"

    def build_merged(
        self,
        base: BaseModel,
        spec: FederationSpec,
        version: int,
        global_state: Mapping[str, torch.Tensor],
        *,
        slots: int,
        meta: VersionMeta | None = None,
    ) -> ModelStack:
        return EchoStack(
            federation=spec.name, version=version, kind="merged", tokens=Codec(), slots=slots, meta=meta
        )

    def base_only(self, base: BaseModel, federation: str) -> ModelStack:
        return EchoStack(federation=federation, version=-1, kind="base", tokens=Codec())


def test_the_default_backend_is_the_torch_one_and_unknown_names_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert ServeSettings().backend == DEFAULT_BACKEND
    assert DEFAULT_BACKEND in BACKENDS
    assert isinstance(backend_for(DEFAULT_BACKEND), TorchSlotsBackend)
    assert TorchSlotsBackend.name == DEFAULT_BACKEND
    with pytest.raises(ConfigError, match="unknown serving backend"):
        backend_for("nope")
    monkeypatch.setenv("PFI_SERVE_BACKEND", "nope")
    with pytest.raises(ConfigError, match="unknown serving backend 'nope'"):
        Engine(Redis(), PFISettings(), ServeSettings(), ServeMetrics(CollectorRegistry()))


def test_an_engine_takes_any_backend() -> None:
    backend = EchoBackend()
    engine = Engine(
        Redis(), PFISettings(), ServeSettings(), ServeMetrics(CollectorRegistry()), backend=backend
    )
    assert engine.backend is backend
    assert engine.federations.backend is backend


async def test_the_model_thread_serves_another_backends_stacks() -> None:
    stack = EchoBackend().build_merged(None, FederationSpec(name="echo", base_model="x"), 3, {}, slots=2)  # type: ignore[arg-type]
    batcher = Batcher(ServeMetrics(CollectorRegistry()), max_rows=4, max_tokens=1000)
    batcher.start()
    try:
        scored, info = await batcher.submit("score", stack, None, [ScoreRow([1, 2, 3], None)])
        assert scored == [ScoreOut(3.0, 0, 2)]
        assert info.batch_rows == 1
        generated, _ = await batcher.submit("generate", stack, None, [GenRow([1, 2, 3], None, 2)])
        assert generated == [GenOut([3, 2], "length")]
    finally:
        batcher.stop()


def test_the_torch_backend_builds_stacks_that_keep_the_contract() -> None:
    base = load_base_model(TINY_LLAMA)
    spec = FederationSpec(name="backend-test", base_model=TINY_LLAMA, lora=LoraSpec(rank=4, alpha=8.0))
    backend = backend_for("torch-slots")
    merged = backend.build_merged(base, spec, 7, init_adapter(spec, base.model), slots=3)
    only = backend.base_only(base, spec.name)
    assert isinstance(merged, ModelStack)
    assert isinstance(only, ModelStack)
    assert (merged.kind, merged.version, merged.slots, merged.federation) == ("merged", 7, 3, spec.name)
    assert (only.kind, only.version, only.slots) == ("base", -1, 0)
    ids = merged.tokens.encode("to be or not")
    assert merged.tokens.decode(ids[1:]) == "to be or not"
    # init_adapter's B is zero: base + global equals the base alone
    (a,) = merged.score([ScoreRow(ids, None)])
    (b,) = only.score([ScoreRow(ids, None)])
    assert a.tokens == b.tokens == len(ids) - 1
    assert abs(a.nll_sum - b.nll_sum) < 1e-4
    (out,) = merged.generate([GenRow(ids, None, 3)])
    assert len(out.tokens) <= 3
    assert out.finish_reason in {"eos", "length"}
    assert merged.bound_adapters() == []
