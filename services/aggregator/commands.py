"""``pfi aggregator``: run the aggregator service until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from services.settings import AggregatorSettings, PFISettings


async def _serve(settings: PFISettings, agg: AggregatorSettings) -> None:
    from services.aggregator.service import Aggregator

    if agg.role != "single":  # issue 15: hierarchical aggregation (leaf or root)
        from services.aggregator.hierarchy.service import build

        aggregator: Any = build(settings, agg)
    else:
        aggregator = Aggregator(settings, agg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, aggregator.stopping.set)
    await aggregator.run()


def _run(args: argparse.Namespace) -> int:
    given = {"port": args.port, "group_id": args.group_id, "role": args.role}
    overrides = {k: v for k, v in given.items() if v is not None}
    agg = AggregatorSettings(**overrides)
    asyncio.run(_serve(PFISettings(), agg))
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "aggregator",
        help="run the staleness-aware aggregator service",
        description="Consume adapter updates from Kafka, validate, buffer (FedBuff) and commit versioned "
        "global adapters to Redis exactly once. Serves /healthz, /readyz and /metrics.",
    )
    parser.add_argument("--port", type=int, default=None, help="health/metrics port (PFI_AGGREGATOR_PORT)")
    parser.add_argument("--group-id", default=None, help="Kafka consumer group (PFI_AGGREGATOR_GROUP_ID)")
    parser.add_argument(
        "--role",
        choices=("single", "leaf", "root"),
        default=None,
        help="single (default): one aggregator per federation; leaf/root: hierarchical federations "
        "(PFI_AGGREGATOR_ROLE)",
    )
    parser.set_defaults(func=_run)
