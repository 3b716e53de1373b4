"""Held-out data, the local-only baseline, scoring through the service, and the summary statistics.

Four variants per user, all scored by the personalization service's ``score`` route on the user's
held-out chunks (per-user mean NLL = token-weighted mean over the chunks), on the **sync** federation,
where every user trained the same number of rounds (so the personalization gain is not confounded
with device speed):

* ``base``: the federation's v0 pinned (``global_version=0``) without a personal adapter. v0 is the
  PEFT initialization (``lora_B = 0``), so base + v0 is exactly the base model;
* ``local``: v0 pinned + the user's local-only adapter (trained alone, uploaded as their personal adapter);
* ``global``: the latest global adapter, ``use_personal=false``;
* ``personalized``: the latest global adapter + the user's personal adapter.

The **async** federation's final global adapter and personal adapters are scored the same way
(``async_global``, ``async_personalized``). There fast devices ran more rounds than slow ones; a user
whose device finished no round has no personal adapter and is served base + global.
"""

from __future__ import annotations

import asyncio
import functools
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from clients.data import UserData, load_users, tokenize
from clients.http_source import upload_personal_adapter
from clients.training import AdapterTrainer, TrainConfig
from demo.config import DemoConfig
from modeling.lora import StateDict
from schemas.errors import ConfigError, PFIError
from services.personalization.auth import TokenSigner

VARIANTS = ("base", "local", "global", "personalized")
ASYNC_VARIANTS = ("async_global", "async_personalized")
LABELS = {
    "base": "base (zero-shot)",
    "local": "local-only",
    "global": "global-only",
    "personalized": "personalized",
    "async_global": "async global-only",
    "async_personalized": "async personalized",
}
Echo = Callable[[str], None]


@dataclass(frozen=True)
class Score:
    nll: float
    accuracy: float
    tokens: int

    def to_dict(self) -> dict[str, float | int]:
        return {"nll": self.nll, "accuracy": self.accuracy, "tokens": self.tokens}


def pooled(parts: list[tuple[float, float, int]]) -> Score:
    """Token-weighted mean of ``(mean_nll, accuracy, tokens)`` parts."""
    tokens = sum(t for _, _, t in parts)
    if tokens == 0:
        raise PFIError("nothing was scored (no tokens)")
    nll = sum(n * t for n, _, t in parts) / tokens
    acc = sum(a * t for _, a, t in parts) / tokens
    return Score(nll, acc, tokens)


# -------------------------------------------------------------------------------------------- data


def select_users(path: Path, count: int, heldout_fraction: float) -> dict[str, UserData]:
    """The ``count`` users with the most text, each split into train / held-out."""
    texts = load_users(path, max_users=count)
    users = {}
    for user, text in texts.items():
        data = UserData.from_text(user, text, heldout_fraction=heldout_fraction)
        if data.train_text.strip() and data.heldout_text.strip():
            users[user] = data
    if len(users) < 2:
        raise ConfigError(f"{path}: fewer than 2 users with both training and held-out text")
    return users


