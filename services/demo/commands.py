"""``pfi demo``."""

from __future__ import annotations

import argparse
import asyncio


def _run(args: argparse.Namespace) -> int:
    from services.demo.smoke import print_summary, run_smoke

    status = asyncio.run(run_smoke(clients=args.clients, updates=args.updates, seed=args.seed))
    print_summary(status)
    ok = status["updates_aggregated_total"] == status["updates_accepted_total"] and status["version"]
    return 0 if ok else 1


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("demo", help="run the local federation demo (end-to-end smoke for now)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--updates", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=_run)
