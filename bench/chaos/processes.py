"""Real ``pfi aggregator`` OS processes for crash, rebalance and chaos runs (moved here from
``tests/support/processes.py`` so that ``pfi bench chaos`` can use them too).

* :class:`AggregatorProcess`: one ``pfi aggregator`` subprocess, a
  :class:`~services.stack.processes.ServiceProcess` (the process harness shared with the stack, the demo
  and the benchmarks) configured only through the environment (``PFI_*`` from a :class:`PFISettings`,
  ``PFI_AGGREGATOR_*`` overrides), stdout and stderr captured to a log file; ``kill9`` / ``terminate``
  (from the harness), ``wait_assigned`` / ``metrics`` (here).
* :func:`aggregator_fleet`: an async context manager that starts processes on demand and, however the
  caller ends, kills every one still alive and prints the tail of each log.
* :func:`names_on_partitions`: federation names whose Kafka key lands on chosen partitions (murmur2,
  as the default partitioner). :class:`Timeline`: timestamped notes.

Waits that time out raise :class:`ChaosError` (a ``BenchError`` that is also an ``AssertionError``, so
tests report it as a failed check).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from aiokafka.partitioner import murmur2

from bench.common import BenchError
from services.settings import PFISettings
from services.stack.processes import REPO_ROOT, ServiceProcess, child_env, pfi_command


class ChaosError(BenchError, AssertionError):
    """A chaos run could not proceed (a process did not start, log, or stop in time)."""


ROOT = REPO_ROOT

#: Fast failure detection for tests: the broker's minimum session timeout is 6 s by default.
FAST_GROUP = {
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 1000,
    "poll_timeout_ms": 100,
    "progress_interval_s": 0.5,
    "shutdown_timeout_s": 20,
}

_ASSIGNED = re.compile(r"assigned partitions \[([0-9, ]*)\]")
_PORT = re.compile(r"metrics on :(\d+)")


def settings_env(settings: PFISettings, **aggregator: Any) -> dict[str, str]:
    """The environment of a ``pfi aggregator`` subprocess that sees exactly ``settings``."""
    extra = {f"PFI_AGGREGATOR_{k.upper()}": str(v) for k, v in aggregator.items() if v is not None}
    return child_env(settings, **extra)


def aggregator_command() -> list[str]:
    return pfi_command("aggregator")


class AggregatorProcess(ServiceProcess):
    """One ``pfi aggregator`` (or other ``pfi``) subprocess (:class:`ServiceProcess`: own session, output
    to ``log_path``, ``kill9`` / ``terminate``); here what a chaos run reads from its log."""

    def __init__(
        self, name: str, env: dict[str, str], log_path: Path, *, command: list[str] | None = None
    ) -> None:
        super().__init__(name, command if command is not None else aggregator_command(), env, log_path)

    def failure(self, message: str) -> Exception:
        return ChaosError(message)

    # -- observing ----------------------------------------------------------------------------
    def assignments(self) -> list[list[int]]:
        """Every partition assignment the process logged so far, oldest first."""
        return [
            [int(p) for p in m.group(1).split(",") if p.strip()] for m in _ASSIGNED.finditer(self.log_text())
        ]

    def metrics_port(self) -> int | None:
        match = _PORT.search(self.log_text())
        return int(match.group(1)) if match else None

    async def wait_log(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:  # noqa: ASYNC109
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log_text())
            if match:
                return match
            if not self.alive():
                raise ChaosError(f"{self.name} exited ({self.returncode()}) before logging {pattern!r}")
            if time.monotonic() > deadline:
                raise ChaosError(f"{self.name} did not log {pattern!r} within {timeout:.0f}s")
            await asyncio.sleep(0.1)

    async def wait_assigned(
        self,
        timeout: float = 60.0,  # noqa: ASYNC109
        *,
        after: int = 0,
        non_empty: bool = True,
    ) -> list[int]:
        """Wait for the ``after``-th (0-based) or a later logged assignment (non-empty unless told)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.assignments()[after:]
            for assignment in found:
                if assignment or not non_empty:
                    return assignment
            if not self.alive():
                raise ChaosError(f"{self.name} exited ({self.returncode()}) before an assignment")
            if time.monotonic() > deadline:
                raise ChaosError(f"{self.name}: no partition assignment within {timeout:.0f}s")
            await asyncio.sleep(0.1)

    async def wait_partitions(self, count: int, timeout: float = 60.0) -> list[int]:  # noqa: ASYNC109
        """Wait until the latest logged assignment holds ``count`` partitions; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.assignments()
            if found and len(found[-1]) == count:
                return found[-1]
            if not self.alive():
                raise ChaosError(f"{self.name} exited ({self.returncode()}) before owning {count}")
            if time.monotonic() > deadline:
                raise ChaosError(f"{self.name}: assignments {found}, none of {count} within {timeout:.0f}s")
            await asyncio.sleep(0.1)

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as ``{"name{labels}": value}`` (unlabelled: just the name)."""
        port = self.metrics_port()
        assert port is not None, f"{self.name} has not logged its metrics port"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
        return out


class AggregatorFleet:
    """Starts aggregator processes of one consumer group; remembers all of them for cleanup."""

    def __init__(self, settings: PFISettings, log_dir: Path, group_id: str, **aggregator: Any) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.group_id = group_id
        self.aggregator = {**FAST_GROUP, **aggregator}
        self.processes: list[AggregatorProcess] = []

    def start(self, name: str | None = None, **aggregator: Any) -> AggregatorProcess:
        name = name or f"agg-{len(self.processes)}"
        env = settings_env(
            self.settings,
            group_id=self.group_id,
            port=0,
            instance_id=name,
            **{**self.aggregator, **aggregator},
        )
        process = AggregatorProcess(name, env, self.log_dir / f"{name}.log")
        self.processes.append(process)
        return process.start()

    def kill_all(self) -> None:
        for process in self.processes:
            process.kill9()

    def report(self, tail_lines: int = 150) -> str:
        return "\n".join(p.describe(tail_lines) for p in self.processes)


@contextlib.asynccontextmanager
async def aggregator_fleet(
    settings: PFISettings, log_dir: Path, group_id: str | None = None, **aggregator: Any
) -> AsyncIterator[AggregatorFleet]:
    """Yields a fleet; on exit every process still alive is SIGKILLed and every log tail printed."""
    await asyncio.to_thread(log_dir.mkdir, parents=True, exist_ok=True)
    fleet = AggregatorFleet(
        settings, log_dir, group_id or f"pfi-aggregator-{settings.topic_prefix}", **aggregator
    )
    try:
        yield fleet
    finally:
        fleet.kill_all()
        print(fleet.report())


# ------------------------------------------------------------------------------------- partitions


def partition_of(key: str, partitions: int) -> int:
    """The partition the default (murmur2) partitioner picks for ``key``."""
    return int(murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def names_on_partitions(targets: Iterable[int], partitions: int, prefix: str = "fed") -> list[str]:
    """One fresh federation name per entry of ``targets``, each hashing to that partition."""
    out: list[str] = []
    for target in targets:
        while True:
            name = f"{prefix}-{uuid.uuid4().hex[:8]}"
            if partition_of(name, partitions) == target:
                out.append(name)
                break
    return out


class Timeline:
    """Timestamped notes of a test, printed at the end (shown by pytest when the test fails)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(f"{time.monotonic() - self.started:6.1f}s {line}")

    def __str__(self) -> str:
        return "\n".join(self.lines)
