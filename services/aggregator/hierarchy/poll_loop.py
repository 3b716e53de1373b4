"""The poll loop a leaf and a root share: poll until stopped, and after a failed cycle count it, log it,
recover (drop the in-memory state and seek back to what is committed) and back off. No single failure
(Kafka, Redis, a bug) ends the process: what was not committed is replayed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import Counter


def backoff_s(failures: int) -> float:
    """Seconds to wait after ``failures`` failed cycles in a row: 1, 2, 4 ... 30."""
    return min(0.5 * 2.0 ** min(failures, 6), 30.0)


async def poll_until_stopped(
    role: str,
    stopping: asyncio.Event,
    poll_once: Callable[[], Awaitable[None]],
    recover: Callable[[], Awaitable[None]],
    failures_total: Counter,
    log: logging.Logger,
) -> None:
    """Run ``poll_once`` until ``stopping`` is set. ``recover`` must not raise (it logs what fails: the
    next cycle tries again)."""
    failures = 0
    while not stopping.is_set():
        try:
            await poll_once()
            failures = 0
        except Exception:
            failures += 1
            failures_total.inc()
            log.exception("%s poll cycle failed (%d in a row): replaying from the commits", role, failures)
            await recover()
            await asyncio.sleep(backoff_s(failures))
