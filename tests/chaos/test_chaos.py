"""Short chaos run (inside ``make test``; ``pfi bench chaos`` is the long one): on a private Kafka + Redis
(temporary home, free ports, Redis AOF on; the shared stack is never touched)

* 3 ``kill -9`` of the aggregator at seeded random points while updates stream in;
* a Kafka broker restart mid-stream (SIGTERM, down 2 s; the producer retries with the same update ids);
* a Redis ``kill -9`` and restart mid-stream (AOF on);
* a ``kill -9`` of ``pfi serve`` during a loop of HTTP requests, restarted at once.

Afterwards every update the producer got a Kafka ack for is in exactly one version (lost == 0,
double_counted == 0, no valid update dead-lettered), every version is intact, and the service answers
200 again with the latest version within a generous correctness bound (not a performance assertion).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from bench.chaos.scenarios import ScenarioResult, kill9_aggregator, restart_component
from bench.chaos.serving import kill9_serve
from bench.chaos.stack import ChaosStack
from tests.conftest import run_in_thread

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

SEED = 20261124
SERVING_BOUND_S = 60.0
log = logging.getLogger("pfi.tests.chaos")


@pytest.fixture(scope="module")
def chaos() -> Iterator[ChaosStack]:
    """A private stack for this module, wiped at the end."""
    stack = run_in_thread(ChaosStack.start(echo=log.info))
    try:
        yield stack
    finally:
        run_in_thread(stack.stop())


def check(result: ScenarioResult) -> None:
    print("\n".join(result.notes))
    print(result.to_dict())
    audit = result.audit
    assert result.drained, "the pipeline did not aggregate every acknowledged update in time"
    assert audit.acked > 0
    assert audit.lost == 0, audit.problems
    assert audit.rejected_valid == 0, audit.problems
    assert audit.double_counted == 0, audit.problems
    assert audit.unknown == 0, audit.problems
    assert audit.corrupt_versions == 0, audit.problems
    assert audit.versions >= 2
    assert set(audit.rejected) <= {"duplicate"}, audit.rejected  # re-sent ids may land twice


async def test_kill9_aggregator(chaos: ChaosStack) -> None:
    result = await kill9_aggregator(chaos, trials=3, seed=SEED, echo=log.info)
    assert result.trials == 3
    check(result)


async def test_kafka_restart_mid_stream(chaos: ChaosStack) -> None:
    result = await restart_component(chaos, "kafka", hard=False, seed=SEED + 1, echo=log.info)
    check(result)
    assert result.recovery_s, "no version was committed after the broker came back"


async def test_redis_kill9_with_aof(chaos: ChaosStack) -> None:
    result = await restart_component(chaos, "redis", hard=True, seed=SEED + 2, echo=log.info)
    check(result)
    assert result.recovery_s, "no version was committed after Redis came back"
    # It waits for Redis and replays instead of exiting (the supervisor restarts only exited ones).
    assert result.aggregator_exits == 0, "the aggregator exited during the Redis outage"


async def test_serve_kill9_during_requests(chaos: ChaosStack) -> None:
    result = await kill9_serve(chaos, trials=1, seed=SEED + 3, echo=log.info)
    print("\n".join(result.notes))
    print(result.to_dict())
    assert result.trials == 1
    assert max(result.recovery_s) <= SERVING_BOUND_S, result.recovery_s
    assert result.stale_after_recovery == 0, "the restarted service did not serve the latest version"
    assert result.unexpected_status == {}, result.unexpected_status
