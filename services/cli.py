"""The services' command line: ``python -m services.cli`` (stack, federations, clients, aggregator, serve).

The full ``pfi`` entry point is :mod:`cli.main` (above both sides: it adds the edge SDK's and the
harnesses' commands); this module knows only the services' groups and never imports the SDK.

Each group lives next to its component as a module exposing ``register(subparsers)``; the module adds
its parser and sets ``func`` (``argparse.Namespace -> int``) on it. Errors derived from
:class:`~schemas.errors.PFIError` print one clear line and exit with status 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any

from schemas.errors import PFIError

# Modules that contribute sub-commands, in help order. Missing ones are skipped so the CLI keeps
# working while a component is being built.
COMMAND_MODULES = (
    "services.stack.commands",
    "services.federation.commands",
    "services.identity.commands",
    "services.aggregator.commands",
    "services.personalization.commands",
)


def import_optional(name: str) -> Any | None:
    """The module, or None when it (not one of its imports) does not exist."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is not None and name.startswith(err.name):
            return None
        raise


def new_parser() -> tuple[argparse.ArgumentParser, Any]:
    """The top-level parser and its sub-command group."""
    parser = argparse.ArgumentParser(prog="pfi", description="Personalized federated intelligence")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser, parser.add_subparsers(dest="command", metavar="COMMAND")


def build_parser() -> argparse.ArgumentParser:
    parser, sub = new_parser()
    for name in COMMAND_MODULES:
        module = import_optional(name)
        if module is not None:
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse ``argv``, set up logging and run the chosen command (PFIError: one line, status 1)."""
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
