"""The poll loop both hierarchy roles share: a failed cycle is counted, logged and recovered from, and
the loop ends only when asked to."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import CollectorRegistry, Counter

from services.aggregator.hierarchy.poll_loop import backoff_s, poll_until_stopped


def test_backoff_doubles_and_is_capped() -> None:
    waits = [backoff_s(n) for n in range(1, 10)]
    assert waits[:4] == [1.0, 2.0, 4.0, 8.0]
    assert max(waits) == 30.0
    assert waits == sorted(waits)


def test_a_failing_cycle_is_counted_recovered_from_and_the_loop_goes_on() -> None:
    stopping = asyncio.Event()
    calls: list[str] = []
    failures = Counter("t_failures", "x", registry=CollectorRegistry())

    async def poll_once() -> None:
        calls.append("poll")
        if len(calls) == 1:
            raise RuntimeError("broker went away")
        stopping.set()

    async def recover() -> None:
        calls.append("recover")

    asyncio.run(poll_until_stopped("leaf", stopping, poll_once, recover, failures, logging.getLogger("t")))
    assert calls == ["poll", "recover", "poll"]
    assert failures._value.get() == 1


def test_a_stopped_loop_does_not_poll() -> None:
    stopping = asyncio.Event()
    stopping.set()

    async def poll_once() -> None:
        pytest.fail("polled after stop")

    async def recover() -> None:
        pytest.fail("recovered after stop")

    failures = Counter("t_failures2", "x", registry=CollectorRegistry())
    asyncio.run(poll_until_stopped("root", stopping, poll_once, recover, failures, logging.getLogger("t")))
