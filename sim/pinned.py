"""What the virtual-clock fleet's agents see (:mod:`sim.virtual`): the global version pinned at the
start of their round, and a trainer that remembers first rounds (identical in every run)."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from clients.data import UserData
from clients.http_source import HttpGlobalSource
from clients.source import GlobalAdapter
from clients.training import AdapterTrainer, TrainConfig, TrainResult
from modeling.lora import StateDict
from schemas.errors import PFIError
from schemas.events import FederationSpec


def state_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


class FirstRoundCache:
    """The agents' view of the trainer: trains, and remembers rounds that start from a fresh personal
    adapter (a client's first round), so an identical call (same user, config and global adapter
    bytes) is answered from memory. The trainer is deterministic, so the answer is what it would
    compute again; the result's tensors are only read by the agent (privatize copies them)."""

    def __init__(self, trainer: AdapterTrainer) -> None:
        self.trainer = trainer
        self.spec = trainer.spec
        self.hits = 0
        self._results: dict[tuple[str, TrainConfig, str], TrainResult] = {}

    @property
    def keys(self) -> list[str]:
        return self.trainer.keys

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        """Evaluation is never cached: the trainer's own."""
        return self.trainer.evaluate(*args, **kwargs)

    def train(
        self, global_adapter: StateDict, personal: StateDict | None, data: UserData, cfg: TrainConfig
    ) -> TrainResult:
        if personal is not None:
            return self.trainer.train(global_adapter, personal, data, cfg)
        key = (data.user_id, cfg, state_digest(global_adapter))
        cached = self._results.get(key)
        if cached is not None:
            self.hits += 1
            return cached
        result = self.trainer.train(global_adapter, personal, data, cfg)
        self._results[key] = result
        return result


class PinnedSource:
    """A :class:`~clients.source.GlobalSource` whose "latest" is the version the client saw when it
    started its round (``version``); adapters are shared between the clients of a run (``cache``)."""

    def __init__(self, inner: HttpGlobalSource, cache: dict[tuple[str, int], GlobalAdapter]) -> None:
        self.inner = inner
        self.cache = cache
        self.version = 0

    async def spec(self, federation: str) -> FederationSpec:
        return await self.inner.spec(federation)

    async def latest(self, federation: str) -> GlobalAdapter:
        key = (federation, self.version)
        if key not in self.cache:
            adapter = await self.inner.adapter(federation, self.version)
            if adapter.version != self.version:
                raise PFIError(f"{federation}: asked the service for v{self.version}, got v{adapter.version}")
            self.cache[key] = adapter
        return self.cache[key]
