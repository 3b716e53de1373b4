"""The serving engine: the request-level score/generate logic (the HTTP layer only authenticates and
maps errors), on top of three parts it wires together:

* :mod:`.federations`: specs, base models and the served federations with their merged stacks and hot
  swaps (:mod:`.served_federation`);
* :mod:`.personal`: the personal adapter cache, loads, uploads and deletes;
* :mod:`.batcher`: the model thread that batches rows across users.

Models are built and run by a serving backend (:mod:`.backends`, chosen by ``PFI_SERVE_BACKEND``):
nothing here depends on how a model is held or computed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from modeling.base import load_base_model
from schemas.records import VersionMeta
from services.personalization.augment import (
    Augmentation,
    Retrieved,
    counted,
    retrieve,
    timed_ms,
    with_context,
)
from services.personalization.backends import ServingBackend, backend_for
from services.personalization.backends.base import GenOut, GenRow, ScoreOut, ScoreRow, TokenCodec
from services.personalization.batcher import Batcher, BatchInfo, Incoming
from services.personalization.errors import BadRequest, PayloadTooLarge, Unprocessable
from services.personalization.federations import Federations, ModelLoader, Watcher
from services.personalization.metrics import ServeMetrics
from services.personalization.personal import PersonalAdapters
from services.personalization.served_federation import FederationInfo, ServedFederation
from services.personalization.user_adapters import AdapterRecord, PersonalAdapter, UserAdapterStore
from services.personalization.user_documents import UserDocuments
from services.settings import PFISettings, ServeSettings
from services.store.versions import VersionStore

__all__ = ["Engine", "GenerateResult", "ModelLoader", "ScoreResult", "Served"]


@dataclass(frozen=True)
class Served:
    """What every response reports besides its payload."""

    global_version: int | None  # None: base model alone (benchmarks)
    personal_adapter_version: int | None
    timing: dict[str, float | int | str]


@dataclass(frozen=True)
class ScoreResult:
    results: list[ScoreOut]
    served: Served
    retrieved: list[Retrieved | None] = field(default_factory=list)  # per text (retrieval/context)


@dataclass(frozen=True)
class GenerateResult:
    text: str
    tokens: list[int]
    prompt_tokens: int
    finish_reason: str
    served: Served
    retrieved: Retrieved | None = None


class Engine:
    def __init__(
        self,
        redis: Redis,
        settings: PFISettings,
        serve: ServeSettings,
        metrics: ServeMetrics,
        *,
        model_loader: ModelLoader | None = None,
        batching: bool = True,
        backend: ServingBackend | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.serve = serve
        self.metrics = metrics
        self.backend = backend if backend is not None else backend_for(serve.backend)
        self.store = VersionStore(redis)
        self.batcher = Batcher(
            metrics,
            max_rows=serve.max_batch,
            max_tokens=serve.max_batch_tokens,
            linger_s=serve.batch_wait_ms / 1000,
            batching=batching,
            max_queue=serve.max_queue,
            max_per_tenant=serve.max_user_in_flight,
        )
        self.federations = Federations(
            self.store,
            serve,
            metrics,
            backend=self.backend,
            model_loader=model_loader or load_base_model,
            max_decoded_bytes=settings.max_decoded_bytes,
        )
        self.adapters = PersonalAdapters(
            UserAdapterStore(redis),
            self.store,
            serve,
            metrics,
            info=self.federations.info,
            release_everywhere=self._release_evicted,
            max_decoded_bytes=settings.max_decoded_bytes,
        )
        self.users = self.adapters.users
        self.documents = UserDocuments(redis, serve, metrics.registry)  # private retrieval (RAG)
        self.cache = self.adapters.cache
        self.freshness_log = self.federations.freshness_log

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        self.batcher.start()

    async def close(self) -> None:
        await self.federations.close()
        await asyncio.to_thread(self.batcher.stop)

    @property
    def watch(self) -> Watcher | None:
        return self.federations.watch

    @watch.setter
    def watch(self, watcher: Watcher | None) -> None:
        self.federations.watch = watcher  # the service subscribes to a federation's streams

    @property
    def runtimes(self) -> dict[str, ServedFederation]:
        return dict(self.federations.runtimes)

    # -- federations and personal adapters (see .federations, .personal) ----------------------------
    async def info(self, fed: str) -> FederationInfo:
        return await self.federations.info(fed)

    async def runtime(self, fed: str) -> ServedFederation:
        return await self.federations.runtime(fed)

    def on_version_event(
        self, fed: str, version: int | None, published_at: float | None, digest: str | None = None
    ) -> None:
        self.federations.on_version_event(fed, version, published_at, digest)

    def on_user_event(
        self, fed: str, key: str, op: str, digest: str | None, generation: int | None = None
    ) -> None:
        self.adapters.on_user_event(fed, key, op, digest, generation)

    def _release_evicted(self) -> None:
        stacks = [s for r in self.federations.runtimes.values() for s in r.stacks.values()]

        def release() -> None:
            for stack in stacks:
                stack.release_evicted()

        self.batcher.run_on_thread(release)

    async def upload(
        self,
        fed: str,
        user: str,
        body: bytes,
        *,
        trained_against: int,
        dtype: str = "float32",
        quantization: str = "none",
        gate: float = 1.0,
    ) -> AdapterRecord:
        return await self.adapters.upload(
            fed,
            user,
            body,
            trained_against=trained_against,
            dtype=dtype,
            quantization=quantization,
            gate=gate,
        )

    async def adapter_record(self, fed: str, user: str) -> AdapterRecord:
        return await self.adapters.adapter_record(fed, user)

    async def delete(self, fed: str, user: str) -> None:
        await self.adapters.delete(fed, user)

    async def federation_view(self, fed: str) -> dict[str, Any]:
        return await self.federations.federation_view(fed)

    async def global_blob(self, fed: str, version: str) -> tuple[int, bytes, VersionMeta | None]:
        return await self.federations.global_blob(fed, version)

    # -- requests -----------------------------------------------------------------------------------
    def _tokenize(self, tokens: TokenCodec, text: str, what: str) -> list[int]:
        if len(text) > self.serve.max_prompt_chars:
            raise PayloadTooLarge(
                f"{what} has {len(text)} characters; the limit is {self.serve.max_prompt_chars}"
            )
        ids: list[int] = tokens.encode(text)
        if len(ids) > self.serve.max_prompt_tokens:
            raise PayloadTooLarge(
                f"{what} has {len(ids)} tokens; the limit is {self.serve.max_prompt_tokens}"
            )
        return ids

    async def _prepare(
        self, fed: str, user: str | None, use_personal: bool
    ) -> tuple[ServedFederation, PersonalAdapter | None, dict[str, float | int | str]]:
        runtime = await self.runtime(fed)
        timing: dict[str, float | int | str] = {"cache": "none"}
        adapter = None
        if user is not None and use_personal:
            adapter, cache, load_s = await self.adapters.get(fed, user)
            timing["cache"] = cache
            if cache == "miss":
                timing["adapter_load_ms"] = round(load_s * 1000, 3)
        return runtime, adapter, timing

    def _admit(self, tenant: str | None) -> contextlib.AbstractContextManager[None]:
        """The per-user bound of an HTTP request (``tenant``: its principal); in-process callers
        (benchmarks) pass none and are bounded by the queue alone."""
        return contextlib.nullcontext() if tenant is None else self.batcher.admit(tenant)

    @staticmethod
    def _finish(
        timing: dict[str, float | int | str], info: BatchInfo, started: float
    ) -> dict[str, float | int | str]:
        timing.update(
            queue_ms=round(info.queue_seconds * 1000, 3),
            compute_ms=round(info.compute_seconds * 1000, 3),
            batch_rows=info.batch_rows,
            batch_requests=info.batch_requests,
            total_ms=round((time.perf_counter() - started) * 1000, 3),
        )
        return timing

    async def _submit(
        self,
        kind: str,
        runtime: ServedFederation,
        adapter: PersonalAdapter | None,
        rows: list[Any],
        *,
        version: int | None,
        base_only: bool,
        mark: Incoming,
        tenant: str,
    ) -> tuple[list[Any], BatchInfo, int | None]:
        if base_only:
            outs, info = await self.batcher.submit(
                kind, runtime.base_only(), None, rows, mark=mark, tenant=tenant, admitted=True
            )
            return outs, info, None
        async with runtime.lease(version) as stack:
            outs, info = await self.batcher.submit(
                kind, stack, adapter, rows, mark=mark, tenant=tenant, admitted=True
            )
            runtime.served(stack)
            return outs, info, stack.version

    async def score(
        self,
        fed: str,
        user: str | None,
        texts: list[str],
        *,
        version: int | None = None,
        use_personal: bool = True,
        base_only: bool = False,
        tenant: str | None = None,
        augment: Augmentation | None = None,
    ) -> ScoreResult:
        """Per-text next-token NLL / accuracy on base + global (+ the user's personal adapter)."""
        started = time.perf_counter()
        if not texts:
            raise BadRequest("texts must not be empty")
        if len(texts) > self.serve.max_score_texts:
            raise PayloadTooLarge(
                f"{len(texts)} texts; the limit is {self.serve.max_score_texts} per request"
            )
        admission = self._admit(tenant)
        tenant = tenant if tenant is not None else (user or "")
        with admission, self.batcher.incoming() as mark:
            runtime, adapter, timing = await self._prepare(fed, user, use_personal and not base_only)
            tokens = runtime.base_only().tokens
            began = time.perf_counter()
            retrieved = await retrieve(self.documents, fed, user, texts, augment)
            if augment is not None:
                timing["retrieval_ms"] = timed_ms(began)
            rows: list[ScoreRow] = []
            for i, text in enumerate(texts):
                ids = self._tokenize(tokens, text, f"texts[{i}]")
                if len(ids) < 2:
                    raise Unprocessable(f"texts[{i}] has fewer than 2 tokens: nothing to score")
                if len(ids) > tokens.max_positions:
                    raise PayloadTooLarge(
                        f"texts[{i}] is longer than the model's {tokens.max_positions} positions"
                    )
                context_len, found = 0, retrieved[i]
                if found is not None:
                    room = tokens.max_positions - len(ids)
                    ids, context_len, n = with_context(
                        tokens, ids, found.context, max_tokens=found.max_context_tokens, room=room
                    )
                    retrieved[i] = counted(found, n)
                rows.append(ScoreRow(ids, adapter, context_len=context_len))
            outs, info, global_version = await self._submit(
                "score",
                runtime,
                adapter,
                rows,
                version=version,
                base_only=base_only,
                mark=mark,
                tenant=tenant,
            )
        self.metrics.scored_tokens.labels(federation=fed).inc(sum(o.tokens for o in outs))
        served = Served(
            global_version, None if adapter is None else adapter.version, self._finish(timing, info, started)
        )
        return ScoreResult(outs, served, retrieved)

    async def generate(
        self,
        fed: str,
        user: str | None,
        prompt: str,
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        version: int | None = None,
        use_personal: bool = True,
        base_only: bool = False,
        tenant: str | None = None,
        on_token: Callable[[int], bool] | None = None,
        augment: Augmentation | None = None,
    ) -> GenerateResult:
        """Continue ``prompt`` with base + global (+ the user's personal adapter). ``on_token``: called
        on the model thread with each new token as it is chosen; False ends the generation there
        (streaming, stop strings, a client that went away: see ``GenRow.on_token``)."""
        started = time.perf_counter()
        if max_new_tokens > self.serve.max_new_tokens:
            raise Unprocessable(
                f"max_new_tokens={max_new_tokens} exceeds the cap of {self.serve.max_new_tokens}"
            )
        admission = self._admit(tenant)
        tenant = tenant if tenant is not None else (user or "")
        with admission, self.batcher.incoming() as mark:
            runtime, adapter, timing = await self._prepare(fed, user, use_personal and not base_only)
            tokens = runtime.base_only().tokens
            ids = self._tokenize(tokens, prompt, "prompt")
            if not ids:
                raise Unprocessable("the prompt encodes to no tokens")
            if len(ids) + max_new_tokens > tokens.max_positions:
                raise Unprocessable(
                    f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceed the model's "
                    f"{tokens.max_positions} positions"
                )
            prompt_tokens, found = len(ids), None
            if augment is not None:
                began = time.perf_counter()
                found = (await retrieve(self.documents, fed, user, [prompt], augment))[0]
                timing["retrieval_ms"] = timed_ms(began)
            if found is not None:
                room = tokens.max_positions - len(ids) - max_new_tokens
                ids, _, n = with_context(
                    tokens, ids, found.context, max_tokens=found.max_context_tokens, room=room
                )
                found = counted(found, n)
            row = GenRow(ids, adapter, max_new_tokens, temperature, top_p, seed, on_token=on_token)
            outs, info, global_version = await self._submit(
                "generate",
                runtime,
                adapter,
                [row],
                version=version,
                base_only=base_only,
                mark=mark,
                tenant=tenant,
            )
        out: GenOut = outs[0]
        self.metrics.tokens_generated.labels(federation=fed).inc(len(out.tokens))
        self.metrics.prompt_tokens.labels(federation=fed).inc(len(ids))
        served = Served(
            global_version, None if adapter is None else adapter.version, self._finish(timing, info, started)
        )
        return GenerateResult(
            tokens.decode(out.tokens), out.tokens, prompt_tokens, out.finish_reason, served, found
        )
