"""The report directory: ``report.json``, ``report.md``, PNG plots, and the summary table on stdout."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from demo.evaluation import ASYNC_VARIANTS, LABELS, VARIANTS
from demo.plots import PLOTS
from demo.report_personal import components, personalization_goals, user_table, variant_table

GOAL_SPEEDUP = 3.0
__all__ = ["GOAL_SPEEDUP", "personalization_goals", "summary_table", "write_json", "write_markdown"]


def _fmt(value: Any, spec: str = ".4f", none: str = "n/a") -> str:
    if value is None:
        return none
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}%"


# --------------------------------------------------------------------------------------- markdown


def _discussion(report: dict[str, Any]) -> list[str]:
    s = report["summary"]
    cfg = report["config"]
    av = report["async_vs_sync"]
    speed = s["async_vs_sync_speedup"]
    lines = ["## Discussion", ""]
    if speed is None:
        lines += [
            f"**Async vs sync goal (≥ 3x faster to the same loss): not measurable** — {av.get('reason')}.",
            "",
        ]
    else:
        verdict = "reached" if speed >= GOAL_SPEEDUP else "not reached"
        runs = report["runs"]
        a, y = runs["async"], runs["sync"]
        dev = report["devices"]
        stop = (
            "stopped as soon as a version reached the sync run's best loss"
            if a["reached_sync_best"]
            else f"did not reach the sync run's best loss within its cap of {a['max_updates']} updates"
        )
        lines += [
            f"**Async vs sync goal (≥ 3x faster to the same loss): {verdict}** — async FedBuff reached the "
            f"target NLL {av['target_nll']:.4f} after {av['time_to_target_async_s']:.1f} virtual seconds, "
            f"sync FedAvg after {av['time_to_target_sync_s']:.1f}: **{speed:.2f}x**. Sync sent "
            f"{y['updates']} updates in {y['virtual_s']:.1f} virtual seconds; async {stop} "
            f"({a['updates']} updates, {a['virtual_s']:.1f} virtual seconds).",
            "",
            ("What limits it" if speed < GOAL_SPEEDUP else "What drives it")
            + ", with the figures of this run:",
            "",
            f"* **Throughput.** A sync round lasts as long as its slowest device; async keeps every device "
            f"busy. With these speed factors (lognormal sigma={cfg['speed_sigma']}, slowest/median "
            f"{dev['slowest_over_median']:.1f}x, plus the network delay) async receives about "
            f"{dev['throughput_ratio']:.1f}x as many updates per virtual second as sync (in steady state; "
            "the first async version still waits for K completions): the speedup if an async update "
            "were worth as much as a sync one.",
            f"* **Update efficiency.** To reach the target async used {av['updates_to_target_async']} "
            f"updates, sync {av['updates_to_target_sync']}. Async updates are stale (mean staleness "
            f"{_fmt(a['staleness']['mean'], '.2f')}, max {a['staleness']['max']}; discounted by "
            f"(1+τ)^-{cfg['staleness_a']}) and come mostly from the fastest devices "
            f"({100 * a['fastest_quarter_share']:.0f}% of the async updates came from the fastest quarter "
            "of the clients), so the global drifts towards their text; sync averages every client once "
            "per round.",
            f"* **Version rate.** The merge averages the K deltas of a version, so a version moves the "
            "global by about one client's local training, whatever K is: progress follows the number of "
            f"versions more than the number of updates. Async (K={a['buffer_size']}) made "
            f"{a['versions']} versions in {a['virtual_s']:.1f} virtual seconds, sync (K={y['buffer_size']}, "
            f"every client every round) {y['versions']} in {y['virtual_s']:.1f}. Part of the async "
            "advantage is therefore the smaller buffer, not the asynchrony alone: a sync baseline that "
            "samples fewer clients per round would make versions more often (and waste less of each round "
            "waiting), and it would be the fairer baseline for a very small K.",
            "* **Resolution.** Sync has one point per round, so its time to a target is a multiple of its "
            "round length, and a version's loss on a small pooled held-out set moves by a few thousandths "
            "from noise alone; treat the ratio as ±1 round of sync.",
            "",
            "What would change it: a wider speed spread or more clients (a longer sync straggler tail) "
            "raises the throughput ratio; a larger K or a stronger staleness discount trades version rate "
            "for update quality; more local steps per update make each version move further.",
            "",
        ]
    return lines


def write_markdown(report: dict[str, Any], out: Path) -> Path:
    s = report["summary"]
    cfg = report["config"]
    runs = report["runs"]
    av = report["async_vs_sync"]
    env = report["environment"]
    lines = [
        f"# PFI demo report — {report['run']}",
        "",
        f"Command: `{report['command']}`  ",
        f"Base model: `{cfg['base_model']}`; data: `{cfg['data']}` ({s['users']} users); "
        f"started {report['started_at']}; total {report['timings']['total']:.0f} s on {env['cpu_count']} "
        f"CPU cores (load average at start {env['load_start']}, at end {env['load_end']}; other work on "
        "the machine slows every phase).",
        "",
        "## Summary",
        "",
        *variant_table(s),
        "",
        f"* personalized (gated) vs global-only: median per-user perplexity "
        f"**{_pct(s['median_ppl_reduction_vs_global'].get('personalized'))}**, personalized + RAG "
        f"**{_pct(s['median_ppl_reduction_vs_global'].get('personalized_rag'))}**, global + RAG "
        f"{_pct(s['median_ppl_reduction_vs_global'].get('global_rag'))} (goals 12% and 25%)",
        f"* mean per-user NLL, personalized vs global-only: {_pct(s['rel_gain_personalized_vs_global'])}; "
        f"vs local-only: {_pct(s['rel_gain_personalized_vs_local'])}",
        "* async federation (ungated, no personalization step), personalized vs its global-only: "
        f"{_pct(s.get('async_rel_gain_personalized_vs_global'))}",
        f"* async FedBuff vs sync FedAvg, virtual time to the same global loss: "
        f"**{_fmt(s['async_vs_sync_speedup'], '.2f')}x** (goal 3x)",
        "",
        "How to read this: every variant is scored by the personalization service's `score` route on the "
        "same held-out chunks of each user: the **end** of the user's text (a time-like split; the user's "
        "agent never trained on it and retrieval never sees it). The main variants use the **sync** "
        "federation, where every user trained the same number of rounds, so the personalization gain is "
        "not mixed up with device speed. *base*: v0 pinned (`global_version=0`; v0 is the PEFT "
        "initialization with B = 0, so it is exactly the base model) without a personal adapter; "
        "*local-only*: v0 + a personal adapter trained alone on the user's text with the same rounds, "
        "steps and seeds; *global-only*: the final global adapter, `use_personal=false`; *personal, "
        "ungated*: the global + the adapter of the device's personalization step at gate 1; "
        "*personalized (gated)*: the same at the gate the device chose; *+ RAG*: each chunk scored with "
        "context retrieved from the user's own training text in their private document store (the "
        "`retrieval` field of `score`; query = the text before the chunk). The *async* rows are the "
        "async FedBuff federation's final global and its run's personal adapters (ungated). NLL is the "
        "mean next-token negative log-likelihood in nats per token; perplexity = exp(NLL) per user; "
        "worst-10% is the mean perplexity of the 10% of users (at least one) with the highest perplexity "
        "under that variant.",
        "",
        f"![per-user perplexity]({PLOTS['per_user_ppl']})",
        "",
        *components(report),
        "## Async FedBuff vs sync FedAvg",
        "",
        "| run | K | updates | versions | virtual time (s) | first → final NLL | best NLL | demo wall (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in ("async", "sync"):
        r = runs[mode]
        lines.append(
            f"| {mode} | {r['buffer_size']} | {r['updates']} | {r['versions']} | {r['virtual_s']:.1f} | "
            f"{_fmt(r['initial_nll'])} → {_fmt(r['final_nll'])} | {_fmt(r['best_nll'])} | {r['wall_s']:.0f} |"
        )
    lines += [
        "",
        f"Speedup: {av['definition']}. Target {_fmt(av.get('target_nll'))}: async "
        f"{_fmt(av.get('time_to_target_async_s'), '.1f')} s, sync "
        f"{_fmt(av.get('time_to_target_sync_s'), '.1f')} s "
        f"→ **{_fmt(av.get('async_vs_sync_speedup'), '.2f')}x**. "
        f"{runs['async'].get('reused_first_rounds', 0)} first-round trainings of the async run were "
        "taken from the sync run (bit-identical inputs: the same v0, a fresh personal adapter, the same "
        "data and seed), the rest were trained again.",
        "",
        "Device time is simulated (a discrete-event virtual clock; two CPU cores cannot run the fleet "
        "concurrently): client *i* needs speed_i x steps x "
        f"{cfg['step_seconds']} s + U(0, {cfg['network_s']}) s per update, speed_i ~ lognormal(0, "
        f"{cfg['speed_sigma']}). Everything else is real: each update is trained, clipped, encoded, "
        "signed and sent through Kafka by the edge agent code, aggregated by the `pfi aggregator` "
        "process into Redis, and the agents download the global adapter from the `pfi serve` process. "
        "In the async run a client that starts at virtual time t trains on exactly the global version "
        "that exists at t (the demo waits for the aggregator before starting it). The sync run goes "
        f"first ({cfg['rounds']} rounds); the async run then stops at its first version whose loss is at "
        "or below the sync run's best, or after "
        f"{cfg['async_budget']:g}x the sync run's updates. Both runs start from the same v0 with the "
        "same agents, data, seeds and device speeds. The loss curve "
        "evaluates each new global version in-process on a pooled held-out set "
        f"({report['data']['curve_chunks']} chunks of {cfg['eval_tokens']} tokens per user).",
        "",
        f"![held-out loss vs time]({PLOTS['loss_vs_time']})",
        "",
        f"![version timeline]({PLOTS['version_timeline']})",
        "",
        f"![staleness]({PLOTS['staleness']})",
        "",
        f"Async staleness: mean {_fmt(runs['async']['staleness']['mean'], '.2f')}, max "
        f"{runs['async']['staleness']['max']}, weight (1+τ)^-{cfg['staleness_a']}.",
        "",
        "## Per user",
        "",
        f"![per-user gain]({PLOTS['per_user_gain']})",
        "",
        "Per-user perplexity (exp of the mean held-out NLL):",
        "",
        *user_table(report),
    ]
    lines += ["", *_discussion(report), "## Timings", "", "| phase | seconds |", "|---|---:|"]
    for phase, seconds in report["timings"].items():
        lines.append(f"| {phase} | {seconds:.1f} |")
    lines += [
        "",
        "## Configuration",
        "",
        "```json",
        json.dumps(cfg, indent=2),
        "```",
        "",
        f"Service logs: `{report['logs']['aggregator']}`, `{report['logs']['serve']}`.",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


# ------------------------------------------------------------------------------------------ stdout


def summary_table(report: dict[str, Any]) -> str:
    s = report["summary"]
    av = report["async_vs_sync"]
    median = s["median_ppl_reduction_vs_global"]
    rows = [
        "",
        f"{'variant':<22} {'mean NLL':>9} {'accuracy':>9} {'worst-10% ppl':>14} {'median ppl vs global':>21}",
        "-" * 79,
    ]
    for v in (*VARIANTS, *ASYNC_VARIANTS):
        if v not in s["mean_nll"]:
            continue
        versus = _pct(median[v]) if v in median else ""
        rows.append(
            f"{LABELS[v]:<22} {s['mean_nll'][v]:>9.4f} {s['mean_token_accuracy'][v]:>9.4f} "
            f"{s['worst10_ppl'][v]:>14.2f} {versus:>21}"
        )
    improved, harmed = s["share_users_improved"], s["share_users_harmed"]
    rows += [
        "-" * 79,
        f"personalized vs global-only : median ppl {_pct(median.get('personalized'))} (goal 12%), "
        f"improved {_share(improved.get('personalized'))}, harmed {_share(harmed.get('personalized'))}",
        f"personalized + RAG          : median ppl {_pct(median.get('personalized_rag'))} (goal 25%), "
        f"improved {_share(improved.get('personalized_rag'))} (goal 90%), harmed "
        f"{_share(harmed.get('personalized_rag'))} (goal <= 2%)",
        f"personalized vs global-only : {_pct(s['rel_gain_personalized_vs_global'])} mean NLL",
        f"async vs sync speedup       : {_fmt(s['async_vs_sync_speedup'], '.2f')}x  (goal 3x; target NLL "
        f"{_fmt(av.get('target_nll'))}: async {_fmt(av.get('time_to_target_async_s'), '.1f')} s, sync "
        f"{_fmt(av.get('time_to_target_sync_s'), '.1f')} s virtual)",
        "timings (s)                 : " + ", ".join(f"{k} {v:.0f}" for k, v in report["timings"].items()),
        f"report                      : {report['out']}/report.md",
        "",
    ]
    return "\n".join(rows)


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def write_json(report: dict[str, Any], out: Path) -> Path:
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    return path
