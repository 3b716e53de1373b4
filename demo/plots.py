"""The demo report's PNG plots (matplotlib: the ``demo`` extra)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from demo.evaluation import LABELS

PLOTS = {
    "per_user_ppl": "per_user_ppl.png",
    "per_user_gain": "per_user_gain.png",
    "loss_vs_time": "loss_vs_time.png",
    "staleness": "staleness.png",
    "version_timeline": "version_timeline.png",
}
PPL_VARIANTS = ("base", "local", "global", "personalized", "global_rag", "personalized_rag")


def write_plots(report: dict[str, Any], out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, str] = {}
    users = report["users"]

    # 1. per-user perplexity by variant (one group of points per user, sorted by global-only)
    rows = sorted(users, key=lambda r: r["ppl"]["global"])
    variants = [v for v in PPL_VARIANTS if all(v in r["ppl"] for r in rows)]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.45 * len(rows) + 2.5), 4.5))
    xs = list(range(len(rows)))
    markers = "os^Dvx*P"
    for i, variant in enumerate(variants):
        ax.plot(xs, [r["ppl"][variant] for r in rows], markers[i % len(markers)], ms=5, label=LABELS[variant])
    ax.set_xticks(xs, [r["user"] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title("Per-user held-out perplexity by variant (lower is better)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / PLOTS["per_user_ppl"], dpi=110)
    plt.close(fig)
    files["per_user_ppl"] = PLOTS["per_user_ppl"]

    # 2. per-user perplexity reduction vs global-only of each personalization component
    rows = sorted(users, key=lambda r: r["ppl_reduction_vs_global"].get("personalized_rag", 0.0))
    parts = [
        v
        for v in ("personalized", "global_rag", "personalized_rag")
        if v in rows[0]["ppl_reduction_vs_global"]
    ]
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.36 * len(rows) + 1.2)))
    height = 0.8 / max(1, len(parts))
    for i, variant in enumerate(parts):
        ax.barh(
            [y + (i - (len(parts) - 1) / 2) * height for y in range(len(rows))],
            [100 * r["ppl_reduction_vs_global"][variant] for r in rows],
            height,
            label=LABELS[variant],
        )
    ax.set_yticks(list(range(len(rows))), [r["user"] for r in rows], fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("held-out perplexity reduction vs global-only (%)")
    ax.set_title("Per-user gain of each component over global-only")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / PLOTS["per_user_gain"], dpi=110)
    plt.close(fig)
    files["per_user_gain"] = PLOTS["per_user_gain"]

    # 3. held-out loss vs time (virtual device time and the demo's real wall clock)
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

    # 4. staleness histogram (async, from the version metadata)
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

    # 5. version timeline: versions over virtual time, and the async clients' rounds (Gantt)
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
