"""The fleet on the virtual clock: async FedBuff vs sync FedAvg on the same simulated devices (the
demo's and ``pfi bench async-sync``'s runs). The wall-clock fleet is :mod:`sim.fleet`; both use the
device model of :mod:`sim.devices` and the clocks of :mod:`sim.clock`.

Two CPU cores cannot run dozens of devices at once, so device *time* is simulated while everything else
is real: every update is trained for real (:class:`~clients.agent.EdgeAgent` on the shared
:class:`~clients.training.AdapterTrainer`), clipped, encoded, signed, queued in the agent's outbox and
uploaded with a device token to the real ``pfi serve`` process's ingest route, which produces it to
Kafka for the real ``pfi aggregator`` process, which commits versions to Redis; agents download the
global adapter from ``pfi serve`` too. The fleet's keys are registered in each federation's client
registry, as an operator would; device tokens are minted with the serve process's token secret.

Device model (identical for both runs, :class:`~sim.devices.DeviceModel`): client ``i`` has a speed
factor ``m_i ~ lognormal(0, sigma)`` (seeded); one update of client ``i`` in its round ``r`` takes
``m_i * steps * step_seconds + U(0, network_s)`` virtual seconds (the delay drawn from an RNG seeded by
(seed, user, r), so both runs see the same delays).

* **sync** (FedAvg rounds, K = users), run first: every client trains from the same global; the round
  lasts ``max_i`` of the clients' device times; the aggregator makes one version per round. It sends
  ``rounds x users`` updates.
* **async** (FedBuff, K updates per version, polynomial staleness weight): an event queue of client
  completions (:class:`~sim.clock.VirtualClock`). A client starting at virtual time ``t`` downloads the
  global adapter that exists at ``t``: before any client starts, every update published at a virtual
  time ``<= t`` has been aggregated (when a version is due, the run waits until the aggregator has
  committed it). Updates are published in completion order; a client starts its next round when its
  update is out. The run stops at the first version whose held-out loss is at or below ``target`` (the
  sync run's best), or after ``max_updates`` updates. A round's result depends only on what the client
  had at its start (the global version then, its personal adapter, its data and seed), so the real
  training runs when its completion event is processed, against the *pinned* version the client
  downloaded at its start (:class:`PinnedSource`): rounds still in flight when the run stops cost no
  compute.

Both runs start every client from the same v0 with a fresh personal adapter, the same data and seed, so
their first rounds are bit-identical: :class:`FirstRoundCache` trains each once and lets the sync run
reuse the result (keyed by user, config and a digest of the global adapter; nothing else is shared).

After every new version the global adapter is evaluated in-process on a pooled held-out set (a few
chunks per user): this is the loss-vs-time curve (:mod:`sim.results`).
"""

from __future__ import annotations

import asyncio
import functools
import math
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

import httpx

from clients.agent import AgentOptions, EdgeAgent, RoundResult
from clients.data import UserData
from clients.http_source import HttpGlobalSource
from clients.outbox import Outbox, OutboxPublisher
from clients.personal import MemoryPersonalStore
from clients.source import GlobalAdapter
from clients.training import AdapterTrainer, TrainConfig
from clients.uploader import HttpUpdateSender
from modeling.lora import StateDict
from schemas.errors import PFIError
from schemas.events import FederationSpec
from schemas.signing import derive_client_key
from services.federation.admin import federation_status
from services.identity import ClientRegistry
from services.settings import PFISettings
from services.stack.processes import ServiceProcess
from services.store.versions import VersionStore
from sim.clock import VirtualClock
from sim.devices import DeviceModel, seeded_rng, train_seed
from sim.pinned import FirstRoundCache, PinnedSource
from sim.results import CurvePoint, RunResult, UpdateRecord

Echo = Callable[[str], None]
#: ``(client_id, federation) -> device token`` (minted with the serve process's token secret).
DeviceTokens = Callable[[str, str], str]


