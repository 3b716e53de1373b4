"""The personalization part of the demo report: goals, the variant table, the per-user table and which
component gave how much (personal adapter ungated / gated, retrieval alone, both)."""

from __future__ import annotations

import math
from typing import Any

from demo.evaluation import ASYNC_VARIANTS, HARM_MARGIN, LABELS, VARIANTS

GOAL_PERSONALIZED = 0.12  # median per-user perplexity reduction vs global-only, gated personal alone
GOAL_PERSONALIZED_RAG = 0.25  # ... personalized + RAG
GOAL_IMPROVED = 0.90  # share of users improved (personalized + RAG)
GOAL_HARMED = 0.02  # share of users harmed (perplexity > 1% above global-only)


def pct(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:+.1f}%"


def share(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def personalization_goals(summary: dict[str, Any]) -> dict[str, bool]:
    median = summary.get("median_ppl_reduction_vs_global", {})
    improved = summary.get("share_users_improved", {})
    harmed = summary.get("share_users_harmed", {})
    return {
        "personalized_median_ppl_12pct": median.get("personalized", -1.0) >= GOAL_PERSONALIZED,
        "personalized_rag_median_ppl_25pct": median.get("personalized_rag", -1.0) >= GOAL_PERSONALIZED_RAG,
        "personalized_rag_90pct_users_improved": improved.get("personalized_rag", 0.0) >= GOAL_IMPROVED,
        "personalized_rag_at_most_2pct_harmed": harmed.get("personalized_rag", 1.0) <= GOAL_HARMED,
        "personalized_at_most_2pct_harmed": harmed.get("personalized", 1.0) <= GOAL_HARMED,
    }


def variant_table(summary: dict[str, Any]) -> list[str]:
    lines = [
        "| variant | federation | mean NLL | worst-10% perplexity | median ppl reduction vs global-only "
        "| users improved / harmed | mean token accuracy |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    median = summary.get("median_ppl_reduction_vs_global", {})
    improved = summary.get("share_users_improved", {})
    harmed = summary.get("share_users_harmed", {})
    for v in (*VARIANTS, *ASYNC_VARIANTS):
        if v not in summary["mean_nll"]:
            continue
        fed = "async" if v.startswith("async") else ("(v0)" if v in ("base", "local") else "sync")
        versus = f"{share(improved.get(v))} / {share(harmed.get(v))}" if v in improved else ""
        lines.append(
            f"| {LABELS[v]} | {fed} | {summary['mean_nll'][v]:.4f} | {summary['worst10_ppl'][v]:.2f} | "
            f"{pct(median.get(v)) if v in median else ''} | {versus} | "
            f"{summary['mean_token_accuracy'][v]:.4f} |"
        )
    return lines


def components(report: dict[str, Any]) -> list[str]:
    """Which component gave how much, the recipe, and the goals."""
    s = report["summary"]
    median = s["median_ppl_reduction_vs_global"]
    improved, harmed = s["share_users_improved"], s["share_users_harmed"]
    recipe = report["personalization_recipe"]
    gates = [r["gate"] for r in report["users"]]
    goals = personalization_goals(s)

    def verdict(key: str) -> str:
        return "reached" if goals.get(key) else "not reached"

    lines = [
        "## Personalization: which component gives how much",
        "",
        "Median over users of 1 - perplexity(variant) / perplexity(global-only) on the held-out end of "
        f"each user's text (harmed: perplexity more than {100 * HARM_MARGIN:.0f}% above global-only):",
        "",
        "| component | median ppl reduction | users improved | users harmed |",
        "|---|---:|---:|---:|",
    ]
    for v, what in (
        ("personalized_ungated", "personal adapter, ungated (gate 1)"),
        ("personalized", "personal adapter, gated (the device's gate)"),
        ("global_rag", "retrieval alone (global + RAG)"),
        ("personalized_rag", "both (gated personal + RAG)"),
    ):
        if v in median:
            lines.append(f"| {what} | {pct(median[v])} | {share(improved[v])} | {share(harmed[v])} |")
    counts = {g: gates.count(g) for g in sorted(set(gates))}
    lines += [
        "",
        "Gates chosen by the devices on their own validation text: "
        + ", ".join(f"{g:g} x{n}" for g, n in counts.items())
        + " (0 = personal adapter off, served as global-only).",
        "",
        f"* Personalized (gated) alone, median ≥ {100 * GOAL_PERSONALIZED:.0f}%: "
        f"**{verdict('personalized_median_ppl_12pct')}** ({pct(median.get('personalized'))}).",
        f"* Personalized + RAG, median ≥ {100 * GOAL_PERSONALIZED_RAG:.0f}%: "
        f"**{verdict('personalized_rag_median_ppl_25pct')}** ({pct(median.get('personalized_rag'))}); "
        f"≥ {100 * GOAL_IMPROVED:.0f}% of users improved: "
        f"**{verdict('personalized_rag_90pct_users_improved')}** "
        f"({share(improved.get('personalized_rag'))}); "
        f"≤ {100 * GOAL_HARMED:.0f}% harmed: **{verdict('personalized_rag_at_most_2pct_harmed')}** "
        f"({share(harmed.get('personalized_rag'))}).",
        "",
        "**Recipe** (the same defaults on every corpus): after the federated run each device fits its "
        f"personal adapter against the final global adapter (shared slot frozen), {recipe['steps']} "
        f"steps x {recipe['batch_size']} x {recipe['seq_len']} tokens at lr {recipe['lr']:g}, continuing "
        "from the personal adapter it trained during the rounds, on its training text less the last "
        f"{100 * recipe['validation_fraction']:.0f}% of its paragraphs; that last part is the validation "
        f"split on which it chooses the gate from {recipe['gates']} (0 is always a candidate, so the "
        "chosen gate is never worse than the global on the user's own validation text). LoRA rank "
        f"{recipe['rank']} on {', '.join(recipe['target_modules'])} (the federation's config: the serving "
        "slots hold adapters of that shape). Retrieval: the user's training text in their private store "
        f"(MiniLM + BM25, fused), k={report['config']['rag_k']} chunks, at most "
        f"{report['config']['rag_context_tokens']} tokens of context, query = the text just before the "
        "scored chunk (never the chunk itself).",
        "",
    ]
    return lines


def user_table(report: dict[str, Any]) -> list[str]:
    lines = [
        "| user | train chars | rounds sync / async | base | local-only | global-only "
        "| personal (g=1) | gated (g) | global+RAG | personalized+RAG "
        "| ppl reduction pers. / pers.+RAG | async: global → pers. |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["users"]:
        p = r["ppl"]
        red = r["ppl_reduction_vs_global"]
        lines.append(
            f"| {r['user']} | {r['train_chars']:,} | {r['rounds']} / {r['async_rounds']} | "
            f"{p['base']:.1f} | {p['local']:.1f} | {p['global']:.1f} | {p['personalized_ungated']:.1f} | "
            f"{p['personalized']:.1f} ({r['gate']:g}) | {p['global_rag']:.1f} | "
            f"{p['personalized_rag']:.1f} | "
            f"{pct(red['personalized'])} / {pct(red['personalized_rag'])} | "
            f"{p['async_global']:.1f} → {p['async_personalized']:.1f} |"
        )
    return lines
