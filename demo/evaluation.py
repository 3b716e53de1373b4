"""Held-out data, the local-only baseline, and the summary statistics of the demo's variants.

Every variant is scored by the personalization service's ``score`` route on each user's held-out
chunks (per-user mean NLL = token-weighted mean over the chunks; see :mod:`demo.eval_phase`), on the
**sync** federation, where every user trained the same number of rounds (so the personalization gain
is not confounded with device speed). The held-out text is the **end** of each user's text (a
time-like split): what the user writes next, after everything their device trained on.

* ``base``: v0 pinned (``global_version=0``; v0 is the PEFT initialization, ``lora_B = 0``, so it is
  exactly the base model) without a personal adapter;
* ``local``: v0 pinned + the user's local-only adapter (trained alone);
* ``global``: the final global adapter, ``use_personal=false``;
* ``personalized_ungated``: global + the personal adapter of the on-device personalization step
  (:mod:`clients.personalize`) at gate 1;
* ``personalized``: the same adapter at the gate the device chose on its own validation split;
* ``global_rag`` / ``personalized_rag``: global (+ gated personal) with context retrieved from the
  user's own training text (causal queries, :mod:`demo.scoring`).

The **async** federation's final global adapter and the personal adapters of its run are scored the
same way (``async_global``, ``async_personalized``: ungated, without the personalization step). There
fast devices ran more rounds than slow ones; a user whose device finished no round has no personal
adapter and is served base + global.
"""

from __future__ import annotations

import asyncio
import functools
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clients.data import SplitMode, UserData, load_users, tokenize
from clients.training import AdapterTrainer, TrainConfig
from demo.config import DemoConfig
from demo.scoring import Score
from modeling.lora import StateDict
from schemas.errors import ConfigError

VARIANTS = (
    "base",
    "local",
    "global",
    "personalized_ungated",
    "personalized",
    "global_rag",
    "personalized_rag",
)
ASYNC_VARIANTS = ("async_global", "async_personalized")
VS_GLOBAL = ("personalized_ungated", "personalized", "global_rag", "personalized_rag")  # compared per user
LABELS = {
    "base": "base (zero-shot)",
    "local": "local-only",
    "global": "global-only",
    "personalized_ungated": "personal, ungated",
    "personalized": "personalized (gated)",
    "global_rag": "global + RAG",
    "personalized_rag": "personalized + RAG",
    "async_global": "async global-only",
    "async_personalized": "async personalized",
}
HARM_MARGIN = 0.01  # a user is harmed when a variant's perplexity is > 1% above global-only
Echo = Callable[[str], None]


# -------------------------------------------------------------------------------------------- data


def select_users(
    path: Path, count: int, heldout_fraction: float, split: SplitMode = "tail"
) -> dict[str, UserData]:
    """The ``count`` users with the most text, each split into train / held-out (by default the last
    paragraphs are held out: a time-like split)."""
    texts = load_users(path, max_users=count)
    users = {}
    for user, text in texts.items():
        data = UserData.from_text(user, text, heldout_fraction=heldout_fraction, mode=split)
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


# ------------------------------------------------------------------------------------- statistics


def worst_fraction(values: list[float], fraction: float = 0.1) -> float:
    """Mean of the worst (highest) ``fraction`` of ``values``, at least one value."""
    k = max(1, math.ceil(fraction * len(values)))
    return statistics.fmean(sorted(values, reverse=True)[:k])


def rel_gain(reference: float, value: float) -> float:
    """Relative reduction of ``value`` against ``reference`` (0.2 = 20% lower)."""
    return (reference - value) / reference if reference else 0.0


def ppl(nll: float) -> float:
    return math.exp(min(nll, 700.0))


def _vs_global(per_user: dict[str, dict[str, Score]], users: list[str], variant: str) -> dict[str, Any]:
    """Per-user perplexity of ``variant`` against global-only: median reduction, shares improved and
    harmed (perplexity more than ``HARM_MARGIN`` above global-only)."""
    ratios = [ppl(per_user[u][variant].nll) / ppl(per_user[u]["global"].nll) for u in users]
    return {
        "median_ppl_reduction": statistics.median(1.0 - r for r in ratios),
        "improved": sum(1 for r in ratios if r < 1.0) / len(ratios),
        "harmed": sum(1 for r in ratios if r > 1.0 + HARM_MARGIN) / len(ratios),
    }


def summarize(per_user: dict[str, dict[str, Score]]) -> dict[str, Any]:
    users = sorted(per_user)
    variants = [v for v in (*VARIANTS, *ASYNC_VARIANTS) if all(v in per_user[u] for u in users)]
    mean_nll = {v: statistics.fmean(per_user[u][v].nll for u in users) for v in variants}
    mean_acc = {v: statistics.fmean(per_user[u][v].accuracy for u in users) for v in variants}
    worst = {v: worst_fraction([per_user[u][v].nll for u in users]) for v in variants}
    worst_ppl = {v: worst_fraction([ppl(per_user[u][v].nll) for u in users]) for v in variants}
    gains = {u: rel_gain(per_user[u]["global"].nll, per_user[u]["personalized"].nll) for u in users}
    versus = {v: _vs_global(per_user, users, v) for v in VS_GLOBAL if v in variants}
    out = {
        "users": len(users),
        "evaluated_federation": "sync",
        "mean_nll": mean_nll,
        "mean_token_accuracy": mean_acc,
        "worst10_nll": worst,
        "worst10_ppl": worst_ppl,
        "median_ppl_reduction_vs_global": {v: x["median_ppl_reduction"] for v, x in versus.items()},
        "share_users_improved": {v: x["improved"] for v, x in versus.items()},
        "share_users_harmed": {v: x["harmed"] for v, x in versus.items()},
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
