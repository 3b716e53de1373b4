"""``pfi demo``: the phases, their progress and timings, and the clean-up.

1. local stack (started if needed) and this run's own topics (``demo-<label>.*``);
2. the ``pfi aggregator`` and ``pfi serve`` processes (free ports, a generated token secret and client
   signing master key, logs in the report directory), waited for on ``/readyz``;
3. two federations on the same base model and LoRA config: async FedBuff (K = ``async_buffer``,
   polynomial staleness weight) and sync FedAvg (K = users, constant weight); v0 pinned in both;
4. the sync run, then the async run until it reaches the sync run's best loss (or its update cap)
   (:mod:`sim.virtual`, the fleet simulator on its virtual clock);
5. the local-only baseline; 6. scoring the four variants through the service
   (:mod:`demo.evaluation`); 7. the report (:mod:`demo.report`).

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
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import torch
from redis.asyncio import Redis

from clients.data import tokenize
from clients.http_source import HttpGlobalSource
from clients.training import AdapterTrainer
from demo import evaluation, report
from demo.config import DemoConfig
from modeling.base import load_base_model
from modeling.lora import StateDict
from schemas.errors import PFIError
from schemas.events import AggregationSpec, FederationSpec, LoraSpec
from services.federation.admin import create_federation
from services.personalization.auth import TokenSigner
from services.personalization.harness import FederationTokens
from services.settings import PFISettings
from services.stack import manager
from services.stack.processes import ServiceProcess, child_env, free_port, pfi_command
from services.stack.topics import delete_topics, ensure_topics
from services.store.versions import VersionStore
from sim.devices import DeviceModel
from sim.results import RunResult, speedup
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


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def federation_specs(cfg: DemoConfig, users: int) -> tuple[FederationSpec, FederationSpec]:
    lora = LoraSpec(rank=cfg.rank, alpha=cfg.alpha, target_modules=cfg.target_modules)
    common: dict[str, Any] = {
        "flush_timeout_s": 86_400.0,  # versions only from full buffers: the virtual clock decides
        "max_staleness": 1_000_000,  # slow clients are discounted, never dropped
        "keep_versions": 1000,
    }
    name = cfg.run_name.lower()
    async_spec = FederationSpec(
        name=f"{name}-async",
        base_model=cfg.base_model,
        lora=lora,
        seed=cfg.seed,
        aggregation=AggregationSpec(
            buffer_size=cfg.async_buffer,
            staleness="polynomial",
            staleness_a=cfg.staleness_a,
            # The simulated fleet is trusted and a fast device may finish twice within K updates; the demo
            # expects a version every K updates, so it lifts the one-update-per-client-per-buffer limit.
            max_client_updates=cfg.async_buffer,
            **common,
        ),
    )
    sync_spec = FederationSpec(
        name=f"{name}-sync",
        base_model=cfg.base_model,
        lora=lora,
        seed=cfg.seed,
        aggregation=AggregationSpec(buffer_size=users, staleness="constant", **common),
    )
    return async_spec, sync_spec


async def _versions(store: VersionStore, fed: str, last: int) -> list[dict[str, Any]]:
    out = []
    for version in range(1, last + 1):
        meta = await store.get_meta(fed, version)
        if meta is None:
            continue
        out.append(
            {
                "version": version,
                "created_at": meta.created_at.isoformat(),
                "aggregation_seconds": meta.aggregation_seconds,
                "updates": [
                    {
                        "client_id": u.client_id,
                        "base_version": u.base_version,
                        "staleness": u.staleness,
                        "staleness_weight": u.staleness_weight,
                        "weight": u.weight,
                        "norm": u.norm,
                        "clipped": u.clipped,
                    }
                    for u in meta.updates
                ],
            }
        )
    return out


def _run_dict(run: RunResult, versions: list[dict[str, Any]]) -> dict[str, Any]:
    staleness = [u["staleness"] for v in versions for u in v["updates"]]
    return {
        **run.summary(),
        "curve": [p.__dict__ for p in run.points],
        "version_meta": versions,
        "rounds": run.rounds,
        "staleness": {
            "mean": statistics.fmean(staleness) if staleness else None,
            "max": max(staleness, default=0),
            "histogram": {str(k): staleness.count(k) for k in sorted(set(staleness))},
        },
        "update_records": [u.__dict__ for u in run.updates],
    }


def _fastest_share(run: RunResult, devices: DeviceModel) -> float:
    """Fraction of ``run``'s updates sent by the fastest quarter of the clients."""
    ranked = sorted(devices.speeds, key=lambda u: devices.speeds[u])
    fastest = set(ranked[: max(1, len(ranked) // 4)])
    return sum(1 for u in run.updates if u.user in fastest) / max(1, len(run.updates))


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
        load_start = _load()
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
                evaluation.select_users, cfg.data, cfg.users, cfg.heldout_fraction
            )
            self.echo(
                f"{len(users)} users: "
                + ", ".join(f"{u} ({len(d.train_text):,})" for u, d in sorted(users.items()))
            )
        async_spec, sync_spec = federation_specs(cfg, len(users))
        with ph("federations", f"{async_spec.name} (FedBuff K={cfg.async_buffer}) and {sync_spec.name}"):
            for spec in (async_spec, sync_spec):
                await create_federation(store, spec)
                await store.pin(spec.name, 0)
                self.echo(f"{spec.name}: v0 created and pinned (K={spec.aggregation.buffer_size})")
        with ph("model", f"loading {cfg.base_model} for the edge agents"):
            base = await asyncio.to_thread(load_base_model, cfg.base_model)
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
            local: dict[str, StateDict] = {}
            with ph("local", "local-only baseline: each user's personal adapter trained alone"):
                for i, user in enumerate(sorted(users), 1):
                    rounds = sync_run.rounds.get(user, 0)
                    local[user] = await evaluation.train_local_only(
                        trainer, zero, users[user], rounds, cfg, fleet.executor
                    )
                    self.echo(f"  local-only {i}/{len(users)} {user}: {rounds} rounds x {cfg.steps} steps")
        finally:
            fleet.close()
            await source.aclose()
            shutil.rmtree(workdir, ignore_errors=True)

        per_user: dict[str, dict[str, evaluation.Score]] = {}
        served: dict[str, dict[str, Any]] = {}
        with ph("evaluation", f"scoring 4 variants x {len(users)} users through {serve.url}"):
            async with httpx.AsyncClient(base_url=serve.url, timeout=600.0) as client:
                scorer = evaluation.ServiceScorer(client, self.signer, sync_spec.name)
                async_scorer = evaluation.ServiceScorer(client, self.signer, async_spec.name)
                for i, user in enumerate(sorted(users), 1):
                    serve.check()
                    personal = sync_run.personal.get(user)
                    if personal is None:
                        raise PFIError(f"user {user} has no personal adapter after the sync run")
                    adapters = evaluation.Adapters(
                        local=local[user],
                        personal=personal,
                        trained_against=sync_run.trained_against.get(user, 0),
                        async_personal=async_run.personal.get(user),
                        async_trained_against=async_run.trained_against.get(user, 0),
                    )
                    per_user[user], served[user] = await evaluation.score_user(
                        scorer,
                        async_scorer,
                        user,
                        chunks[user],
                        adapters,
                        sync_run.final_version,
                        async_run.final_version,
                    )
                    s = per_user[user]
                    self.echo(
                        f"  {i}/{len(users)} {user}: NLL base {s['base'].nll:.3f}  "
                        f"local {s['local'].nll:.3f}  global {s['global'].nll:.3f}  "
                        f"personalized {s['personalized'].nll:.3f}  (async: global "
                        f"{s['async_global'].nll:.3f}, personalized {s['async_personalized'].nll:.3f})"
                    )
        with ph("report", f"writing {self.out}"):
            summary = evaluation.summarize(per_user)
            av = speedup(async_run, sync_run)
            versions = {
                "async": await _versions(store, async_spec.name, async_run.final_version),
                "sync": await _versions(store, sync_spec.name, sync_run.final_version),
            }
            doc = self._report(
                summary, av, async_run, sync_run, versions, users, per_user, served, devices, train_tokens,
                chunks, curve_texts, started_at, load_start, aggregator, serve, async_spec, sync_spec,
            )  # fmt: skip
            doc["plots"] = await asyncio.to_thread(report.write_plots, doc, self.out)
            report.write_json(doc, self.out)
            report.write_markdown(doc, self.out)
        doc["timings"] = {**self.phases.timings, "total": self.phases.total()}
        report.write_json(doc, self.out)
        report.write_markdown(doc, self.out)
        return doc

    def _report(
        self,
        summary: dict[str, Any],
        av: dict[str, Any],
        async_run: RunResult,
        sync_run: RunResult,
        versions: dict[str, list[dict[str, Any]]],
        users: dict[str, Any],
        per_user: dict[str, dict[str, evaluation.Score]],
        served: dict[str, dict[str, Any]],
        devices: DeviceModel,
        train_tokens: dict[str, int],
        chunks: dict[str, list[str]],
        curve_texts: list[str],
        started_at: str,
        load_start: str,
        aggregator: ServiceProcess,
        serve: ServiceProcess,
        async_spec: FederationSpec,
        sync_spec: FederationSpec,
    ) -> dict[str, Any]:
        cfg = self.cfg
        speeds = sorted(devices.speeds.values())
        expected = [m * cfg.steps * cfg.step_seconds + cfg.network_s / 2 for m in speeds]
        rows = []
        for user in sorted(per_user):
            s = per_user[user]
            rows.append(
                {
                    "user": user,
                    "train_chars": len(users[user].train_text),
                    "heldout_chars": len(users[user].heldout_text),
                    "train_tokens": train_tokens[user],
                    "heldout_chunks": len(chunks[user]),
                    "speed": devices.speeds[user],
                    "rounds": sync_run.rounds.get(user, 0),
                    "async_rounds": async_run.rounds.get(user, 0),
                    "nll": {v: s[v].nll for v in s},
                    "accuracy": {v: s[v].accuracy for v in s},
                    "tokens": s["global"].tokens,
                    "gain_vs_global": evaluation.rel_gain(s["global"].nll, s["personalized"].nll),
                    "gain_vs_local": evaluation.rel_gain(s["local"].nll, s["personalized"].nll),
                    "gain_vs_base": evaluation.rel_gain(s["base"].nll, s["personalized"].nll),
                    "async_gain_vs_global": evaluation.rel_gain(
                        s["async_global"].nll, s["async_personalized"].nll
                    ),
                    "served": served[user],
                }
            )
        summary = {
            **summary,
            "async_vs_sync_speedup": av.get("async_vs_sync_speedup"),
            "goals": {
                "personalized_vs_global_20pct": summary["rel_gain_personalized_vs_global"]
                >= report.GOAL_PERSONALIZATION,
                "async_3x_faster": (av.get("async_vs_sync_speedup") or 0.0) >= report.GOAL_SPEEDUP,
            },
        }
        return {
            "run": cfg.run_name,
            "command": self.command,
            "started_at": started_at,
            "out": str(self.out),
            "summary": summary,
            "async_vs_sync": av,
            "config": cfg.to_dict(),
            "federations": {
                "async": async_spec.model_dump(mode="json"),
                "sync": sync_spec.model_dump(mode="json"),
            },
            "timings": {**self.phases.timings, "total": self.phases.total()},
            "environment": {
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "load_start": load_start,
                "load_end": _load(),
                "python": sys.version.split()[0],
                "torch": torch.__version__,
            },
            "devices": {
                "speeds": devices.speeds,
                # updates per virtual second of async over sync: max(d) * mean(1/d), d = expected
                # device time of one update (compute + mean network delay)
                "throughput_ratio": max(expected) * statistics.fmean(1.0 / d for d in expected),
                "slowest_over_median": speeds[-1] / statistics.median(speeds),
                "fastest_over_median": speeds[0] / statistics.median(speeds),
            },
            "data": {
                "users": len(users),
                "mean_train_tokens": statistics.fmean(train_tokens.values()),
                "eval_chunks_per_user": statistics.fmean(len(c) for c in chunks.values()),
                "curve_chunks": cfg.curve_chunks,
                "curve_texts": len(curve_texts),
            },
            "users": rows,
            "runs": {
                "async": {
                    **_run_dict(async_run, versions["async"]),
                    "max_updates": math.ceil(cfg.async_budget * cfg.rounds * len(users)),
                    "reached_sync_best": av.get("best_nll_async", math.inf)
                    <= av.get("best_nll_sync", -math.inf),
                    "fastest_quarter_share": _fastest_share(async_run, devices),
                },
                "sync": _run_dict(sync_run, versions["sync"]),
            },
            "logs": {"aggregator": str(aggregator.log_path), "serve": str(serve.log_path)},
        }


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
