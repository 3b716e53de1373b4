"""``pfi bench <name>``: each benchmark module exposes ``register(subparsers)`` and is listed here.

Benchmark modules import torch, FastAPI, Flower...: importing them all to build the ``pfi`` parser made
every ``pfi`` command (the aggregator's and the server's start included) pay for them (profiled: 17 of
19 s of ``pfi edge simulate``'s start-up on a loaded machine). So ``pfi bench NAME ARGS`` only records
``NAME`` and ``ARGS`` here; the module is imported when that benchmark runs, and parses its own ARGS.
The command name is the module's last part with ``-`` for ``_`` (``bench.edge_scale``: ``edge-scale``).
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

BENCHMARKS = (
    "bench.aggregator",
    "bench.edge_scale",
    "bench.serving",
    "bench.async_sync",
    "bench.soak",
    "bench.chaos",
    "bench.attacks",
    "bench.retrieval",
    "bench.scaling",
    "bench.hierarchy_chaos",
)

SUMMARIES = {
    "aggregator": "updates/s through Kafka into the aggregator vs a raw consumer, and vs Flower's FedAvg",
    "edge-scale": "updates/s of one simulator process; peak RSS for 100 vs 1000 virtual clients",
    "serving": "personalization service: latency vs base, throughput vs per-request loads, freshness",
    "async-sync": "time to the same loss: async FedBuff vs sync FedAvg on heterogeneous devices",
    "soak": "a steady update rate for --minutes: RSS growth of each service, lag",
    "chaos": "kill -9 / broker, Redis and server restarts: lost and double-counted updates",
    "attacks": "issue 12 attacks on real aggregator + serve: not refused, beyond the bound, lost (all 0)",
    "hierarchy-chaos": "issue 15: kill -9 of leaves and roots, lost/double-counted per level (all 0)",
    "scaling": "issue 15: one hierarchical federation's updates/s with 1, 2, ... leaf processes",
    "retrieval": "private retrieval: search p50/p99 for a 10k-chunk user, score/generate overhead vs none",
}


def command_name(module: str) -> str:
    return module.rsplit(".", 1)[-1].replace("_", "-")


def _run(module: str, name: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pfi bench")
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    importlib.import_module(module).register(sub)
    args = parser.parse_args([name, *argv])
    return int(args.func(args))


def register(subparsers: Any) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="benchmarks (not tests): figures and ratios, JSON results",
        description="Each benchmark prints a table ending with its key ratios and writes "
        "bench/results/NAME.json; `pfi bench NAME --help` lists its options.",
    )
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    for module in BENCHMARKS:
        name = command_name(module)
        # No option of its own ("+" prefix): "--json", "--help"... all land in bench_args.
        parser = sub.add_parser(
            name, help=SUMMARIES.get(name, f"see pfi bench {name} --help"), add_help=False, prefix_chars="+"
        )
        parser.add_argument("bench_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        parser.set_defaults(func=lambda args, m=module, n=name: _run(m, n, args.bench_args))
    bench.set_defaults(func=lambda _args: (bench.print_help(), 2)[1])
