"""The report directory: ``report.json``, ``report.md``, PNG plots, and the summary table on stdout."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from demo.evaluation import ASYNC_VARIANTS, LABELS, VARIANTS

GOAL_PERSONALIZATION = 0.20
GOAL_SPEEDUP = 3.0

PLOTS = {
    "per_user_gain": "per_user_gain.png",
    "loss_vs_time": "loss_vs_time.png",
    "staleness": "staleness.png",
    "version_timeline": "version_timeline.png",
}


def _fmt(value: Any, spec: str = ".4f", none: str = "n/a") -> str:
    if value is None:
        return none
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}%"


# ------------------------------------------------------------------------------------------- plots


def write_plots(report: dict[str, Any], out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, str] = {}
    users = report["users"]

    # 1. per-user gain
    rows = sorted(users, key=lambda r: r["gain_vs_global"])
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.32 * len(rows) + 1.2)))
    names = [r["user"] for r in rows]
    ys = range(len(rows))
    ax.barh([y + 0.2 for y in ys], [100 * r["gain_vs_global"] for r in rows], 0.4, label="vs global-only")
    ax.barh([y - 0.2 for y in ys], [100 * r["gain_vs_local"] for r in rows], 0.4, label="vs local-only")
    ax.set_yticks(list(ys), names, fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    ax.axvline(100 * GOAL_PERSONALIZATION, color="gray", ls="--", lw=0.8, label="goal (20%)")
    ax.set_xlabel("held-out NLL reduction of personalized (%)")
    ax.set_title("Per-user gain of base + global + personal")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / PLOTS["per_user_gain"], dpi=110)
    plt.close(fig)
    files["per_user_gain"] = PLOTS["per_user_gain"]

    # 2. held-out loss vs time (virtual device time and the demo's real wall clock)
    runs = report["runs"]
    target = report["async_vs_sync"].get("target_nll")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode, color in (("async", "tab:blue"), ("sync", "tab:orange")):
        points = runs[mode]["curve"]
        label = f"{mode} (K={runs[mode]['buffer_size']})"
        for ax, key in ((axes[0], "virtual_s"), (axes[1], "wall_s")):
            ax.step(
                [p[key] for p in points], [p["nll"] for p in points], where="post", color=color, label=label
            )
            ax.plot([p[key] for p in points], [p["nll"] for p in points], "o", color=color, ms=3)
    for ax in axes:
        if target is not None:
            ax.axhline(target, color="gray", ls="--", lw=0.8, label="target")
        ax.set_ylabel("global held-out NLL (pooled)")
        ax.legend(fontsize=8)
    axes[0].set_xlabel("virtual device time (s)")
    axes[0].set_title("vs simulated wall-clock (the comparison)")
    axes[1].set_xlabel("real seconds of this demo run")
    axes[1].set_title("vs the demo's own wall-clock (2 CPU cores)")
    fig.tight_layout()
    fig.savefig(out / PLOTS["loss_vs_time"], dpi=110)
    plt.close(fig)
    files["loss_vs_time"] = PLOTS["loss_vs_time"]

    # 3. staleness histogram (async, from the version metadata)
    staleness = [u["staleness"] for v in runs["async"]["version_meta"] for u in v["updates"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if staleness:
        counts = Counter(staleness)
        xs = sorted(counts)
        ax.bar(xs, [counts[x] for x in xs], color="tab:blue")
    ax.set_xlabel("staleness τ = version at aggregation - base version")
    ax.set_ylabel("updates")
    ax.set_title(f"Async FedBuff staleness ({len(staleness)} aggregated updates)")
    fig.tight_layout()
    fig.savefig(out / PLOTS["staleness"], dpi=110)
    plt.close(fig)
    files["staleness"] = PLOTS["staleness"]

    # 4. version timeline: versions over virtual time, and the async clients' rounds (Gantt)
    fig, axes = plt.subplots(2, 1, figsize=(10, 7), gridspec_kw={"height_ratios": [1, 2]})
    for mode, color in (("async", "tab:blue"), ("sync", "tab:orange")):
        points = runs[mode]["curve"]
        axes[0].step(
            [p["virtual_s"] for p in points],
            [p["version"] for p in points],
            where="post",
            color=color,
            label=mode,
        )
    axes[0].set_ylabel("global version")
    axes[0].legend(fontsize=8)
    speeds = report["devices"]["speeds"]
    order = sorted(speeds, key=lambda u: -speeds[u])
    for update in runs["async"]["update_records"]:
        y = order.index(update["user"])
        axes[1].plot([update["start_s"], update["publish_s"]], [y, y], color="tab:blue", lw=3, alpha=0.7)
        axes[1].plot([update["publish_s"]], [y], "|", color="black", ms=6)
    for point in runs["async"]["curve"][1:]:
        axes[1].axvline(point["virtual_s"], color="gray", lw=0.4, alpha=0.5)
    axes[1].set_yticks(range(len(order)), [f"{u} (x{speeds[u]:.2f})" for u in order], fontsize=7)
    axes[1].set_xlabel("virtual device time (s)")
    axes[1].set_title(
        "async: each client's rounds (train → publish; speed factor in brackets); grey: new global versions"
    )
    xmax = max(runs["sync"]["virtual_s"], runs["async"]["virtual_s"]) * 1.02 or 1.0
    for ax in axes:
        ax.set_xlim(0, xmax)
    fig.tight_layout()
    fig.savefig(out / PLOTS["version_timeline"], dpi=110)
    plt.close(fig)
    files["version_timeline"] = PLOTS["version_timeline"]
    return files


# --------------------------------------------------------------------------------------- markdown


def _variant_table(summary: dict[str, Any]) -> list[str]:
    lines = [
        "| variant | federation | mean per-user NLL | mean token accuracy | worst-10% NLL "
        "| NLL vs its global-only |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for v in (*VARIANTS, *ASYNC_VARIANTS):
        if v not in summary["mean_nll"]:
            continue
        nll = summary["mean_nll"][v]
        glob = summary["mean_nll"]["async_global" if v.startswith("async") else "global"]
        fed = "async" if v.startswith("async") else ("sync" if v in ("global", "personalized") else "(v0)")
        lines.append(
            f"| {LABELS[v]} | {fed} | {nll:.4f} | {summary['mean_token_accuracy'][v]:.4f} | "
            f"{summary['worst10_nll'][v]:.4f} | {_pct((nll - glob) / glob)} |"
        )
    return lines


def _discussion(report: dict[str, Any]) -> list[str]:
    s = report["summary"]
    cfg = report["config"]
    av = report["async_vs_sync"]
    gain = s["rel_gain_personalized_vs_global"]
    speed = s["async_vs_sync_speedup"]
    seqs = cfg["rounds"] * cfg["steps"] * cfg["batch_size"]
    tokens_seen = seqs * cfg["seq_len"]
    mean_train = report["data"]["mean_train_tokens"]
    lines = ["## Discussion", ""]
    verdict = "reached" if gain >= GOAL_PERSONALIZATION else "not reached"
    lines += [
        f"**Personalization goal (≥ 20% lower mean per-user held-out NLL than global-only): {verdict}** — "
        f"personalized is {100 * gain:.1f}% below global-only "
        f"({s['mean_nll']['personalized']:.4f} vs {s['mean_nll']['global']:.4f}), "
        f"{100 * s['rel_gain_personalized_vs_local']:.1f}% below local-only and "
        f"{100 * s['rel_gain_personalized_vs_base']:.1f}% below the base model; "
        f"{s['users_personalized_better_than_global']}/{s['users']} users gain (median "
        f"{100 * s['median_user_gain_vs_global']:.1f}%, range {100 * s['min_user_gain_vs_global']:.1f}% .. "
        f"{100 * s['max_user_gain_vs_global']:.1f}%).",
        "",
        ("What limits it" if gain < GOAL_PERSONALIZATION else "What drives it")
        + ", with the figures of this run:",
        "",
        f"* **Training budget.** A personal adapter gets {cfg['rounds']} rounds x {cfg['steps']} steps x "
        f"{cfg['batch_size']} sequences of {cfg['seq_len']} tokens = about {tokens_seen:,} tokens, against "
        f"about {mean_train:,.0f} training tokens per user on average: "
        f"{100 * tokens_seen / max(mean_train, 1):.0f}% of one epoch. Everything that is common to the "
        "users (for plays: verse layout, archaic forms) is learnt by the global adapter first; what is "
        "left for the personal one is the user's own vocabulary, names and topics, which needs several "
        "epochs.",
        "* **How different the users are.** Users of one corpus (speakers of one set of plays) share most "
        "of their style; a held-out passage of a user shares with their training text mostly names and "
        f"topics. The base → global gain ({100 * s['rel_gain_global_vs_base']:.1f}%) measures what the "
        "users share; a personal adapter can only win what is specific to one user, and the local-only "
        f"baseline ({100 * s['rel_gain_local_vs_base']:.1f}% below base) shows how much one user's text "
        "alone teaches. Users with really different text (other languages, jargon, code) are where a "
        "personal adapter can earn 20%+.",
        "* **Capacity and step size.** rank "
        f"{cfg['rank']} LoRA on {', '.join(cfg['target_modules'])} with personal learning rate "
        f"{cfg['personal_lr']:g}. A higher rate does not help: in a trial on SmolLM2 with 1.2e-2 the "
        "personal adapters over-fitted their few hundred tokens and personalized ended ~5% *above* "
        "global-only. More target modules (MLP) and more local epochs would move this number, at a "
        "proportional CPU cost.",
        "",
        "What would change it: 5-10x more local steps per user (the full run is bounded by 45 min of "
        "two shared CPU cores), users with more distinct text, and adapting the MLP as well.",
        "",
    ]
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
        *_variant_table(s),
        "",
        f"* personalized vs global-only: **{_pct(s['rel_gain_personalized_vs_global'])}** "
        "(relative reduction of the mean per-user held-out NLL; goal 20%)",
        f"* personalized vs local-only: **{_pct(s['rel_gain_personalized_vs_local'])}**",
        "* async federation, personalized vs its global-only: "
        f"{_pct(s.get('async_rel_gain_personalized_vs_global'))}",
        "* worst-10% users, personalized vs global-only: "
        f"{_pct(s['worst10_rel_gain_personalized_vs_global'])}",
        f"* async FedBuff vs sync FedAvg, virtual time to the same global loss: "
        f"**{_fmt(s['async_vs_sync_speedup'], '.2f')}x** (goal 3x)",
        "",
        "How to read this: every variant is scored by the personalization service's `score` route on the "
        "same held-out chunks of each user (text the user's agent never trained on). The four main "
        "variants use the **sync** federation, where every user trained the same number of rounds, so "
        "the personalization gain is not mixed up with device speed. *base*: the federation's v0 pinned "
        "(`global_version=0`; v0 is the PEFT initialization with B = 0, so it is exactly the base model) "
        "without a personal adapter; *local-only*: v0 + a personal adapter trained alone on the user's "
        "text with the same rounds, steps, seeds and learning rate; *global-only*: the final global "
        "adapter, `use_personal=false`; *personalized*: the same global + the user's personal adapter "
        "from the federated run (uploaded with the user's own token). The *async* rows are the same for "
        "the async FedBuff federation, where fast devices ran more rounds than slow ones (a user whose "
        "device finished no round has no personal adapter there and is served base + global). NLL is "
        "the mean next-token negative log-likelihood in nats per token (lower is better); accuracy is the "
        "fraction of positions where the most likely token is the right one; worst-10% is the mean NLL "
        "of the 10% of users (at least one) with the highest NLL under that variant.",
        "",
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
        "| user | train chars | speed | rounds sync / async | base | local-only | global-only | personalized "
        "| gain vs global | gain vs local | acc. global → pers. | async: global → pers. |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["users"]:
        n = r["nll"]
        a = r["accuracy"]
        lines.append(
            f"| {r['user']} | {r['train_chars']:,} | {r['speed']:.2f} | "
            f"{r['rounds']} / {r['async_rounds']} | "
            f"{n['base']:.4f} | {n['local']:.4f} | {n['global']:.4f} | {n['personalized']:.4f} | "
            f"{_pct(r['gain_vs_global'])} | {_pct(r['gain_vs_local'])} | "
            f"{a['global']:.3f} → {a['personalized']:.3f} | "
            f"{n['async_global']:.4f} → {n['async_personalized']:.4f} |"
        )
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
    rows = [
        "",
        f"{'variant':<18} {'mean NLL':>9} {'accuracy':>9} {'worst-10%':>10}",
        "-" * 50,
    ]
    for v in (*VARIANTS, *ASYNC_VARIANTS):
        if v not in s["mean_nll"]:
            continue
        rows.append(
            f"{LABELS[v]:<18} {s['mean_nll'][v]:>9.4f} {s['mean_token_accuracy'][v]:>9.4f} "
            f"{s['worst10_nll'][v]:>10.4f}"
        )
    rows += [
        "-" * 50,
        f"personalized vs global-only : {_pct(s['rel_gain_personalized_vs_global'])}  (goal +20.0%)",
        f"personalized vs local-only  : {_pct(s['rel_gain_personalized_vs_local'])}",
        f"async vs sync speedup       : {_fmt(s['async_vs_sync_speedup'], '.2f')}x  (goal 3x; target NLL "
        f"{_fmt(av.get('target_nll'))}: async {_fmt(av.get('time_to_target_async_s'), '.1f')} s, sync "
        f"{_fmt(av.get('time_to_target_sync_s'), '.1f')} s virtual)",
        "timings (s)                 : " + ", ".join(f"{k} {v:.0f}" for k, v in report["timings"].items()),
        f"report                      : {report['out']}/report.md",
        "",
    ]
    return "\n".join(rows)


def write_json(report: dict[str, Any], out: Path) -> Path:
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    return path
