"""Chaos runs of the PFI pipeline on a private local stack: a producer-side ledger, the scenarios
(``kill -9`` of the aggregator, Kafka and Redis restarts, ``kill -9`` of ``pfi serve``) and the
exactly-once audit. ``pfi bench chaos`` is the long run; ``tests/chaos`` the short one."""

from __future__ import annotations

from typing import Any


def register(subparsers: Any) -> None:
    """``pfi bench chaos`` (imports the scenarios only when registered)."""
    from bench.chaos.command import register as _register

    _register(subparsers)
