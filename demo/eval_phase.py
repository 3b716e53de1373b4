"""The demo's evaluation phase: every variant of every user scored through the service (see
:mod:`demo.evaluation` for the variants), the user's training text added to their retrieval store
first, and the per-user rows of the report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from clients.data import UserData
from clients.personalize import PersonalizeResult
from demo import evaluation
from demo.config import DemoConfig
from demo.scoring import RagConfig, Score, ServiceScorer, causal_queries
from modeling.lora import StateDict
from schemas.errors import PFIError
from services.personalization.auth import TokenSigner
from services.stack.processes import ServiceProcess

Echo = Callable[[str], None]


@dataclass(frozen=True)
class Adapters:
    """What one user brings to the evaluation."""

    local: StateDict
    personal: PersonalizeResult  # the personalization step's adapter and gate (sync federation)
    trained_against: int
    async_personal: StateDict | None  # None: the device finished no async round
    async_trained_against: int


@dataclass(frozen=True)
class Finals:
    sync_version: int
    async_version: int


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
    data: UserData,
    chunks: list[str],
    adapters: Adapters,
    finals: Finals,
    rag: RagConfig,
) -> tuple[dict[str, Score], dict[str, Any]]:
    """Every variant of one user; the adapter uploaded last (the gated one) is what the service keeps."""
    user = data.user_id
    scores: dict[str, Score] = {}
    served: dict[str, Any] = {}
    queries = causal_queries(data.train_text, chunks)
    served["documents"] = await scorer.add_documents(user, data.train_text)
    await scorer.upload(user, adapters.local, 0)
    scores["local"], served["local"] = await scorer.score(user, chunks, use_personal=True, global_version=0)
    scores["base"], served["base"] = await scorer.score(user, chunks, use_personal=False, global_version=0)
    personal = adapters.personal
    await scorer.upload(user, personal.personal, adapters.trained_against, gate=1.0)
    scores["personalized_ungated"], served["personalized_ungated"] = await scorer.score(
        user, chunks, use_personal=True
    )
    info = await scorer.upload(user, personal.personal, adapters.trained_against, gate=personal.gate)
    scores["personalized"], served["personalized"] = await scorer.score(user, chunks, use_personal=True)
    scores["personalized_rag"], served["personalized_rag"] = await scorer.score_rag(
        user, chunks, queries, rag, use_personal=True
    )
    scores["global"], served["global"] = await scorer.score(user, chunks, use_personal=False)
    scores["global_rag"], served["global_rag"] = await scorer.score_rag(
        user, chunks, queries, rag, use_personal=False
    )
    scores["async_global"], served["async_global"] = await async_scorer.score(
        user, chunks, use_personal=False
    )
    if adapters.async_personal is not None:
        await async_scorer.upload(user, adapters.async_personal, adapters.async_trained_against)
        scores["async_personalized"], served["async_personalized"] = await async_scorer.score(
            user, chunks, use_personal=True
        )
    else:
        scores["async_personalized"] = scores["async_global"]
        served["async_personalized"] = {**served["async_global"]}
    final, final_async = finals.sync_version, finals.async_version
    _check_served(
        user,
        served,
        {
            "base": 0,
            "local": 0,
            "global": final,
            "personalized_ungated": final,
            "personalized": final,
            "global_rag": final,
            "personalized_rag": final,
            "async_global": final_async,
            "async_personalized": final_async,
        },
    )
    needs_personal = ["local", "personalized_ungated", "personalized", "personalized_rag"]
    needs_personal += ["async_personalized"] if adapters.async_personal is not None else []
    for variant in needs_personal:
        if served[variant]["personal_adapter_version"] is None:
            raise PFIError(f"{user}: the {variant} score did not use the uploaded personal adapter")
    for variant in ("global_rag", "personalized_rag"):
        if not any(served[variant]["hits"]):
            raise PFIError(f"{user}: the {variant} scores retrieved nothing from the user's documents")
    served["personal_adapter"] = {k: info.get(k) for k in ("version", "digest", "size_bytes", "gate")}
    return scores, served


async def evaluate_users(
    serve: ServiceProcess,
    signer: TokenSigner,
    federations: tuple[str, str],
    users: dict[str, UserData],
    chunks: dict[str, list[str]],
    adapters: dict[str, Adapters],
    finals: Finals,
    cfg: DemoConfig,
    echo: Echo,
) -> tuple[dict[str, dict[str, Score]], dict[str, dict[str, Any]]]:
    """Score every variant of every user through ``serve`` (sync federation, async federation)."""
    per_user: dict[str, dict[str, Score]] = {}
    served: dict[str, dict[str, Any]] = {}
    rag = RagConfig(k=cfg.rag_k, mode=cfg.rag_mode, max_context_tokens=cfg.rag_context_tokens)
    sync_name, async_name = federations
    async with httpx.AsyncClient(base_url=serve.url, timeout=600.0) as client:
        scorer = ServiceScorer(client, signer, sync_name)
        async_scorer = ServiceScorer(client, signer, async_name)
        for i, user in enumerate(sorted(users), 1):
            serve.check()
            per_user[user], served[user] = await score_user(
                scorer, async_scorer, users[user], chunks[user], adapters[user], finals, rag
            )
            s = per_user[user]
            echo(
                f"  {i}/{len(users)} {user}: NLL base {s['base'].nll:.3f}  local {s['local'].nll:.3f}  "
                f"global {s['global'].nll:.3f}  personal {s['personalized_ungated'].nll:.3f} -> gated "
                f"(g={adapters[user].personal.gate:g}) {s['personalized'].nll:.3f}  global+RAG "
                f"{s['global_rag'].nll:.3f}  personalized+RAG {s['personalized_rag'].nll:.3f}  (async: "
                f"global {s['async_global'].nll:.3f}, personalized {s['async_personalized'].nll:.3f})"
            )
    return per_user, served


def user_row(
    user: str,
    data: UserData,
    scores: dict[str, Score],
    served: dict[str, Any],
    personal: PersonalizeResult,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """One user's row of ``report.json``."""
    gain = evaluation.rel_gain
    ppl = {v: evaluation.ppl(s.nll) for v, s in scores.items()}
    return {
        "user": user,
        "train_chars": len(data.train_text),
        "heldout_chars": len(data.heldout_text),
        **extra,
        "nll": {v: s.nll for v, s in scores.items()},
        "ppl": ppl,
        "accuracy": {v: s.accuracy for v, s in scores.items()},
        "tokens": scores["global"].tokens,
        "gate": personal.gate,
        "val_nll_by_gate": {f"{g:g}": v for g, v in sorted(personal.val_nll.items())},
        "personalize_seconds": personal.seconds,
        "ppl_reduction_vs_global": {
            v: 1.0 - ppl[v] / ppl["global"] for v in evaluation.VS_GLOBAL if v in ppl
        },
        "gain_vs_global": gain(scores["global"].nll, scores["personalized"].nll),
        "gain_vs_local": gain(scores["local"].nll, scores["personalized"].nll),
        "gain_vs_base": gain(scores["base"].nll, scores["personalized"].nll),
        "async_gain_vs_global": gain(scores["async_global"].nll, scores["async_personalized"].nll),
        "served": served,
    }
