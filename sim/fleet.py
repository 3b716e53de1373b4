"""A fleet of virtual edge agents in one process (load tests, benchmarks): ``pfi edge simulate``.

A harness, not a device: it acts as the devices AND as the ingest. It registers its fleet's keys in
the federation's client registry (:class:`services.identity.registry.ClientRegistry`, as an operator
would), reads the spec and global adapter from the version store, and produces the (signed, chunks
signed too) updates through :class:`services.ingest.producer.UpdateProducer` with the ``ingest`` Kafka
principal, so the aggregator verifies them exactly like uploads that came through the HTTPS route.

Memory: ONE frozen base model and ONE :class:`~clients.training.AdapterTrainer` serve every virtual
client; per client there is only its personal adapter (in memory, or on disk with ``state_dir``), its
key and a reference to its user's text. Training runs on a single worker thread (the trainer serializes
anyway), so the event loop stays free for Kafka and Redis.

This is the simulator on the wall clock (:class:`~sim.clock.WallClock`); :mod:`sim.virtual` runs the
same device model (:mod:`sim.devices`) on a virtual clock. Heterogeneity, per virtual client, from
seeded RNGs (:class:`~sim.devices.Device`):

* **compute speed**: a multiplier ``m ~ lognormal(0, sigma)``; a round "takes" ``max(1, m) x
  measured training time``: the extra is slept (simulated slowness: the trainer is free for others meanwhile);
* **availability**: before each round the client is offline with probability ``dropout`` and comes
  back after an exponential pause (mean ``offline_s``);
* **network delay**: a uniform ``[0, network_delay_s]`` sleep before fetching and before sending.

A semaphore (``max_active``) lets only a few clients fetch the global adapter and wait for the trainer
at once, so what they train on is fresh when their turn comes. The run stops after ``duration_s`` or
once ``updates`` rounds were started successfully (their updates are sent, or flushed at the end).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from clients.agent import AgentOptions, EdgeAgent, SpecMismatchError
from clients.data import UserData, load_users
from clients.outbox import Outbox, OutboxFull, OutboxPublisher
from clients.personal import DiskPersonalStore, MemoryPersonalStore, PersonalStore
from clients.progress import Progress
from clients.settings import EdgeSettings
from clients.training import AdapterTrainer, TrainConfig
from schemas.errors import ConfigError, PFIError
from schemas.signing import generate_key
from services.identity.registry import ClientRegistry
from services.ingest.producer import UpdateProducer
from services.settings import PFISettings
from services.stack.processes import peak_rss_bytes
from sim.clock import WallClock
from sim.devices import Device, train_seed
from sim.source import VersionStoreSource

log = logging.getLogger("pfi.edge.fleet")


@dataclass(frozen=True)
class SimulationConfig:
    federation: str
    data: Path
    clients: int
    duration_s: float | None = None
    updates: int | None = None
    speed_sigma: float = 0.5
    dropout: float = 0.0
    offline_s: float = 1.0
    network_delay_s: float = 0.02
    base_model: str | None = None  # None: the federation's; anything else must be the federation's
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=5, seq_len=64))
    options: AgentOptions = field(default_factory=AgentOptions)
    seed: int = 0
    max_active: int = 2
    state_dir: Path | None = None  # None: personal adapters in memory, outbox in a temporary directory
    progress: bool = True
    flush_timeout_s: float = 30.0
    client_prefix: str = "sim"
    min_chars: int = 0
    heldout_fraction: float = 0.1
    max_failures: int | None = None  # consecutive failed rounds that end the run; None: max(20, 2 x clients)

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ConfigError("--clients must be >= 1")
        if self.duration_s is None and self.updates is None:
            raise ConfigError("give --duration SECONDS or --updates M")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ConfigError("--duration must be > 0")
        if self.updates is not None and self.updates < 1:
            raise ConfigError("--updates must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("--dropout must be in [0, 1)")
        if self.speed_sigma < 0 or self.network_delay_s < 0 or self.offline_s < 0:
            raise ConfigError("speed sigma, network delay and offline time must be >= 0")
        if self.max_active < 1:
            raise ConfigError("max_active must be >= 1")


@dataclass
class SimulationSummary:
    federation: str
    clients: int
    users: int
    published: int = 0
    failed: int = 0
    queued: int = 0
    rounds: int = 0
    dropped: int = 0
    duration_s: float = 0.0
    setup_s: float = 0.0
    updates_per_s: float = 0.0
    mean_train_seconds: float = 0.0
    mean_round_seconds: float = 0.0
    mean_loss_before: float | None = None
    mean_loss_after: float | None = None
    bytes_sent: int = 0
    start_version: int | None = None
    end_version: int | None = None
    peak_rss_bytes: int = 0
    speed_sigma: float = 0.0
    dropout: float = 0.0
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


async def fleet_keys(
    federation: str, client_ids: list[str], settings: PFISettings, redis: Redis
) -> dict[str, bytes]:
    """Per-client signing keys, registered in ``federation``'s client registry (one transaction for the
    new ones). An active registered key is reused (an aggregator's cached copy stays valid); otherwise a
    random one is registered, as an operator would (``pfi clients add``)."""
    registry = ClientRegistry(redis)
    existing = {r.client_id: r.key for r in await registry.list(federation) if r.active}
    keys: dict[str, bytes] = {}
    new: dict[str, bytes] = {}
    for client in client_ids:
        key = existing.get(client)
        if key is None:
            key = generate_key()
            new[client] = key
        keys[client] = key
    await registry.register_many(federation, new, via="sim")
    return keys


def _load_splits(cfg: SimulationConfig) -> dict[str, UserData]:
    """Every user with training text, split into train / held-out (deterministic per user)."""
    texts = load_users(cfg.data, min_chars=cfg.min_chars)
    splits: dict[str, UserData] = {}
    for user in sorted(texts):
        split = UserData.from_text(user, texts[user], heldout_fraction=cfg.heldout_fraction)
        if split.train_text.strip():
            splits[user] = split
    return splits


@dataclass
class _Client:
    agent: EdgeAgent
    data: UserData
    device: Device
    rounds: int = 0


class _Fleet:
    def __init__(self, cfg: SimulationConfig, summary: SimulationSummary, publisher: OutboxPublisher) -> None:
        self.cfg = cfg
        self.summary = summary
        self.publisher = publisher
        self.stop = asyncio.Event()
        self.clock = WallClock(self.stop)
        self.slot = asyncio.Semaphore(cfg.max_active)
        self.claimed = 0
        self.train_seconds: list[float] = []
        self.round_seconds: list[float] = []
        self.loss_before: list[float] = []
        self.loss_after: list[float] = []
        self.fatal: BaseException | None = None
        self.consecutive_failures = 0
        self.max_failures = cfg.max_failures if cfg.max_failures is not None else max(20, 2 * cfg.clients)

    def claim(self) -> bool:
        if self.cfg.updates is not None and self.claimed >= self.cfg.updates:
            return False
        self.claimed += 1
        return True

    def error(self, err: BaseException) -> None:
        self.summary.failed += 1
        self.consecutive_failures += 1
        text = f"{type(err).__name__}: {err}"
        if len(self.summary.errors) < 5 and text not in self.summary.errors:
            self.summary.errors.append(text)
        if self.consecutive_failures >= self.max_failures and self.fatal is None:
            self.fatal = PFIError(
                f"{self.consecutive_failures} rounds in a row failed; stopping the simulation "
                f"(first errors: {'; '.join(self.summary.errors[:2]) or type(err).__name__})"
            )
            self.stop.set()

    async def run_client(self, client: _Client) -> None:
        cfg, clock, device = self.cfg, self.clock, client.device

        async def pause(train_s: float) -> None:
            await clock.sleep(device.slowdown(train_s) + device.network_delay(cfg.network_delay_s))

        await clock.sleep(device.network_delay(cfg.network_delay_s))
        while not self.stop.is_set():
            offline = device.offline(cfg.dropout, cfg.offline_s)
            if offline is not None:
                self.summary.dropped += 1
                await clock.sleep(offline)
                continue
            if not self.claim():
                return
            started = clock.now()
            train = replace(cfg.train, seed=train_seed(cfg.seed, client.rounds))
            try:
                await clock.sleep(device.network_delay(cfg.network_delay_s))
                result = await client.agent.run_round(client.data, train, train_slot=self.slot, pause=pause)
            except SpecMismatchError as err:
                self.claimed -= 1
                self.error(err)
                self.fatal = err
                self.stop.set()
                return
            except OutboxFull as err:
                self.claimed -= 1
                self.error(err)
                await clock.sleep(max(self.publisher.backing_off(), 1.0))
                continue
            except (PFIError, OSError) as err:
                self.claimed -= 1
                self.error(err)
                await clock.sleep(1.0)
                continue
            except Exception as err:  # a bug or a library error: count it, keep the fleet going
                log.exception("virtual client %s: round failed", client.agent.client_id)
                self.claimed -= 1
                self.error(err)
                await clock.sleep(1.0)
                continue
            client.rounds += 1
            self.consecutive_failures = 0
            self.summary.rounds += 1
            self.train_seconds.append(result.train_seconds)
            self.round_seconds.append(clock.now() - started)
            self.loss_before.append(result.loss_before)
            self.loss_after.append(result.loss_after)
            self.summary.bytes_sent += result.message_bytes

    def done(self) -> bool:
        return self.cfg.updates is not None and self.publisher.sent_total >= self.cfg.updates


async def simulate(
    cfg: SimulationConfig,
    settings: PFISettings | None = None,
    edge: EdgeSettings | None = None,
    *,
    redis: Redis | None = None,
) -> SimulationSummary:
    """Run the fleet; see the module doc. Raises :class:`SpecMismatchError` / :class:`ConfigError` for
    a run that cannot start (or a federation whose spec changed under it)."""
    from modeling.base import load_base_model

    settings = settings or PFISettings()
    edge = edge or EdgeSettings()
    setup_started = time.perf_counter()
    own_redis = redis is None
    client = redis if redis is not None else Redis.from_url(settings.redis())
    stack = contextlib.AsyncExitStack()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pfi-train")
    sender = UpdateProducer(settings, principal="ingest", client_id="pfi-sim-fleet")
    try:
        source = VersionStoreSource(client)
        spec = await source.spec(cfg.federation)
        model_id = cfg.base_model or spec.base_model
        if model_id != spec.base_model:
            raise SpecMismatchError(
                f"federation {cfg.federation!r} trains {spec.base_model!r}, not {model_id!r}; refusing to "
                "simulate agents on another base model"
            )
        splits = await asyncio.to_thread(_load_splits, cfg)
        base = await asyncio.to_thread(load_base_model, model_id)
        trainer = AdapterTrainer(base, spec)
        start_version = (await source.latest(cfg.federation)).version
        if not splits:
            raise ConfigError(f"no user in {cfg.data} has training text")
        users = sorted(splits)
        client_ids = [
            f"{cfg.client_prefix}-{i:05d}-{users[i % len(users)]}"[:128] for i in range(cfg.clients)
        ]
        keys = await fleet_keys(cfg.federation, client_ids, settings, client)

        if cfg.state_dir is not None:
            root = cfg.state_dir
            personal: PersonalStore = DiskPersonalStore(root / "clients")
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pfi-fleet-")))
            personal = MemoryPersonalStore()
        outbox = Outbox(root / "outbox", max_bytes=edge.outbox_max_bytes, max_items=edge.outbox_max_items)
        publisher = OutboxPublisher(
            outbox,
            sender,
            send_timeout_s=edge.send_timeout_s,
            retry_initial_s=edge.retry_initial_s,
            retry_max_s=edge.retry_max_s,
        )
        summary = SimulationSummary(
            federation=cfg.federation,
            clients=cfg.clients,
            users=min(len(users), cfg.clients),
            speed_sigma=cfg.speed_sigma,
            dropout=cfg.dropout,
            start_version=start_version,
        )
        fleet = _Fleet(cfg, summary, publisher)
        clients: list[_Client] = []
        for i, client_id in enumerate(client_ids):
            split = splits[users[i % len(users)]]
            device = Device.build(cfg.seed, i, cfg.speed_sigma)
            agent = EdgeAgent(
                cfg.federation,
                client_id,
                keys[client_id],
                source,
                trainer,
                outbox,
                sender,
                None,
                cfg.options,
                executor=executor,
                personal_store=personal,
                publisher=publisher,
                edge_settings=edge,
            )
            data = UserData(client_id, split.train_text, split.heldout_text)  # text shared, id per client
            clients.append(_Client(agent, data, device))
        summary.setup_s = time.perf_counter() - setup_started

        total = float(cfg.updates) if cfg.updates is not None else cfg.duration_s
        unit = "updates" if cfg.updates is not None else "s"
        progress = Progress(
            desc=f"simulate {cfg.clients} clients", total=total, unit=unit, enabled=cfg.progress
        )
        clock = fleet.clock
        clock.start()
        tasks = [asyncio.create_task(fleet.run_client(c)) for c in clients]

        def report() -> None:
            elapsed = clock.now()
            position = float(publisher.sent_total) if cfg.updates is not None else min(elapsed, total or 0)
            progress.update(
                position,
                published=publisher.sent_total,
                failed=summary.failed,
                queued=len(outbox),
                rate=f"{publisher.sent_total / max(elapsed, 1e-9):.1f}/s",
            )

        try:
            while not fleet.stop.is_set():
                if all(t.done() for t in tasks) or fleet.done():
                    break
                if cfg.duration_s is not None and clock.now() >= cfg.duration_s:
                    break
                report()
                await asyncio.sleep(0.25)
            fleet.stop.set()
            # Rounds in progress finish (and queue or send their update); a stuck one is cancelled.
            grace = edge.send_timeout_s + 60.0
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            leftover = await publisher.flush(cfg.flush_timeout_s)
            if leftover.remaining:
                log.warning("%d update(s) left queued: %s", leftover.remaining, leftover.error)
            report()
        finally:
            progress.close()
            for task in tasks:
                task.cancel()
        if fleet.fatal is not None:
            raise fleet.fatal

        summary.duration_s = clock.now()
        summary.published = publisher.sent_total
        summary.queued = len(outbox)
        summary.updates_per_s = summary.published / summary.duration_s if summary.duration_s > 0 else 0.0
        if fleet.train_seconds:
            summary.mean_train_seconds = statistics.fmean(fleet.train_seconds)
            summary.mean_round_seconds = statistics.fmean(fleet.round_seconds)
            summary.mean_loss_before = statistics.fmean(fleet.loss_before)
            summary.mean_loss_after = statistics.fmean(fleet.loss_after)
        with contextlib.suppress(PFIError):
            summary.end_version = (await source.latest(cfg.federation)).version
        summary.peak_rss_bytes = peak_rss_bytes()
        return summary
    finally:
        await sender.close()
        executor.shutdown(wait=True, cancel_futures=True)
        await stack.aclose()
        if own_redis:
            await client.aclose()
