"""The ``pfi`` command line: one sub-command group per component.

Each group lives next to its component as a module exposing ``register(subparsers)``; the module adds
its parser and sets ``func`` (``argparse.Namespace -> int``) on it. Errors derived from
:class:`~schemas.errors.PFIError` print one clear line and exit with status 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from schemas.errors import PFIError

# Modules that contribute sub-commands, in help order. Missing ones are skipped so the CLI keeps
# working while a component is being built.
COMMAND_MODULES = (
    "services.stack.commands",
    "services.federation.commands",
    "services.aggregator.commands",
    "clients.commands",
    "services.personalization.commands",
    "services.demo.commands",
    "bench.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pfi", description="Personalized federated intelligence")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is not None and name.startswith(err.name):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        for noisy in ("aiokafka", "kafka", "httpx", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except PFIError as err:
        print(f"pfi {args.command}: error: {err.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
