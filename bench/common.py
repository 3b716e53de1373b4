"""What every ``pfi bench`` benchmark shares: where results go, the error type, the ratio lines.

Each benchmark prints a table that ends with its key ratios and writes ``bench/results/<name>.json``
holding at least ``benchmark`` and a ``ratios`` object (numbers a reader or CI can compare).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from schemas.errors import PFIError

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "shakespeare" / "tinyshakespeare.txt"
MIB = 1024 * 1024


class BenchError(PFIError):
    """A benchmark could not run or produced no usable figure."""


def result_path(name: str, out: str | Path | None = None) -> Path:
    return Path(out) if out else RESULTS_DIR / f"{name}.json"


def write_result(name: str, result: Mapping[str, Any], out: str | Path | None = None) -> Path:
    """Write ``result`` (must hold a ``ratios`` mapping) as ``bench/results/<name>.json`` (or ``out``)."""
    if not isinstance(result.get("ratios"), Mapping):
        raise BenchError(f"benchmark {name!r} produced no 'ratios' object")
    target = result_path(name, out)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    return target


def ratio_lines(ratios: Mapping[str, Any], goals: Mapping[str, str] | None = None) -> list[str]:
    """``name = value`` lines (the end of every table); ``goals`` maps a ratio to e.g. ``">= 0.8"``."""
    lines = ["ratios:"]
    for name, value in ratios.items():
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        goal = (goals or {}).get(name)
        verdict = ""
        if goal is not None and isinstance(value, int | float):
            verdict = f"   goal {goal}: {'met' if meets(float(value), goal) else 'NOT met'}"
        lines.append(f"  {name} = {shown}{verdict}")
    return lines


def meets(value: float, goal: str) -> bool:
    """``goal`` is ``">= x"`` or ``"<= x"``."""
    op, _, bound = goal.partition(" ")
    if op == ">=":
        return value >= float(bound)
    if op == "<=":
        return value <= float(bound)
    raise BenchError(f"goal {goal!r} is not '>= x' or '<= x'")


def say(line: str) -> None:
    """A progress line on stderr (stdout stays the table or the JSON)."""
    print(line, file=sys.stderr, flush=True)


async def drop_federation(redis: Any, name: str) -> None:
    """Delete every Redis key of federation ``name`` (a benchmark's own, at its end)."""
    from services.store import keys

    # Braces are literal in Redis glob patterns: this matches exactly this federation's keys.
    doomed = [key async for key in redis.scan_iter(match=keys.prefix(name) + "*")]
    if doomed:
        await redis.delete(*doomed)
    await redis.srem(keys.FEDERATIONS, name)


def save_with_plot(
    name: str, result: dict[str, Any], out: str | Path | None, plot: Callable[[dict[str, Any], Path], Path]
) -> Path:
    """Write the JSON, draw the PNG next to it (``result["plot"]``), write the JSON again with its path."""
    target = write_result(name, result, out)
    result["plot"] = str(plot(result, target.with_suffix(".png")))
    write_result(name, result, target)
    return target


def register_benchmark(
    subparsers: Any,
    name: str,
    summary: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], dict[str, Any]],
    table: Callable[[dict[str, Any]], str],
) -> None:
    """``pfi bench <name>``: parse, ``run``, print ``table(result)`` (or the JSON with ``--json``)."""

    def command(args: argparse.Namespace) -> int:
        result = run(args)
        print(json.dumps(result, indent=2, default=str) if args.json else table(result))
        return 0

    parser = subparsers.add_parser(name, help=summary)
    add_arguments(parser)
    parser.set_defaults(func=command)
