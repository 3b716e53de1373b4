"""Chaos scenarios of the update pipeline (edge producer -> Kafka -> ``pfi aggregator`` -> Redis) on a
private :class:`~bench.chaos.stack.ChaosStack`. Each one streams signed updates from several clients
into fresh federations (fresh topics), disrupts something mid-stream, lets the pipeline drain and audits
the federations against the producer's ledger:

* :func:`kill9_aggregator`: ``kill -9`` of the aggregator process at seeded random points (some during
  start-up/replay, most while it consumes), a new process each time;
* :func:`restart_component`: a Kafka broker or Redis restart (``hard``: SIGKILL) while updates flow and an
  aggregator runs; an aggregator that dies of it is restarted, as a supervisor (Kubernetes) would.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from bench.chaos.audit import LedgerAudit, audit_ledger, dead_letter_records, wait_aggregated
from bench.chaos.ledger import ChaosClient, ChaosStream, Shapes, create_federations
from bench.chaos.processes import AggregatorFleet, AggregatorProcess, ChaosError, names_on_partitions
from bench.chaos.stack import ChaosStack
from schemas.events import FederationSpec
from services.settings import PFISettings
from services.store.versions import VersionStore

Echo = Callable[[str], None]

GAP_S = (0.5, 2.5)  # between two updates of one client
DRAIN_TIMEOUT_S = 150.0


@dataclass
class ScenarioResult:
    name: str
    audit: LedgerAudit = field(default_factory=LedgerAudit)
    ledger: dict[str, Any] = field(default_factory=dict)
    trials: int = 0
    aggregator_exits: int = 0  # aggregator processes that died without being killed by us
    drained: bool = False
    recovery_s: list[float] = field(default_factory=list)  # disruption over -> next version committed
    component_restart_s: list[float] = field(default_factory=list)  # new start -> component healthy
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def ok(self) -> bool:
        return self.drained and self.audit.ok()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ok": self.ok(),
            "trials": self.trials,
            "drained": self.drained,
            "aggregator_exits": self.aggregator_exits,
            "recovery_s": [round(x, 3) for x in self.recovery_s],
            "component_restart_s": [round(x, 3) for x in self.component_restart_s],
            "elapsed_s": round(self.elapsed_s, 2),
            **self.audit.to_dict(),
            "ledger": self.ledger,
            "notes": self.notes[-60:],
        }


@dataclass
class Pipeline:
    """Federations, clients, a running stream, and an aggregator fleet of one scenario."""

    settings: PFISettings
    store: VersionStore
    specs: list[FederationSpec]
    clients: list[ChaosClient]
    shapes: Shapes
    stream: ChaosStream
    fleet: AggregatorFleet
    result: ScenarioResult
    echo: Echo
    started: float = field(default_factory=time.monotonic)

    def note(self, line: str) -> None:
        stamped = f"{time.monotonic() - self.started:6.1f}s {line}"
        self.result.notes.append(stamped)
        self.echo(f"[{self.result.name}] {stamped}")

    async def heads(self) -> int:
        """Σ of the federations' heads (Redis may be down: -1)."""
        try:
            return sum([(await self.store.head(s.name)) or 0 for s in self.specs])
        except Exception:
            return -1

    async def next_version(self, after: int, timeout: float = 60.0) -> float | None:  # noqa: ASYNC109
        """Seconds until Σ heads exceeds ``after`` (None: not within ``timeout``)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if await self.heads() > after:
                return time.monotonic() - start
            await asyncio.sleep(0.1)
        return None

    async def drain(self, producing: asyncio.Task[None], final: AggregatorProcess | None) -> None:
        """Stop the stream, make sure one aggregator runs, wait until it aggregated every acked update,
        stop it gracefully and audit."""
        self.stream.stop.set()
        await asyncio.wait_for(producing, 300)
        self.result.ledger = self.stream.ledger.summary()
        self.note(f"stream done: {self.stream.ledger.summary()}")
        if final is None or not final.alive():
            final = self.fleet.start(f"{self.result.name}-final")
        self.note(f"{final.name} got {await final.wait_assigned(timeout=90)}")
        self.result.drained = await wait_aggregated(self.store, self.stream.ledger.acked, DRAIN_TIMEOUT_S)
        await asyncio.sleep(1.5)  # a few more progress intervals: nothing else may appear
        code = await final.terminate()
        dead = await dead_letter_records(self.settings)
        self.result.audit = await audit_ledger(self.store, self.stream.ledger.acked, dead)
        self.note(f"drained={self.result.drained}, {final.name} exited {code}; {len(dead)} dead letter(s)")


@contextlib.asynccontextmanager
async def pipeline(
    stack: ChaosStack,
    name: str,
    *,
    seed: int,
    echo: Echo,
    federations: int = 2,
    clients_per: int = 3,
    send_timeout_s: float = 20.0,
) -> AsyncIterator[Pipeline]:
    settings = await stack.scenario_settings(name)
    redis = Redis.from_url(settings.redis())
    store = VersionStore(redis)
    rng = random.Random(seed)
    shared = rng.randrange(settings.update_partitions)  # two federations share one partition
    names = names_on_partitions([shared] * federations, settings.update_partitions, prefix=name)
    specs, clients, shapes = await create_federations(store, redis, names, clients_per)
    result = ScenarioResult(name)
    fleet = AggregatorFleet(
        settings,
        stack.logs,
        f"pfi-aggregator-{settings.topic_prefix}",
        max_poll_interval_ms=60_000,
        worker_threads=1,
    )
    started = time.monotonic()
    try:
        stream = ChaosStream(settings, store, clients, shapes, seed=seed, send_timeout_s=send_timeout_s)
        async with stream:
            yield Pipeline(settings, store, specs, clients, shapes, stream, fleet, result, echo)
    finally:
        fleet.kill_all()
        result.aggregator_exits = sum(
            1 for p in fleet.processes if p.exit_signal is None and p.returncode() is not None
        )
        result.elapsed_s = time.monotonic() - started
        await redis.aclose()


async def kill9_aggregator(
    stack: ChaosStack, *, trials: int, seed: int, echo: Echo = print
) -> ScenarioResult:
    """``kill -9`` the aggregator ``trials`` times at seeded random points while updates stream in."""
    rng = random.Random(seed)
    async with pipeline(stack, "kill9", seed=seed, echo=echo) as p:
        producing = asyncio.create_task(p.stream.run(GAP_S))
        try:
            for trial in range(trials):
                process = p.fleet.start(f"kill9-{trial}")
                if rng.random() < 0.25:  # start-up, joining, seeking, replaying
                    delay, point = rng.uniform(0.5, 5.0), "after spawn"
                else:
                    try:
                        await process.wait_assigned(timeout=90)
                    except ChaosError as err:
                        p.note(f"{process.name}: {err}")
                    delay, point = rng.uniform(0.2, 3.0), "after assignment"
                await asyncio.sleep(delay)
                before = p.stream.ledger.total
                process.kill9()
                p.result.trials += 1
                p.note(f"trial {trial}: {process.name} killed {delay:.2f}s {point} ({before} acked so far)")
            await p.drain(producing, None)
        finally:
            await _cancel(producing)
    return p.result


async def restart_component(
    stack: ChaosStack,
    component: str,
    *,
    hard: bool,
    seed: int,
    echo: Echo = print,
    before_s: float = 6.0,
    downtime_s: float = 2.0,
    after_s: float = 8.0,
    send_timeout_s: float = 4.0,
) -> ScenarioResult:
    """Restart ``component`` ("kafka" or "redis") mid-stream; the aggregator must recover by itself (it
    is restarted only if it exits, and that is counted). A send not acknowledged within ``send_timeout_s``
    is abandoned by the producer and sent again with the same update id (it may land twice)."""
    name = f"{component}-{'kill9' if hard else 'restart'}"
    async with pipeline(stack, name, seed=seed, echo=echo, send_timeout_s=send_timeout_s) as p:
        producing = asyncio.create_task(p.stream.run(GAP_S))
        supervisor: asyncio.Task[None] | None = None
        try:
            current = [p.fleet.start(f"{name}-agg-0")]
            p.note(f"aggregator got {await current[0].wait_assigned(timeout=90)}")
            supervisor = asyncio.create_task(_supervise(p, current, name))
            await asyncio.sleep(before_s)
            acked, heads = p.stream.ledger.total, await p.heads()
            p.note(f"restarting {component} (hard={hard}); {acked} acked, heads {heads}")
            took = await stack.restart(component, hard=hard, downtime_s=downtime_s)
            p.result.component_restart_s.append(took)
            p.result.trials = 1
            heads = await p.heads()
            p.note(f"{component} healthy again after {took:.1f}s; heads {heads}")
            recovered = await p.next_version(heads, timeout=90)
            if recovered is not None:
                p.result.recovery_s.append(recovered)
            p.note("next version " + (f"after {recovered:.1f}s" if recovered is not None else "NOT in 90s"))
            await asyncio.sleep(after_s)
            supervisor.cancel()
            await _cancel(supervisor)
            await p.drain(producing, current[0])
        finally:
            if supervisor is not None:
                await _cancel(supervisor)
            await _cancel(producing)
    return p.result


async def _supervise(p: Pipeline, current: list[AggregatorProcess], name: str) -> None:
    """Restart the aggregator when it exits on its own (what a Deployment would do)."""
    while True:
        await asyncio.sleep(0.5)
        if not current[0].alive() and current[0].exit_signal is None:
            p.note(f"{current[0].name} exited by itself (rc {current[0].returncode()}); restarting it")
            current[0] = p.fleet.start(f"{name}-agg-{len(p.fleet.processes)}")


async def _cancel(task: asyncio.Task[Any]) -> None:
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
