"""The simulator's clocks: one interface, two kinds of time.

* :class:`WallClock`: real seconds. ``sleep`` really waits (cut short when the run stops), so simulated
  slowness and network delay take real time while the trainer serves other clients
  (``pfi edge simulate``, ``pfi bench edge-scale``).
* :class:`VirtualClock`: discrete events in virtual seconds. Nothing waits: a device's time is an event
  at ``now + duration`` on a queue, and :meth:`VirtualClock.next` jumps to the earliest one (ties in the
  order they were scheduled). Real computation between events costs no virtual time (the demo and
  ``pfi bench async-sync``: dozens of devices on two cores).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the run started (real or virtual)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Let ``seconds`` pass on this clock."""
        ...


class WallClock:
    """Real time since :meth:`start` (or construction); :meth:`sleep` ends early once ``stop`` is set."""

    def __init__(self, stop: asyncio.Event | None = None) -> None:
        self.stop = stop if stop is not None else asyncio.Event()
        self.started = time.perf_counter()

    def start(self) -> None:
        self.started = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.started

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)


class VirtualClock(Generic[T]):
    """Virtual time driven by an event queue of ``(time, item)``."""

    def __init__(self) -> None:
        self._now = 0.0
        self._queue: list[tuple[float, int, T]] = []
        self._seq = 0

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        self._now += max(0.0, seconds)

    def at(self, when: float, item: T) -> None:
        """Schedule ``item`` at virtual time ``when``."""
        heapq.heappush(self._queue, (when, self._seq, item))
        self._seq += 1

    def next(self) -> tuple[float, T]:
        """The earliest scheduled event; the clock moves to its time."""
        when, _, item = heapq.heappop(self._queue)
        self._now = max(self._now, when)
        return when, item

    def __len__(self) -> int:
        return len(self._queue)
