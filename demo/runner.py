"""``pfi demo``: the phases, their progress and timings, and the clean-up.

1. local stack (started if needed) and this run's own topics (``demo-<label>.*``);
2. the ``pfi aggregator`` and ``pfi serve`` processes (free ports, a generated token secret and client
   signing master key, logs in the report directory), waited for on ``/readyz``;
3. two federations on the same base model and LoRA config: async FedBuff (K = ``async_buffer``,
   polynomial staleness weight) and sync FedAvg (K = users, constant weight); v0 pinned in both;
4. the sync run, then the async run until it reaches the sync run's best loss (or its update cap)
   (:mod:`sim.virtual`, the fleet simulator on its virtual clock);
5. the local-only baseline; 6. each device's personalization step against the final global
   (:mod:`demo.personal_phase`); 7. scoring every variant through the service, retrieval included
   (:mod:`demo.eval_phase`); 8. the report (:mod:`demo.report`).

Whatever happens (an error, Ctrl-C, SIGTERM), the processes it started are stopped, its topics are
deleted and the local stack is stopped if the demo started it (unless ``keep_stack``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import shlex
import shutil
import signal
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from clients.data import tokenize
from clients.http_source import HttpGlobalSource
from clients.training import AdapterTrainer
from demo import eval_phase, evaluation, personal_phase, plots, report
from demo.config import DemoConfig
from demo.document import build_document
from demo.runs import federation_specs, load_average, version_meta
from modeling.base import load_base_model
from modeling.lora import StateDict, init_adapter
from schemas.errors import PFIError
from services.federation.admin import create_with_state
from services.personalization.auth import TokenSigner
from services.personalization.harness import FederationTokens
from services.settings import PFISettings
from services.stack import manager
from services.stack.processes import ServiceProcess, child_env, free_port, pfi_command
from services.stack.topics import delete_topics, ensure_topics
from services.store.versions import VersionStore
from sim.devices import DeviceModel
from sim.results import speedup
from sim.virtual import FleetRunner

Echo = Callable[[str], None]


def say(line: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {line}", flush=True)


class Phases:
    """Named phases with timing and a start/end line each."""

    def __init__(self, echo: Echo) -> None:
        self.echo = echo
        self.timings: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str, what: str) -> Iterator[None]:
        self.echo(f"── {name}: {what}")
        began = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - began
        self.echo(f"   {name} done in {self.timings[name]:.1f}s")

    def total(self) -> float:
        return time.perf_counter() - self.started


class Demo:
    def __init__(self, cfg: DemoConfig, *, echo: Echo = say, command: str | None = None) -> None:
        self.cfg = cfg
        self.echo = echo
        self.command = command or "pfi demo"
        self.out = cfg.out_dir()
        self.phases = Phases(echo)
        self.base_settings = PFISettings()
        self.settings = self.base_settings.model_copy(update={"topic_prefix": cfg.run_name})
        self.token_secret = secrets.token_hex(32)
        self.signer = TokenSigner(self.token_secret.encode())
        self.processes: list[ServiceProcess] = []
        self.stack_started = False
        self.topics_created = False

    # -- clean-up --------------------------------------------------------------------------------
    async def cleanup(self) -> None:
        for process in reversed(self.processes):
            if process.alive():
                self.echo(f"stopping {process.name} (pid {process.pid})")
            status = await asyncio.to_thread(process.stop)
            if status not in (None, 0, -signal.SIGTERM):
                self.echo(f"{process.name} exited with status {status}; log {process.log_path}")
        self.processes.clear()
        if self.topics_created and not self.cfg.keep_stack:
            names = [self.settings.updates_topic, self.settings.dlq_topic, self.settings.versions_topic]
            try:
                await delete_topics(self.settings, names)
            except Exception as err:  # clean-up only
                self.echo(f"could not delete the demo topics {names}: {err}")
        if self.stack_started and not self.cfg.keep_stack:
            self.echo("stopping the local stack (the demo started it; --keep-stack keeps it)")
            await manager.down_async(self.base_settings, echo=lambda line: self.echo(f"  {line}"))

    # -- phases ----------------------------------------------------------------------------------
    async def start_stack(self) -> None:
        status = await manager.status_async(self.base_settings)
        if status.up:
            self.echo("local stack already running: it stays up afterwards")
        else:
            down = [c for c in (status.kafka, status.redis) if not c.up]
            # Stopped at the end (even after a failed start) only when the demo starts the whole stack.
            self.stack_started = len(down) == 2 and not any(c.external for c in down)
            await manager.up_async(self.base_settings, echo=lambda line: self.echo(f"  {line}"), topics=False)
        await ensure_topics(self.settings)
        self.topics_created = True
        self.echo(f"topics {self.settings.topic_prefix}.* ready")

    async def start_services(self, log_dir: Path) -> tuple[ServiceProcess, ServiceProcess]:
        agg_port, serve_port = free_port(), free_port()
        aggregator = ServiceProcess(
            "aggregator",
            pfi_command("aggregator"),
            child_env(
                self.settings,
                PFI_AGGREGATOR_PORT=str(agg_port),
                PFI_AGGREGATOR_GROUP_ID=f"pfi-aggregator-{self.cfg.run_name}",
                PFI_AGGREGATOR_PROGRESS_INTERVAL_S="0.5",
                PFI_AGGREGATOR_POLL_TIMEOUT_MS="50",
            ),
            log_dir / "aggregator.log",
            f"http://127.0.0.1:{agg_port}",
        )
        serve = ServiceProcess(
            "serve",
            pfi_command("serve"),
            child_env(
                self.settings,
                PFI_SERVE_PORT=str(serve_port),
                PFI_SERVE_TOKEN_SECRET=self.token_secret,
                PFI_SERVE_REQUEST_TIMEOUT_S="600",
                # The demo itself is idle while the service scores: let it use every core.
                PFI_SERVE_TORCH_THREADS=str(os.cpu_count() or 1),
            ),
            log_dir / "serve.log",
            f"http://127.0.0.1:{serve_port}",
        )
        for process in (aggregator, serve):
            self.processes.append(process.start())
            self.echo(f"{process.name}: pid {process.pid}, {process.url}, log {process.log_path}")
        for process in (aggregator, serve):
            await process.wait_ready(self.cfg.ready_timeout_s)
            self.echo(f"{process.name}: ready")
        return aggregator, serve

    # -- the whole run ---------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        log_dir = self.out / "logs"
        started_at = datetime.now(UTC).isoformat(timespec="seconds")
        load_start = load_average()
        self.echo(f"PFI demo {cfg.run_name}: {cfg.base_model}, up to {cfg.users} users, report in {self.out}")
        ph = self.phases.phase
        try:
            with ph("stack", "local Kafka + Redis and this run's topics"):
                await self.start_stack()
            redis = Redis.from_url(self.settings.redis())
            try:
                return await self._run(redis, log_dir, started_at, load_start)
            finally:
                await redis.aclose()
        finally:
            await self.cleanup()

    async def _run(self, redis: Redis, log_dir: Path, started_at: str, load_start: str) -> dict[str, Any]:
        cfg = self.cfg
        ph = self.phases.phase
        store = VersionStore(redis)
        with ph("services", "pfi aggregator + pfi serve as separate processes"):
            aggregator, serve = await self.start_services(log_dir)
        with ph("data", f"the {cfg.users} users with the most text in {cfg.data}"):
            users = await asyncio.to_thread(
                evaluation.select_users,
                cfg.data,
                cfg.users,
                cfg.heldout_fraction,
                cfg.split,
            )
            self.echo(
                f"{len(users)} users: "
                + ", ".join(f"{u} ({len(d.train_text):,})" for u, d in sorted(users.items()))
            )
        async_spec, sync_spec = federation_specs(cfg, len(users))
        with ph("model", f"loading {cfg.base_model} (once: v0 of both federations and the edge agents)"):
            base = await asyncio.to_thread(load_base_model, cfg.base_model)
        with ph("federations", f"{async_spec.name} (FedBuff K={cfg.async_buffer}) and {sync_spec.name}"):
            for spec in (async_spec, sync_spec):
                # v0 from the model loaded above (before the trainer wraps it), as create_federation does
                state = await asyncio.to_thread(init_adapter, spec, base.model)
                await create_with_state(store, spec, state)
                await store.pin(spec.name, 0)
                self.echo(f"{spec.name}: v0 created and pinned (K={spec.aggregation.buffer_size})")
        with ph("trainer", "the edge agents' trainer and the held-out chunks"):
            trainer = AdapterTrainer(base, async_spec)
            tokenizer = base.tokenizer
            chunks = {
                u: evaluation.heldout_chunks(tokenizer, d.heldout_text, cfg.eval_tokens, cfg.eval_chunks)
                for u, d in users.items()
            }
            curve_texts = [c for u in sorted(chunks) for c in chunks[u][: cfg.curve_chunks]]
            train_tokens = {u: len(tokenize(tokenizer, d.train_text)) for u, d in users.items()}
        devices = DeviceModel.build(sorted(users), cfg)
        speeds = sorted(devices.speeds.values())
        self.echo(
            "device speed factors: "
            + ", ".join(f"{u} {devices.speeds[u]:.2f}" for u in sorted(users))
            + f" (slowest/median {speeds[-1] / statistics.median(speeds):.2f}x)"
        )
        source = HttpGlobalSource(serve.url, "per-federation", timeout_s=120.0)
        source.client.auth = FederationTokens(self.signer, "demo-fleet")  # a token per federation
        workdir = Path(tempfile.mkdtemp(prefix="pfi-demo-outbox-"))
        fleet = FleetRunner(
            cfg, self.settings, trainer, source, store, aggregator, users, curve_texts, devices, workdir,
            lambda line: self.echo(f"  {line}"),
            device_token=lambda client_id, fed: self.signer.issue(client_id, federation=fed, role="device"),
        )  # fmt: skip
        try:
            total = cfg.rounds * len(users)
            with ph("sync", f"sync FedAvg: {cfg.rounds} rounds x {len(users)} agents (virtual clock)"):
                sync_run = await fleet.run_sync(sync_spec)
            best = min(p.nll for p in sync_run.points)
            target = best if best < sync_run.points[0].nll else None
            cap = math.ceil(cfg.async_budget * total)
            with ph("async", f"async FedBuff until the sync run's best NLL ({best:.4f}) or {cap} updates"):
                async_run = await fleet.run_async(async_spec, max_updates=cap, target=target)
            zero = (await source.adapter(sync_spec.name, 0)).state
            final = (await source.adapter(sync_spec.name, sync_run.final_version)).state
            local: dict[str, StateDict] = {}
            with ph("local", "local-only baseline: each user's personal adapter trained alone"):
                for i, user in enumerate(sorted(users), 1):
                    rounds = sync_run.rounds.get(user, 0)
                    local[user] = await evaluation.train_local_only(
                        trainer, zero, users[user], rounds, cfg, fleet.executor
                    )
                    self.echo(f"  local-only {i}/{len(users)} {user}: {rounds} rounds x {cfg.steps} steps")
            with ph(
                "personalize", f"each device fits its personal adapter against v{sync_run.final_version}"
            ):
                personal = await personal_phase.personalize_users(
                    trainer, final, sync_run.personal, users, cfg, fleet.executor, self.echo
                )
        finally:
            fleet.close()
            await source.aclose()
            shutil.rmtree(workdir, ignore_errors=True)

        adapters = {
            u: eval_phase.Adapters(
                local=local[u],
                personal=personal[u],
                trained_against=sync_run.final_version,
                async_personal=async_run.personal.get(u),
                async_trained_against=async_run.trained_against.get(u, 0),
            )
            for u in users
        }
        finals = eval_phase.Finals(sync_run.final_version, async_run.final_version)
        with ph("evaluation", f"scoring {len(evaluation.VARIANTS) + 2} variants x {len(users)} users"):
            per_user, served = await eval_phase.evaluate_users(
                serve, self.signer, (sync_spec.name, async_spec.name), users, chunks, adapters, finals,
                cfg, self.echo,
            )  # fmt: skip
        with ph("report", f"writing {self.out}"):
            summary = evaluation.summarize(per_user)
            av = speedup(async_run, sync_run)
            versions = {
                "async": await version_meta(store, async_spec.name, async_run.final_version),
                "sync": await version_meta(store, sync_spec.name, sync_run.final_version),
            }
            rows = [
                eval_phase.user_row(
                    u, users[u], per_user[u], served[u], personal[u],
                    {"train_tokens": train_tokens[u], "heldout_chunks": len(chunks[u]),
                     "speed": devices.speeds[u], "rounds": sync_run.rounds.get(u, 0),
                     "async_rounds": async_run.rounds.get(u, 0)},
                )
                for u in sorted(per_user)
            ]  # fmt: skip
            doc = build_document(
                self,
                summary, av, async_run, sync_run, versions, users, rows, devices, train_tokens,
                chunks, curve_texts, started_at, load_start, aggregator, serve, async_spec, sync_spec,
            )  # fmt: skip
            doc["plots"] = await asyncio.to_thread(plots.write_plots, doc, self.out)
            report.write_json(doc, self.out)
            report.write_markdown(doc, self.out)
        doc["timings"] = {**self.phases.timings, "total": self.phases.total()}
        report.write_json(doc, self.out)
        report.write_markdown(doc, self.out)
        return doc


def _quiet_libraries() -> None:
    """Keep the demo's output to its own progress lines: no GGUF conversion bars, no deprecation noise."""
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
    warnings.filterwarnings("ignore", message=r".*Could not find a config file.*", category=UserWarning)
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def run_demo(cfg: DemoConfig, *, echo: Echo = say, command: str | None = None) -> dict[str, Any]:
    """Run the demo (blocking); SIGTERM is handled like Ctrl-C (clean-up, then an error)."""
    _quiet_libraries()

    async def main() -> dict[str, Any]:
        demo = Demo(cfg, echo=echo, command=command)
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if task is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            doc = await demo.run()
        except asyncio.CancelledError:
            raise PFIError("interrupted; the demo's processes were stopped") from None
        print(report.summary_table(doc), flush=True)
        return doc

    return asyncio.run(main())


def command_line(argv: list[str]) -> str:
    return "pfi demo" + ("" if not argv else " " + shlex.join(argv))
