"""``pfi bench <name>``: each benchmark module exposes ``register(subparsers)`` and is listed here."""

from __future__ import annotations

import importlib
from typing import Any

BENCHMARKS = ("bench.edge_scale",)


def register(subparsers: Any) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks (not tests): figures and ratios, JSON results")
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    for name in BENCHMARKS:
        importlib.import_module(name).register(sub)
    bench.set_defaults(func=lambda _args: (bench.print_help(), 2)[1])
