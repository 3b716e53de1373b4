"""The demo's ``report.json`` document: configuration, environment, devices, data, per-user rows and
both runs."""

from __future__ import annotations

import math
import os
import statistics
import sys
from typing import TYPE_CHECKING, Any

import torch

from demo import personal_phase, report
from demo.runs import fastest_share, load_average, run_dict
from schemas.events import FederationSpec
from services.stack.processes import ServiceProcess
from sim.devices import DeviceModel
from sim.results import RunResult

if TYPE_CHECKING:
    from demo.runner import Demo


def build_document(
    demo: Demo,
    summary: dict[str, Any],
    av: dict[str, Any],
    async_run: RunResult,
    sync_run: RunResult,
    versions: dict[str, list[dict[str, Any]]],
    users: dict[str, Any],
    rows: list[dict[str, Any]],
    devices: DeviceModel,
    train_tokens: dict[str, int],
    chunks: dict[str, list[str]],
    curve_texts: list[str],
    started_at: str,
    load_start: str,
    aggregator: ServiceProcess,
    serve: ServiceProcess,
    async_spec: FederationSpec,
    sync_spec: FederationSpec,
) -> dict[str, Any]:
    cfg = demo.cfg
    speeds = sorted(devices.speeds.values())
    expected = [m * cfg.steps * cfg.step_seconds + cfg.network_s / 2 for m in speeds]
    summary = {
        **summary,
        "async_vs_sync_speedup": av.get("async_vs_sync_speedup"),
        "goals": {
            **report.personalization_goals(summary),
            "async_3x_faster": (av.get("async_vs_sync_speedup") or 0.0) >= report.GOAL_SPEEDUP,
        },
    }
    return {
        "run": cfg.run_name,
        "command": demo.command,
        "started_at": started_at,
        "out": str(demo.out),
        "summary": summary,
        "async_vs_sync": av,
        "config": cfg.to_dict(),
        "personalization_recipe": personal_phase.recipe_dict(cfg),
        "federations": {
            "async": async_spec.model_dump(mode="json"),
            "sync": sync_spec.model_dump(mode="json"),
        },
        "timings": {**demo.phases.timings, "total": demo.phases.total()},
        "environment": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_start": load_start,
            "load_end": load_average(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
        },
        "devices": {
            "speeds": devices.speeds,
            # updates per virtual second of async over sync: max(d) * mean(1/d), d = expected
            # device time of one update (compute + mean network delay)
            "throughput_ratio": max(expected) * statistics.fmean(1.0 / d for d in expected),
            "slowest_over_median": speeds[-1] / statistics.median(speeds),
            "fastest_over_median": speeds[0] / statistics.median(speeds),
        },
        "data": {
            "users": len(users),
            "mean_train_tokens": statistics.fmean(train_tokens.values()),
            "eval_chunks_per_user": statistics.fmean(len(c) for c in chunks.values()),
            "curve_chunks": cfg.curve_chunks,
            "curve_texts": len(curve_texts),
        },
        "users": rows,
        "runs": {
            "async": {
                **run_dict(async_run, versions["async"]),
                "max_updates": math.ceil(cfg.async_budget * cfg.rounds * len(users)),
                "reached_sync_best": av.get("best_nll_async", math.inf) <= av.get("best_nll_sync", -math.inf),
                "fastest_quarter_share": fastest_share(async_run, devices),
            },
            "sync": run_dict(sync_run, versions["sync"]),
        },
        "logs": {"aggregator": str(aggregator.log_path), "serve": str(serve.log_path)},
    }
