"""``pfi stack up | down | status [--json]``."""

from __future__ import annotations

import argparse
import json
import sys
import time

from services.settings import PFISettings
from services.stack import manager
from services.stack.components import StackStatus


def _echo(line: str) -> None:
    print(line, flush=True)


def _print_status(status: StackStatus) -> None:
    for comp in (status.kafka, status.redis):
        state = "up" if comp.up else "DOWN"
        where = "external" if comp.external else (f"pid {comp.pid}" if comp.pid else "no process")
        line = f"{comp.name:6} {state:5} {comp.address}  ({where})"
        if comp.log is not None:
            line += f"  log {comp.log}"
        if comp.error:
            line += f"  [{comp.error}]"
        print(line)


def _up(args: argparse.Namespace) -> int:
    settings = PFISettings()
    start = time.monotonic()
    status = manager.up(settings, echo=_echo, topics=not args.no_topics, timeout_s=args.timeout)
    _print_status(status)
    print(f"stack: ready in {time.monotonic() - start:.1f}s")
    return 0 if status.up else 1


def _down(args: argparse.Namespace) -> int:
    manager.down(PFISettings(), echo=_echo, wipe=args.wipe)
    return 0


def _status(args: argparse.Namespace) -> int:
    status = manager.status(PFISettings())
    if args.json:
        json.dump(status.to_dict(), sys.stdout, indent=2)
        print()
    else:
        _print_status(status)
    return 0 if status.up else 1


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "stack",
        help="local Kafka (KRaft) + Redis: up, down, status",
        description="Run a real Apache Kafka broker and Redis server on 127.0.0.1 under $PFI_HOME/stack. "
        "PFI_KAFKA_BOOTSTRAP_SERVERS / PFI_REDIS_URL point at existing services instead.",
    )
    sub = parser.add_subparsers(dest="stack_command", metavar="ACTION", required=True)

    up = sub.add_parser("up", help="start (idempotent), wait until healthy, create the default topics")
    up.add_argument(
        "--timeout", type=float, default=None, help="seconds (default: PFI_STACK_START_TIMEOUT_S)"
    )
    up.add_argument("--no-topics", action="store_true", help="do not create the default topics")
    up.set_defaults(func=_up)

    down = sub.add_parser("down", help="stop the local services (SIGTERM, then SIGKILL)")
    down.add_argument("--wipe", action="store_true", help="also delete Kafka and Redis data")
    down.set_defaults(func=_down)

    status = sub.add_parser("status", help="is each service up? exit status 1 when not")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_status)
