"""``pfi``: the services' command groups (:mod:`services.cli`), the edge SDK's (``pfi edge run |
flush``), the harnesses' (``pfi edge simulate``, ``pfi demo``, ``pfi bench``). ``python -m cli.main`` is
the same as ``pfi``."""

from __future__ import annotations

import argparse

from services.cli import COMMAND_MODULES, import_optional, new_parser, run

#: Groups of the harnesses, after the services' and the edge SDK's (absent ones are skipped: the
#: service image holds neither the demo nor the benchmarks).
EXTRA_MODULES = ("demo.commands", "bench.commands")


def build_parser() -> argparse.ArgumentParser:
    from clients import commands as edge_commands

    sim_commands = import_optional("sim.commands")  # a harness: not in the service image
    parser, sub = new_parser()
    for name in COMMAND_MODULES:
        module = import_optional(name)
        if module is not None:
            module.register(sub)
            if name == "services.aggregator.commands":  # help order: edge after the aggregator
                edge = edge_commands.register(sub)
                if sim_commands is not None:
                    sim_commands.register_edge(edge)
    for name in EXTRA_MODULES:
        module = import_optional(name)
        if module is not None:
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