class RunnerConfig(Protocol):
    """What :class:`FleetRunner` reads of its configuration (the demo's ``DemoConfig`` has it all)."""

    @property
    def run_name(self) -> str: ...
    @property
    def seed(self) -> int: ...
    @property
    def rounds(self) -> int: ...
    @property
    def steps(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def seq_len(self) -> int: ...
    @property
    def lr(self) -> float: ...
    @property
    def personal_lr(self) -> float: ...
    @property
    def eval_tokens(self) -> int: ...
    @property
    def settle_timeout_s(self) -> float: ...


@dataclass
class _Client:
    user: str
    agent: EdgeAgent
    data: UserData
    source: PinnedSource
    rounds: int = 0
    pending: RoundResult | None = None
    start_s: float = 0.0


class FleetRunner:
    """Runs one federation's training on the fleet (see the module doc)."""

    def __init__(
        self,
        cfg: RunnerConfig,
        settings: PFISettings,
        trainer: AdapterTrainer,
        source: HttpGlobalSource,
        store: VersionStore,
        aggregator: ServiceProcess,
        users: dict[str, UserData],
        curve_texts: list[str],
        devices: DeviceModel,
        workdir: Path,
        echo: Echo,
        *,
        device_token: DeviceTokens,
    ) -> None:
        self.cfg = cfg
        self.settings = settings
        self.trainer = trainer
        self.source = source
        self.store = store
        self.aggregator = aggregator
        self.users = users
        self.curve_texts = curve_texts
        self.devices = devices
        self.workdir = workdir
        self.echo = echo
        self.device_token = device_token
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pfi-demo-train")
        self.first_rounds = FirstRoundCache(trainer)
        self._last_line = time.monotonic()
        self.master = secrets.token_bytes(32)  # the fleet's keys: derived here, registered per federation
        self.eval_seq_len = cfg.eval_tokens  # one block per chunk, equal lengths: batched

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    # -- pieces ----------------------------------------------------------------------------------
    def train_config(self, user: str, round_index: int) -> TrainConfig:
        return TrainConfig(
            steps=self.cfg.steps,
            batch_size=self.cfg.batch_size,
            seq_len=self.cfg.seq_len,
            lr=self.cfg.lr,
            personal_lr=self.cfg.personal_lr,
            seed=train_seed(self.cfg.seed, round_index),
            eval_sequences=2,
        )

    async def _register_keys(self, federation: str) -> None:
        """Register the fleet's keys in the federation's client registry, as an operator would."""
        ids = [f"{self.cfg.run_name}-{user}"[:128] for user in sorted(self.users)]
        keys = {c: derive_client_key(self.master, c) for c in ids}
        await ClientRegistry(self.store.redis).register_many(federation, keys, via="demo")

    def _sender(self, http: httpx.AsyncClient, federation: str, client_id: str) -> HttpUpdateSender:
        """The device's uploader: the serve process's ingest route, with its own device token."""

        async def token() -> str:
            return self.device_token(client_id, federation)

        return HttpUpdateSender(self.source.base_url, token, client=http)

    def _clients(
        self, federation: str, http: httpx.AsyncClient, personal: MemoryPersonalStore
    ) -> list[_Client]:
        clients = []
        cache: dict[tuple[str, int], GlobalAdapter] = {}
        for user in sorted(self.users):
            source = PinnedSource(self.source, cache)
            client_id = f"{self.cfg.run_name}-{user}"[:128]
            sender = self._sender(http, federation, client_id)
            outbox = Outbox(self.workdir / federation / user)
            agent = EdgeAgent(
                federation,
                user,
                derive_client_key(self.master, client_id),
                source,
                cast(AdapterTrainer, self.first_rounds),  # the same calls, first rounds remembered
                outbox,
                sender,
                None,
                # The demo measures quality itself, through the service; the agents' own per-round
                # quality report (monitoring) would cost three more evaluations per round.
                AgentOptions(drain=False, quality_sequences=0),
                client_id=client_id,
                executor=self.executor,
                personal_store=personal,
                publisher=OutboxPublisher(outbox, sender),
            )
            clients.append(_Client(user, agent, self.users[user], source))
        return clients

    @staticmethod
    def _start(client: _Client, version: int, start_s: float) -> None:
        """``client`` starts a round at virtual ``start_s`` and downloads global ``version``."""
        client.source.version = version
        client.start_s = start_s

    async def _train(self, client: _Client, result: RunResult) -> None:
        """Train the round ``client`` started (against its pinned version); the update is queued."""
        started = time.perf_counter()
        train = self.train_config(client.user, client.rounds)
        client.pending = await client.agent.run_round(client.data, train)
        result.train_s += time.perf_counter() - started
        client.rounds += 1
        if time.monotonic() - self._last_line >= 20.0:  # a sign of life between versions
            done = client.pending
            self.echo(
                f"{result.mode:>5} trained {client.user} round {client.rounds} from v{client.source.version} "
                f"(loss {done.loss_before:.3f} -> {done.loss_after:.3f}); {len(result.updates)} updates out"
            )
            self._last_line = time.monotonic()

    async def _publish(self, client: _Client, at_s: float, result: RunResult) -> None:
        pending = client.pending
        if pending is None:
            raise PFIError(f"client {client.user} has no update to publish")
        drained = await client.agent.publisher.drain(force=True)
        if drained.remaining or drained.sent != 1:
            raise PFIError(f"could not publish the update of {client.user}: {drained.error or 'not sent'}")
        client.pending = None
        result.updates.append(
            UpdateRecord(
                user=client.user,
                round=client.rounds - 1,
                base_version=pending.base_version,
                start_s=client.start_s,
                publish_s=at_s,
                train_s=pending.train_seconds,
                loss_before=pending.loss_before,
                loss_after=pending.loss_after,
                update_id=pending.update_id,
            )
        )
        result.trained_against[client.user] = pending.base_version

    async def _await_version(self, federation: str, version: int, result: RunResult) -> None:
        started = time.perf_counter()
        deadline = time.monotonic() + self.cfg.settle_timeout_s
        while True:
            latest = await self.store.latest(federation)
            if latest is not None and latest >= version:
                break
            self.aggregator.check()
            if time.monotonic() > deadline:
                status = await federation_status(self.store, federation)
                raise PFIError(
                    f"the aggregator did not publish {federation} v{version} within "
                    f"{self.cfg.settle_timeout_s:.0f}s (latest v{latest}, accepted "
                    f"{status['updates_accepted_total']}, rejected {status['updates_rejected_total']}); "
                    f"log {self.aggregator.log_path}"
                )
            await asyncio.sleep(0.05)
        result.wait_s += time.perf_counter() - started

    async def evaluate_global(self, state: StateDict | None) -> tuple[float, float]:
        adapters = {} if state is None else {"shared": state}
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(
            self.executor,
            functools.partial(
                self.trainer.evaluate, adapters, self.curve_texts, seq_len=self.eval_seq_len, batch_size=8
            ),
        )
        return out.mean_nll, out.token_accuracy

    async def _point(
        self, federation: str, version: int, virtual_s: float, began: float, result: RunResult
    ) -> CurvePoint:
        started = time.perf_counter()
        adapter = await self._adapter(federation, version)
        nll, acc = await self.evaluate_global(adapter)
        result.eval_s += time.perf_counter() - started
        point = CurvePoint(version, virtual_s, time.perf_counter() - began, len(result.updates), nll, acc)
        result.points.append(point)
        return point

    async def _adapter(self, federation: str, version: int) -> StateDict:
        adapter = await self.source.adapter(federation, version)
        if adapter.version != version:
            raise PFIError(f"{federation}: expected global v{version}, the service has v{adapter.version}")
        return adapter.state

    def _say(self, result: RunResult, point: CurvePoint, total: int) -> None:
        self._last_line = time.monotonic()
        self.echo(
            f"{result.mode:>5} v{point.version:<3d} virtual {point.virtual_s:8.1f}s  held-out NLL "
            f"{point.nll:.4f}  updates {point.updates}/{total}  wall {point.wall_s:6.0f}s"
        )

    def _finish(self, result: RunResult, personal: MemoryPersonalStore, spec: FederationSpec) -> None:
        for user in self.users:
            state = personal.load(user, spec.fingerprint())
            if state is not None:
                result.personal[user] = state

    # -- the two runs ----------------------------------------------------------------------------
    async def run_async(self, spec: FederationSpec, *, max_updates: int, target: float | None) -> RunResult:
        """Until a version reaches ``target`` (None: never) or ``max_updates`` updates are out."""
        fed = spec.name
        buffer = spec.aggregation.buffer_size
        total = max_updates
        result = RunResult("async", fed, buffer)
        hits = self.first_rounds.hits
        personal = MemoryPersonalStore()
        began = time.perf_counter()
        async with httpx.AsyncClient(timeout=120.0) as http:
            await self._register_keys(fed)
            clients = self._clients(fed, http, personal)
            self._say(result, await self._point(fed, 0, 0.0, began, result), total)
            clock: VirtualClock[int] = VirtualClock()  # events: a client's update is done (its index)
            for index, client in enumerate(clients):
                self._start(client, 0, clock.now())
                clock.at(self.devices.duration(client.user, 0), index)
            version, unversioned = 0, 0
            while len(result.updates) < total:
                now, index = clock.next()
                client = clients[index]
                await self._train(client, result)
                await self._publish(client, now, result)
                unversioned += 1
                if unversioned >= buffer:
                    version, unversioned = version + 1, 0
                    await self._await_version(fed, version, result)
                    point = await self._point(fed, version, now, began, result)
                    self._say(result, point, total)
                    if target is not None and point.nll <= target + 1e-9:
                        self.echo(f"async reached the sync run's best held-out NLL {target:.4f}: stopping")
                        break
                self._start(client, version, now)
                clock.at(now + self.devices.duration(client.user, client.rounds), index)
                pinned = {c.source.version for c in clients}
                for key in [k for k in clients[0].source.cache if k[1] not in pinned]:
                    del clients[0].source.cache[key]
        result.rounds = {c.user: c.rounds for c in clients}
        result.wall_s = time.perf_counter() - began
        result.reused_first_rounds = self.first_rounds.hits - hits
        self._finish(result, personal, spec)
        return result

    async def run_sync(
        self, spec: FederationSpec, *, cohort: int | None = None, mode: str = "sync"
    ) -> RunResult:
        """FedAvg rounds. ``cohort`` None: every client in every round (``cfg.rounds`` rounds); else
        ``cohort`` clients sampled per round (seeded) for as many rounds as send the same number of
        updates; a round lasts as long as its slowest sampled client. ``spec``'s K must be the cohort."""
        fed = spec.name
        size = len(self.users) if cohort is None else cohort
        if spec.aggregation.buffer_size != size or not 1 <= size <= len(self.users):
            raise PFIError(f"{fed}: a sync round of {size} client(s) needs K={size}")
        result = RunResult(mode, fed, spec.aggregation.buffer_size)
        hits = self.first_rounds.hits
        personal = MemoryPersonalStore()
        total = self.cfg.rounds * len(self.users)
        rounds = math.ceil(total / size)
        began = time.perf_counter()
        clock: VirtualClock[int] = VirtualClock()  # events: a sampled client's update is done
        async with httpx.AsyncClient(timeout=120.0) as http:
            await self._register_keys(fed)
            clients = self._clients(fed, http, personal)
            self._say(result, await self._point(fed, 0, 0.0, began, result), rounds * size)
            for round_index in range(rounds):
                picked = list(range(len(clients)))
                if cohort is not None:
                    picked = sorted(seeded_rng("cohort", self.cfg.seed, round_index).sample(picked, cohort))
                start = clock.now()
                for index in picked:
                    client = clients[index]
                    self._start(client, round_index, start)
                    await self._train(client, result)
                    clock.at(start + self.devices.duration(client.user, client.rounds - 1), index)
                while len(clock):  # in completion order (ties: client order); the round ends with the last
                    finished, index = clock.next()
                    await self._publish(clients[index], finished, result)
                await self._await_version(fed, round_index + 1, result)
                point = await self._point(fed, round_index + 1, clock.now(), began, result)
                self._say(result, point, rounds * size)
        result.rounds = {c.user: c.rounds for c in clients}
        result.wall_s = time.perf_counter() - began
        result.reused_first_rounds = self.first_rounds.hits - hits
        self._finish(result, personal, spec)
        return result