def heldout_chunks(tokenizer: Any, text: str, tokens: int, limit: int) -> list[str]:
    """Up to ``limit`` consecutive windows of ``tokens`` tokens of ``text``, decoded back to text."""
    ids = tokenize(tokenizer, text)
    bos = getattr(tokenizer, "bos_token_id", None)
    if ids and bos is not None and ids[0] == bos:
        ids = ids[1:]
    chunks: list[str] = []
    for start in range(0, len(ids), tokens):
        window = ids[start : start + tokens]
        if len(window) < max(8, tokens // 4):
            break
        chunk = str(tokenizer.decode(window)).strip()
        if chunk:
            chunks.append(chunk)
        if len(chunks) >= limit:
            break
    if not chunks and text.strip():
        chunks.append(text.strip())
    return chunks


# ------------------------------------------------------------------------------ local-only baseline


async def train_local_only(
    trainer: AdapterTrainer,
    zero_global: StateDict,
    data: UserData,
    rounds: int,
    cfg: DemoConfig,
    executor: Any,
) -> StateDict:
    """A personal adapter trained alone (``train_shared=False`` on the no-op v0), with the same rounds,
    steps, seeds and learning rate as the user's personal adapter got in the federation."""
    loop = asyncio.get_running_loop()
    personal: StateDict | None = None
    for round_index in range(rounds):
        train = TrainConfig(
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            seq_len=cfg.seq_len,
            lr=cfg.lr,
            personal_lr=cfg.personal_lr,
            seed=(cfg.seed * 1_000_003 + round_index) & 0x7FFFFFFF,
            train_shared=False,
            eval_sequences=2,
        )
        result = await loop.run_in_executor(
            executor, functools.partial(trainer.train, zero_global, personal, data, train)
        )
        personal = result.personal
    if personal is None:
        personal = trainer.fresh_adapter(data.user_id, cfg.seed)
    return personal


# ------------------------------------------------------------------------------ through the service


class ServiceScorer:
    """Uploads personal adapters and scores texts through the service's HTTP API, as each user."""

    def __init__(self, client: httpx.AsyncClient, signer: TokenSigner, federation: str) -> None:
        self.client = client
        self.signer = signer
        self.federation = federation
        self._tokens: dict[str, str] = {}
        self.requests = 0

    def token(self, user: str) -> str:
        if user not in self._tokens:
            self._tokens[user] = self.signer.issue(user, ttl_s=24 * 3600, federation=self.federation)
        return self._tokens[user]

    async def upload(self, user: str, state: StateDict, trained_against: int) -> dict[str, Any]:
        self.requests += 1
        return await upload_personal_adapter(
            self.client, self.token(user), self.federation, user, state, trained_against=trained_against
        )

    async def score(
        self, user: str, texts: list[str], *, use_personal: bool, global_version: int | None = None
    ) -> tuple[Score, dict[str, Any]]:
        body: dict[str, Any] = {"texts": texts, "use_personal": use_personal}
        if global_version is not None:
            body["global_version"] = global_version
        self.requests += 1
        try:
            response = await self.client.post(
                f"/v1/federations/{self.federation}/score",
                json=body,
                headers={"Authorization": f"Bearer {self.token(user)}"},
            )
        except httpx.HTTPError as err:
            raise PFIError(f"score request for {user!r}: {type(err).__name__}: {err}") from None
        if response.status_code != 200:
            raise PFIError(f"score request for {user!r}: HTTP {response.status_code} {response.text[:300]}")
        out: dict[str, Any] = response.json()
        parts = [(r["mean_nll"], r["token_accuracy"], r["tokens"]) for r in out["results"]]
        served = {
            "global_version": out.get("global_version"),
            "personal_adapter_version": out.get("personal_adapter_version"),
        }
        return pooled(parts), served


@dataclass(frozen=True)
class Adapters:
    """What one user brings to the evaluation."""

    local: StateDict
    personal: StateDict  # from the sync run
    trained_against: int
    async_personal: StateDict | None  # None: the device finished no async round
    async_trained_against: int


def _check_served(user: str, served: dict[str, Any], expected: dict[str, int]) -> None:
    for variant, version in expected.items():
        if served[variant]["global_version"] != version:
            raise PFIError(
                f"{user}: the {variant} score was served by global v{served[variant]['global_version']}, "
                f"expected v{version}"
            )


async def score_user(
    scorer: ServiceScorer,
    async_scorer: ServiceScorer,
    user: str,
    chunks: list[str],
    adapters: Adapters,
    final_version: int,
    async_final_version: int,
) -> tuple[dict[str, Score], dict[str, Any]]:
    """Every variant of one user (see the module doc); the personal adapters uploaded last (the
    federated ones) are those the service keeps."""
    scores: dict[str, Score] = {}
    served: dict[str, Any] = {}
    await scorer.upload(user, adapters.local, 0)
    scores["local"], served["local"] = await scorer.score(user, chunks, use_personal=True, global_version=0)
    scores["base"], served["base"] = await scorer.score(user, chunks, use_personal=False, global_version=0)
    info = await scorer.upload(user, adapters.personal, adapters.trained_against)
    scores["personalized"], served["personalized"] = await scorer.score(user, chunks, use_personal=True)
    scores["global"], served["global"] = await scorer.score(user, chunks, use_personal=False)
    scores["async_global"], served["async_global"] = await async_scorer.score(
        user, chunks, use_personal=False
    )
    if adapters.async_personal is not None:
        await async_scorer.upload(user, adapters.async_personal, adapters.async_trained_against)
        scores["async_personalized"], served["async_personalized"] = await async_scorer.score(
            user, chunks, use_personal=True
        )
    else:
        scores["async_personalized"], served["async_personalized"] = (
            scores["async_global"],
            {**served["async_global"]},
        )
    _check_served(
        user,
        served,
        {
            "base": 0,
            "local": 0,
            "global": final_version,
            "personalized": final_version,
            "async_global": async_final_version,
            "async_personalized": async_final_version,
        },
    )
    needs_personal = ["local", "personalized"] + (["async_personalized"] if adapters.async_personal else [])
    for variant in needs_personal:
        if served[variant]["personal_adapter_version"] is None:
            raise PFIError(f"{user}: the {variant} score did not use the uploaded personal adapter")
    served["personal_adapter"] = {k: info.get(k) for k in ("version", "digest", "size_bytes")}
    return scores, served


# ------------------------------------------------------------------------------------- statistics


def worst_fraction(values: list[float], fraction: float = 0.1) -> float:
    """Mean of the worst (highest) ``fraction`` of ``values``, at least one value."""
    k = max(1, math.ceil(fraction * len(values)))
    return statistics.fmean(sorted(values, reverse=True)[:k])


def rel_gain(reference: float, value: float) -> float:
    """Relative reduction of ``value`` against ``reference`` (0.2 = 20% lower)."""
    return (reference - value) / reference if reference else 0.0


def summarize(per_user: dict[str, dict[str, Score]]) -> dict[str, Any]:
    users = sorted(per_user)
    variants = [v for v in (*VARIANTS, *ASYNC_VARIANTS) if all(v in per_user[u] for u in users)]
    mean_nll = {v: statistics.fmean(per_user[u][v].nll for u in users) for v in variants}
    mean_acc = {v: statistics.fmean(per_user[u][v].accuracy for u in users) for v in variants}
    worst = {v: worst_fraction([per_user[u][v].nll for u in users]) for v in variants}
    gains = {u: rel_gain(per_user[u]["global"].nll, per_user[u]["personalized"].nll) for u in users}
    out = {
        "users": len(users),
        "evaluated_federation": "sync",
        "mean_nll": mean_nll,
        "mean_token_accuracy": mean_acc,
        "worst10_nll": worst,
        "rel_gain_personalized_vs_global": rel_gain(mean_nll["global"], mean_nll["personalized"]),
        "rel_gain_personalized_vs_local": rel_gain(mean_nll["local"], mean_nll["personalized"]),
        "rel_gain_personalized_vs_base": rel_gain(mean_nll["base"], mean_nll["personalized"]),
        "rel_gain_global_vs_base": rel_gain(mean_nll["base"], mean_nll["global"]),
        "rel_gain_local_vs_base": rel_gain(mean_nll["base"], mean_nll["local"]),
        "worst10_rel_gain_personalized_vs_global": rel_gain(worst["global"], worst["personalized"]),
        "users_personalized_better_than_global": sum(1 for g in gains.values() if g > 0),
        "median_user_gain_vs_global": statistics.median(gains.values()),
        "min_user_gain_vs_global": min(gains.values()),
        "max_user_gain_vs_global": max(gains.values()),
    }
    if "async_personalized" in mean_nll:
        out["async_rel_gain_personalized_vs_global"] = rel_gain(
            mean_nll["async_global"], mean_nll["async_personalized"]
        )
        out["async_rel_gain_personalized_vs_local"] = rel_gain(
            mean_nll["local"], mean_nll["async_personalized"]
        )
    return out
