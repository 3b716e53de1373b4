"""``pfi bench soak``: a steady update rate for a long time; does memory grow, does lag stay bounded?

Real processes on the local stack: ``pfi aggregator`` and ``pfi serve`` (tiny model, this run's own
topics and federation, retention of ``--keep-versions`` versions so the store is bounded too). For
``--minutes`` (default 30) this process sends ``--rate`` signed updates per second (random deltas from
``--clients`` registered clients, each against the latest version) and ``--request-rate`` score
requests per second to the service. Every ``--sample-s`` seconds it records, per service, the
resident set size (``VmRSS`` of the process) and

* ``lag_messages``: the aggregator's own ``pfi_aggregator_consumer_lag_messages`` (sum over partitions);
* ``backlog_updates``: updates sent (acked by Kafka) minus ``aggregated_total`` in Redis: end-to-end.

Memory growth is measured after a warm-up (the first ``--warmup-fraction`` of the run: imports, first
allocations, allocator arenas): ``rss_growth_<service>`` = (mean RSS of the last 10 % of samples) /
(mean RSS of the samples just after warm-up) - 1; goal < 0.10. At the end the stream is drained and
audited: every acked update aggregated exactly once (``lost``, ``double_counted``). A PNG plots RSS and
lag over time next to ``bench/results/soak.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import secrets
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import torch
from redis.asyncio import Redis

from bench.common import BenchError, drop_federation, ratio_lines, register_benchmark, save_with_plot, say
from clients.updates import build_update
from modeling.base import TINY_LLAMA
from modeling.blobs import BLOB_ENCODING
from schemas.events import AggregationSpec, FederationSpec, LoraSpec
from services.federation.admin import create_federation, federation_status
from services.identity import ClientRegistry
from services.ingest.producer import UpdateProducer
from services.personalization.auth import TokenSigner
from services.settings import PFISettings
from services.stack.processes import ServiceProcess, child_env, free_port, pfi_command, rss_bytes
from services.stack.topics import delete_topics, ensure_topics
from services.store.versions import VersionStore

SUMMARY = "steady update rate for --minutes: RSS growth of each service, lag"
NAME = "soak"
GOALS = {"rss_growth_aggregator": "<= 0.1", "rss_growth_serve": "<= 0.1"}
LAG_METRIC = "pfi_aggregator_consumer_lag_messages"


def metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head = line.split(" ")[0]
            if head == name or head.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def growth(values: list[float], warmup: int) -> float:
    """Mean of the last 10 % over the mean just after warm-up, minus 1 (module doc)."""
    tail = max(1, len(values) // 10)
    after = values[warmup : warmup + tail]
    if len(values) - warmup < 2 or not after:
        raise BenchError("too few samples after the warm-up to measure growth")
    return statistics.fmean(values[-tail:]) / statistics.fmean(after) - 1.0


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        hexid = uuid.uuid4().hex[:8]
        self.settings = PFISettings(topic_prefix=f"soak-{hexid}")
        self.spec = FederationSpec(
            name=f"soak-{hexid}",
            base_model=TINY_LLAMA,
            lora=LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj")),
            aggregation=AggregationSpec(
                buffer_size=args.buffer_size, flush_timeout_s=2.0, keep_versions=args.keep_versions
            ),
        )
        self.secret = secrets.token_hex(32)
        self.signer = TokenSigner(self.secret.encode())
        self.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pfi-soak-"))
        self.sent: list[str] = []
        self.send_errors = 0
        self.requests = {"ok": 0, "error": 0}
        self.samples: list[dict[str, Any]] = []
        self.stop = asyncio.Event()

    def processes(self) -> dict[str, ServiceProcess]:
        agg, srv = free_port(), free_port()
        group = f"pfi-aggregator-{self.spec.name}"
        env = child_env(self.settings, PFI_AGGREGATOR_PORT=str(agg), PFI_AGGREGATOR_GROUP_ID=group)
        serve_env = child_env(self.settings, PFI_SERVE_PORT=str(srv), PFI_SERVE_TOKEN_SECRET=self.secret)
        return {
            "aggregator": ServiceProcess(
                "aggregator",
                pfi_command("aggregator"),
                env,
                self.workdir / "aggregator.log",
                f"http://127.0.0.1:{agg}",
            ),
            "serve": ServiceProcess(
                "serve",
                pfi_command("serve"),
                serve_env,
                self.workdir / "serve.log",
                f"http://127.0.0.1:{srv}",
            ),
        }

    async def produce(self, store: VersionStore, redis: Redis, shapes: dict[str, tuple[int, ...]]) -> None:
        clients = [
            (
                f"{self.spec.name}-c{i}",
                await ClientRegistry(redis).register(self.spec.name, f"{self.spec.name}-c{i}"),
            )
            for i in range(self.args.clients)
        ]
        rng = random.Random(1)
        interval = 1.0 / self.args.rate
        async with UpdateProducer(self.settings) as producer:
            next_at = time.monotonic()
            while not self.stop.is_set():
                client_id, key = clients[rng.randrange(len(clients))]
                gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
                delta = {k: torch.randn(s, generator=gen) * 0.01 for k, s in shapes.items()}
                envelope = build_update(
                    federation=self.spec.name, client_id=client_id, spec_fingerprint=self.spec.fingerprint(),
                    base_version=await store.latest(self.spec.name) or 0, num_samples=rng.randint(1, 64),
                    delta=delta, key=key,
                )  # fmt: skip
                try:
                    await producer.send(envelope, key=key)
                    self.sent.append(envelope.data.update_id)
                except Exception as err:  # counted; a soak keeps going
                    self.send_errors += 1
                    say(f"send failed: {err!r}")
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def request(self, serve: ServiceProcess) -> None:
        interval = 1.0 / self.args.request_rate
        token = self.signer.issue("soak-user", ttl_s=24 * 3600, federation=self.spec.name)
        body = {"texts": ["To be, or not to be, that is the question."]}
        async with httpx.AsyncClient(base_url=serve.url, timeout=30.0) as client:
            next_at = time.monotonic()
            while not self.stop.is_set():
                try:
                    r = await client.post(
                        f"/v1/federations/{self.spec.name}/score",
                        json=body,
                        headers={"Authorization": f"Bearer {token}"},
                    )
                    self.requests["ok" if r.status_code == 200 else "error"] += 1
                except httpx.HTTPError:
                    self.requests["error"] += 1
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def sample(
        self, procs: dict[str, ServiceProcess], store: VersionStore, began: float
    ) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=10.0) as client:
            lag = metric_sum((await client.get(f"{procs['aggregator'].url}/metrics")).text, LAG_METRIC)
        stats = await store.get_stats(self.spec.name)
        row: dict[str, Any] = {
            "t_s": time.monotonic() - began,
            "sent": len(self.sent),
            "aggregated": int(stats.get("aggregated_total", 0)),
            "lag_messages": lag,
            "version": await store.latest(self.spec.name),
        }
        row["backlog_updates"] = row["sent"] - row["aggregated"]
        for name, proc in procs.items():
            proc.check()
            row[f"rss_{name}"] = rss_bytes(int(proc.pid or 0))
        return row

    async def run(self) -> dict[str, Any]:
        args = self.args
        await ensure_topics(self.settings)
        redis = Redis.from_url(self.settings.redis())
        store = VersionStore(redis)
        procs = self.processes()
        try:
            await create_federation(store, self.spec)
            blob = await store.get_blob(self.spec.name, 0)
            if blob is None:
                raise BenchError("v0 has no blob")
            from schemas.codec import decode_tensors

            shapes = {
                k: tuple(t.shape)
                for k, t in decode_tensors(blob, BLOB_ENCODING, max_decoded_bytes=1 << 30).items()
            }
            for proc in procs.values():
                proc.start()
            for proc in procs.values():
                await proc.wait_ready(300.0)
            say(
                f"soak {self.spec.name}: {args.rate} updates/s, {args.request_rate} requests/s, "
                f"{args.minutes} min"
            )
            began = time.monotonic()
            tasks = [
                asyncio.create_task(self.produce(store, redis, shapes)),
                asyncio.create_task(self.request(procs["serve"])),
            ]
            duration = args.minutes * 60.0
            last_line = 0.0
            while time.monotonic() - began < duration:
                await asyncio.sleep(args.sample_s)
                for task in tasks:
                    if task.done():
                        task.result()
                row = await self.sample(procs, store, began)
                self.samples.append(row)
                if row["t_s"] - last_line >= args.progress_s:
                    last_line = row["t_s"]
                    say(
                        f"  {row['t_s'] / 60:5.1f}/{args.minutes} min  sent {row['sent']}  "
                        f"v{row['version']}  "
                        f"lag {row['lag_messages']:.0f}  backlog {row['backlog_updates']}  RSS aggregator "
                        f"{row['rss_aggregator'] / 2**20:.1f} MiB, serve {row['rss_serve'] / 2**20:.1f} MiB"
                    )
            self.stop.set()
            await asyncio.gather(*tasks)
            audit = await self.drain_and_audit(store)
        finally:
            for proc in procs.values():
                await asyncio.to_thread(proc.stop)
            await drop_federation(redis, self.spec.name)
            await redis.aclose()
            s = self.settings
            await delete_topics(s, [s.updates_topic, s.dlq_topic, s.versions_topic])
        return self.result(audit)

    async def drain_and_audit(self, store: VersionStore) -> dict[str, Any]:
        deadline = time.monotonic() + 120.0
        while (await store.get_stats(self.spec.name)).get("aggregated_total", 0) < len(self.sent):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        status = await federation_status(store, self.spec.name)
        aggregated = int(status["updates_aggregated_total"])
        return {
            "sent": len(self.sent),
            "aggregated": aggregated,
            "lost": max(0, len(self.sent) - aggregated),
            "double_counted": max(0, aggregated - len(self.sent)),
            "rejected": status["updates_rejected_total"],
            "versions": status["version"],
        }

    def result(self, audit: dict[str, Any]) -> dict[str, Any]:
        rows = self.samples
        warmup = min(len(rows) - 2, max(1, math.ceil(len(rows) * self.args.warmup_fraction)))
        ratios: dict[str, float] = {}
        for name in ("aggregator", "serve"):
            ratios[f"rss_growth_{name}"] = growth([float(r[f"rss_{name}"]) for r in rows], warmup)
        lags = [r["lag_messages"] for r in rows[warmup:]]
        backlog = [r["backlog_updates"] for r in rows[warmup:]]
        ratios["lag_max_messages"] = max(lags)
        ratios["backlog_max_updates"] = float(max(backlog))
        # Bounded lag: the second half's worst is no worse than the first half's (no upward trend).
        half = len(backlog) // 2
        ratios["backlog_max_second_half_vs_first"] = (max(backlog[half:]) + 1) / (
            max(backlog[:half] or [0]) + 1
        )
        ratios["lost"] = float(audit["lost"])
        ratios["double_counted"] = float(audit["double_counted"])
        return {
            "benchmark": NAME,
            "config": {k: v for k, v in vars(self.args).items() if k != "func"},
            "samples": rows,
            "warmup_samples": warmup,
            "audit": audit,
            "send_errors": self.send_errors,
            "requests": self.requests,
            "achieved_update_rate": audit["sent"] / (self.args.minutes * 60.0),
            "ratios": ratios,
            "goals": GOALS,
        }


def plot(result: dict[str, Any], target: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["samples"]
    t = [r["t_s"] / 60 for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    for name in ("aggregator", "serve"):
        top.plot(t, [r[f"rss_{name}"] / 2**20 for r in rows], label=f"{name} RSS")
    top.axvline(
        t[result["warmup_samples"]], color="grey", linestyle="--", linewidth=1, label="end of warm-up"
    )
    top.set_ylabel("MiB")
    top.legend()
    bottom.plot(t, [r["lag_messages"] for r in rows], label="consumer lag (messages)")
    bottom.plot(t, [r["backlog_updates"] for r in rows], label="backlog (sent - aggregated)")
    bottom.set_xlabel("minutes")
    bottom.legend()
    fig.suptitle("soak: memory and lag at a steady update rate")
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target


def table(result: dict[str, Any]) -> str:
    rows, w = result["samples"], result["warmup_samples"]
    a = result["audit"]
    lines = [
        f"soak: {result['config']['minutes']} min, {result['achieved_update_rate']:.2f} updates/s achieved, "
        f"{sum(result['requests'].values())} requests ({result['requests']['error']} failed)",
        f"{'service':<12}{'RSS after warm-up MiB':>22}{'RSS at end MiB':>16}",
    ]
    for name in ("aggregator", "serve"):
        lines.append(
            f"{name:<12}{rows[w][f'rss_{name}'] / 2**20:>22.1f}{rows[-1][f'rss_{name}'] / 2**20:>16.1f}"
        )
    lines.append(f"updates sent {a['sent']}, aggregated {a['aggregated']}, versions {a['versions']}")
    lines += ratio_lines(result["ratios"], GOALS)
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=30.0, help="how long (30)")
    parser.add_argument("--rate", type=float, default=5.0, help="updates per second (5)")
    parser.add_argument("--request-rate", type=float, default=5.0, help="score requests per second (5)")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--buffer-size", type=int, default=10, help="K of the federation (10)")
    parser.add_argument("--keep-versions", type=int, default=20, help="versions retained in Redis (20)")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples (5)")
    parser.add_argument("--progress-s", type=float, default=60.0, help="seconds between progress lines (60)")
    parser.add_argument("--warmup-fraction", type=float, default=0.1)
    parser.add_argument("--workdir", default=None, help="service logs (default a temporary directory)")
    parser.add_argument("--out", default=None, help="the JSON result (default bench/results/soak.json)")
    parser.add_argument("--json", action="store_true", help="print the JSON result instead of the table")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.rate <= 0 or args.request_rate <= 0 or args.minutes <= 0:
        raise BenchError("--rate, --request-rate and --minutes must be > 0")
    result = asyncio.run(Soak(args).run())
    save_with_plot(NAME, result, args.out, plot)
    return result


def register(subparsers: Any) -> None:
    register_benchmark(subparsers, NAME, SUMMARY, add_arguments, run, table)
