"""``pfi edge simulate``: many virtual agents in one process (see :mod:`sim.fleet`).

Registered under ``pfi edge`` by :mod:`cli.main` (``register_edge``): the simulator is a harness that
acts as the devices and the ingest, so it needs the server's Redis and Kafka (``PFI_*``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from clients.commands import (
    add_training_flags,
    options_from_args,
    quiet_library_warnings,
    train_cfg_from_args,
)
from clients.settings import EdgeSettings
from schemas.errors import ConfigError
from services.settings import PFISettings


def register_edge(edge_sub: Any) -> None:
    """Add ``simulate`` to the ``pfi edge`` group (``clients.commands.register``'s return value)."""
    sim = edge_sub.add_parser("simulate", help="many virtual agents in one process (one shared base model)")
    sim.add_argument("--federation", required=True)
    sim.add_argument("--data", required=True, type=Path)
    sim.add_argument("--clients", required=True, type=int)
    stop = sim.add_mutually_exclusive_group(required=True)
    stop.add_argument("--duration", type=float, help="seconds to run")
    stop.add_argument("--updates", type=int, help="stop after M published updates")
    sim.add_argument("--speed-dist", default="lognormal:0.5", help="lognormal:SIGMA or constant")
    sim.add_argument("--dropout", type=float, default=0.1, help="probability a client is offline per round")
    sim.add_argument("--offline", type=float, default=1.0, help="mean seconds offline after a dropout")
    sim.add_argument("--network-delay", type=float, default=0.02, help="max seconds of delay per hop")
    sim.add_argument("--max-active", type=int, default=2, help="clients fetching/training at once")
    sim.add_argument("--min-chars", type=int, default=0, help="skip users with less text")
    add_training_flags(sim)
    sim.set_defaults(func=_simulate_command)


def _simulate_command(args: argparse.Namespace) -> int:
    from sim.devices import parse_speed_dist
    from sim.fleet import SimulationConfig, simulate

    quiet_library_warnings()
    settings, edge = PFISettings(), EdgeSettings()
    options = options_from_args(args, edge)
    cfg = SimulationConfig(
        federation=args.federation,
        data=args.data,
        clients=args.clients,
        duration_s=args.duration,
        updates=args.updates,
        speed_sigma=parse_speed_dist(args.speed_dist),
        dropout=args.dropout,
        offline_s=args.offline,
        network_delay_s=args.network_delay,
        base_model=args.base_model,
        train=train_cfg_from_args(args, edge, args.seed if args.seed is not None else 0),
        options=options,
        seed=args.seed if args.seed is not None else 0,
        max_active=args.max_active,
        state_dir=args.state_dir,
        progress=not args.no_progress,
        flush_timeout_s=args.flush_timeout if args.flush_timeout is not None else edge.flush_timeout_s,
        min_chars=args.min_chars,
    )

    async def run() -> dict[str, Any]:
        from redis.exceptions import RedisError

        try:
            return (await simulate(cfg, settings, edge)).to_dict()
        except RedisError as err:
            raise ConfigError(f"cannot reach Redis at {settings.redis()}: {err}") from None

    summary = asyncio.run(run())
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"{summary['clients']} clients ({summary['users']} users): {summary['published']} published, "
            f"{summary['failed']} failed, {summary['queued']} queued, {summary['dropped']} dropouts in "
            f"{summary['duration_s']:.1f}s ({summary['updates_per_s']:.2f} updates/s); global "
            f"v{summary['start_version']} -> v{summary['end_version']}; peak RSS "
            f"{summary['peak_rss_bytes'] / 2**20:.0f} MiB"
        )
        for error in summary["errors"]:
            print(f"  error: {error}", file=sys.stderr)
    return 0 if summary["published"] > 0 or summary["failed"] == 0 else 1
