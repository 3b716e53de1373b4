"""``pfi bench chaos``: the long chaos run on a private stack (see :mod:`bench.chaos`).

Scenarios: ``kill9`` (``--trials`` kill -9 of the aggregator, default 20), ``kafka`` (broker restart
mid-stream), ``redis`` (Redis kill -9 and restart, AOF on), ``serve`` (kill -9 of ``pfi serve`` during a
request loop, ``--serve-trials``). Prints a table ending with the key figures and writes
``bench/results/chaos.json``: ``trials``, ``lost``, ``double_counted``, ``corrupt_versions``,
``serving_recovery_s_max``, ... and a ``ratios`` object. Exit status 1 when exactly-once did not hold.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from typing import Any

from bench.chaos.audit import LedgerAudit
from bench.chaos.scenarios import ScenarioResult, kill9_aggregator, restart_component
from bench.chaos.serving import ServeResult, kill9_serve
from bench.chaos.stack import ChaosStack
from bench.common import BenchError, ratio_lines, say, write_result

NAME = "chaos"
SCENARIOS = ("kill9", "kafka", "redis", "serve")
SERVING_BOUND_S = 60.0
GOALS = {
    "lost_ratio": "<= 0",
    "double_counted_ratio": "<= 0",
    "corrupt_version_ratio": "<= 0",
    "serving_recovery_s_max": f"<= {SERVING_BOUND_S:.0f}",
}


async def run_chaos(
    scenarios: tuple[str, ...] = SCENARIOS,
    *,
    trials: int = 20,
    serve_trials: int = 3,
    seed: int = 20261124,
    kafka_hard: bool = False,
    keep: bool = False,
) -> dict[str, Any]:
    """Run the chosen scenarios on one private stack; returns the result document."""
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        raise BenchError(f"unknown chaos scenario(s): {sorted(unknown)} (choose from {SCENARIOS})")
    started = time.monotonic()
    stack = await ChaosStack.start(echo=say)
    pipeline: list[ScenarioResult] = []
    serve: ServeResult | None = None
    try:
        for offset, name in enumerate(scenarios):
            say(f"chaos: scenario {name}")
            if name == "kill9":
                pipeline.append(await kill9_aggregator(stack, trials=trials, seed=seed + offset, echo=say))
            elif name in ("kafka", "redis"):
                hard = kafka_hard if name == "kafka" else True
                pipeline.append(await restart_component(stack, name, hard=hard, seed=seed + offset, echo=say))
            else:
                serve = await kill9_serve(stack, trials=serve_trials, seed=seed + offset, echo=say)
                serve.bound_s = SERVING_BOUND_S
    finally:
        await stack.stop(keep=keep)
        if keep:
            say(f"chaos: stack data and logs kept in {stack.root}")
    return summarize(pipeline, serve, time.monotonic() - started)


def summarize(pipeline: list[ScenarioResult], serve: ServeResult | None, elapsed_s: float) -> dict[str, Any]:
    audit = LedgerAudit()
    for result in pipeline:
        audit.merge(result.audit)
    kill9 = sum(r.trials for r in pipeline if r.name == "kill9")
    trials = sum(r.trials for r in pipeline) + (serve.trials if serve else 0)
    agg_recovery = [x for r in pipeline for x in r.recovery_s]
    serving = serve.recovery_s if serve else []
    serving_max = max(serving) if serving else None
    ok = all(r.ok() for r in pipeline) and (serve is None or serve.ok(SERVING_BOUND_S))
    ratios: dict[str, Any] = {
        "lost_ratio": (audit.lost + audit.rejected_valid) / audit.acked if audit.acked else 0.0,
        "double_counted_ratio": audit.double_counted / audit.acked if audit.acked else 0.0,
        "corrupt_version_ratio": audit.corrupt_versions / audit.versions if audit.versions else 0.0,
        "scenarios_ok_ratio": (sum(r.ok() for r in pipeline) + (serve.ok(SERVING_BOUND_S) if serve else 0))
        / max(1, len(pipeline) + (serve is not None)),
    }
    if serving_max is not None:
        ratios["serving_recovery_s_max"] = serving_max
    if agg_recovery:
        ratios["aggregation_recovery_s_max"] = max(agg_recovery)
    return {
        "benchmark": NAME,
        "ok": ok,
        "trials": trials,
        "kill9_trials": kill9,
        "acked": audit.acked,
        "lost": audit.lost,
        "rejected_valid": audit.rejected_valid,
        "double_counted": audit.double_counted,
        "unknown": audit.unknown,
        "corrupt_versions": audit.corrupt_versions,
        "versions": audit.versions,
        "aggregator_exits": sum(r.aggregator_exits for r in pipeline),
        "aggregation_recovery_s_max": max(agg_recovery) if agg_recovery else None,
        "serving_recovery_s_max": serving_max,
        "serving_recovery_s": serving,
        "serving_stale_after_recovery": serve.stale_after_recovery if serve else None,
        "elapsed_s": round(elapsed_s, 1),
        "scenarios": {r.name: r.to_dict() for r in pipeline}
        | ({serve.name: serve.to_dict()} if serve else {}),
        "goals": GOALS,
        "ratios": ratios,
    }


def table(result: dict[str, Any]) -> str:
    head = f"{'scenario':<14}{'trials':>7}{'acked':>7}{'lost':>6}{'dead':>6}{'double':>7}{'corrupt':>8}"
    head += f"{'versions':>9}{'agg exits':>10}{'recovery s':>12}{'elapsed s':>10}  ok"
    lines = [f"pfi bench chaos ({result['elapsed_s']:.0f}s)", head, "-" * len(head)]
    for name, r in result["scenarios"].items():
        values = r.get("recovery_s") or []
        recovery = f"{max(values):.2f}" if values else "-"
        lines.append(
            f"{name:<14}{r['trials']:>7}{r.get('acked', '-'):>7}{r.get('lost', '-'):>6}"
            f"{r.get('rejected_valid', '-'):>6}{r.get('double_counted', '-'):>7}"
            f"{r.get('corrupt_versions', '-'):>8}{r.get('versions', '-'):>9}"
            f"{r.get('aggregator_exits', '-'):>10}"
            f"{recovery:>12}{r['elapsed_s']:>10.1f}  {r.get('ok', '-')}"
        )
    lines.append("")
    for key in (
        "trials",
        "kill9_trials",
        "acked",
        "lost",
        "rejected_valid",
        "double_counted",
        "corrupt_versions",
    ):
        lines.append(f"{key} = {result[key]}")
    lines.append(f"serving_recovery_s_max = {result['serving_recovery_s_max']}")
    lines.append(f"ok = {result['ok']}")
    return "\n".join([*lines, *ratio_lines(result["ratios"], GOALS)])


def _cli(args: argparse.Namespace) -> int:
    # Our own producer logs every refused connection while a broker is down on purpose.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    scenarios = tuple(args.scenario) if args.scenario else SCENARIOS
    result = asyncio.run(
        run_chaos(
            scenarios,
            trials=args.trials,
            serve_trials=args.serve_trials,
            seed=args.seed,
            kafka_hard=args.kafka_hard,
            keep=args.keep,
        )
    )
    path = write_result(NAME, result, args.out)
    print(json.dumps(result, indent=2, default=str) if args.json else table(result))
    say(f"chaos: wrote {path}")
    return 0 if result["ok"] else 1


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "chaos",
        help="kill -9 / restarts of aggregator, Kafka, Redis and the service: exactly-once and recovery",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    parser.add_argument(
        "--trials", type=int, default=20, help="kill -9 trials of the aggregator (default 20)"
    )
    parser.add_argument("--serve-trials", type=int, default=3, help="kill -9 trials of pfi serve (default 3)")
    parser.add_argument(
        "--scenario", action="append", choices=SCENARIOS, help="run only these (repeatable; default: all)"
    )
    parser.add_argument("--seed", type=int, default=20261124)
    parser.add_argument("--kafka-hard", action="store_true", help="kill -9 the broker instead of SIGTERM")
    parser.add_argument("--keep", action="store_true", help="keep the private stack's data and logs")
    parser.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    parser.add_argument("--out", default=None, help="result file (default bench/results/chaos.json)")
    parser.set_defaults(func=_cli)
