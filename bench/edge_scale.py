"""``pfi bench edge-scale``: how many updates/s one process simulates, and how memory grows with clients.

Each point is a separate ``pfi edge simulate`` subprocess publishing the same fixed number of updates
to the local stack (its own topics and federation, removed afterwards) with the tiny model:

* a **baseline** with 1 client (the fixed cost: interpreter, torch, the base model, the trainer);
* **100** and **1000** virtual clients.

Peak RSS is what each child reports for itself (``ru_maxrss``). One shared frozen base model and one
trainer serve every client, so only the per-client adapters (and bookkeeping) should add memory:
``rss_1000_vs_100`` must be far below the 10x a per-client model copy would give. Results go to
``bench/results/edge-scale.json`` (with a ``ratios`` object).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import BenchError, drop_federation
from services.settings import PFISettings

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "edge-scale.json"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "shakespeare" / "tinyshakespeare.txt"
MIB = 1024 * 1024


def _synthetic_users(directory: Path, users: int = 64) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(users):
        text = "\n\n".join(
            f"User {i} writes line {j}: " + "lorem ipsum dolor sit amet " * 3 for j in range(30)
        )
        (directory / f"user-{i:03d}.txt").write_text(text, encoding="utf-8")
    return directory


async def _setup(settings: PFISettings, federation: str) -> None:
    from redis.asyncio import Redis

    from modeling.base import TINY_LLAMA
    from schemas.events import FederationSpec, LoraSpec
    from services.federation.admin import create_federation
    from services.stack.topics import ensure_topics
    from services.store.versions import VersionStore

    await ensure_topics(settings)
    redis = Redis.from_url(settings.redis())
    try:
        spec = FederationSpec(
            name=federation,
            base_model=TINY_LLAMA,
            lora=LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj")),
        )
        await create_federation(VersionStore(redis), spec)
    finally:
        await redis.aclose()


async def _teardown(settings: PFISettings, federation: str) -> None:
    from redis.asyncio import Redis

    from services.stack.topics import delete_topics

    redis = Redis.from_url(settings.redis())
    try:
        await drop_federation(redis, federation)
    finally:
        await redis.aclose()
    await delete_topics(settings, [settings.updates_topic, settings.dlq_topic, settings.versions_topic])


def _simulate(
    federation: str, data: Path, clients: int, updates: int, args: argparse.Namespace, env: dict[str, str]
) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "cli.main", "edge", "simulate",
        "--federation", federation, "--data", str(data), "--clients", str(clients), "--updates", str(updates),
        "--steps", str(args.steps), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
        "--speed-dist", args.speed_dist, "--dropout", "0", "--network-delay", "0.005",
        "--seed", "1", "--json", "--no-progress",
    ]  # fmt: skip
    started = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=3600)
    wall = time.perf_counter() - started
    if out.returncode != 0:
        tail = "\n".join(out.stderr.strip().splitlines()[-5:])
        raise BenchError(f"simulate with {clients} clients failed (exit {out.returncode}): {tail}")
    summary: dict[str, Any] = json.loads(out.stdout)
    summary["wall_s"] = wall
    return summary


def run(args: argparse.Namespace) -> dict[str, Any]:
    base = PFISettings()
    tag = uuid.uuid4().hex[:8]
    settings = base.model_copy(update={"topic_prefix": f"bench-edge-{tag}", "update_partitions": 3})
    federation = f"bench-edge-{tag}"
    env = {
        **os.environ,
        "PFI_TOPIC_PREFIX": settings.topic_prefix,
        "PFI_REDIS_URL": settings.redis(),
        "PFI_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap(),
    }
    points: list[tuple[str, int, int]] = [("baseline", 1, max(10, args.updates // 50))]
    points += [(str(n), n, args.updates) for n in args.clients]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pfi-bench-") as tmp:
        data = Path(args.data) if args.data else (SHAKESPEARE if SHAKESPEARE.is_file() else None)
        if data is None:
            data = _synthetic_users(Path(tmp) / "users")
        asyncio.run(_setup(settings, federation))
        try:
            for name, clients, updates in points:
                print(f"edge-scale: {clients} client(s), {updates} updates ...", file=sys.stderr, flush=True)
                summary = _simulate(federation, data, clients, updates, args, env)
                rows.append(
                    {
                        "point": name,
                        "clients": clients,
                        "updates": summary["published"],
                        "failed": summary["failed"],
                        "seconds": summary["duration_s"],
                        "updates_per_s": summary["updates_per_s"],
                        "mean_train_seconds": summary["mean_train_seconds"],
                        "peak_rss_bytes": summary["peak_rss_bytes"],
                        "setup_s": summary["setup_s"],
                        "wall_s": summary["wall_s"],
                        "errors": summary["errors"],
                    }
                )
        finally:
            asyncio.run(_teardown(settings, federation))
    by = {row["point"]: row for row in rows}
    ratios: dict[str, float] = {}
    small, large = str(min(args.clients)), str(max(args.clients))
    if small in by and large in by and small != large:
        s, big = by[small], by[large]
        ratios[f"rss_{large}_vs_{small}"] = big["peak_rss_bytes"] / s["peak_rss_bytes"]
        ratios[f"clients_{large}_vs_{small}"] = int(large) / int(small)
        ratios[f"updates_per_s_{large}_vs_{small}"] = big["updates_per_s"] / s["updates_per_s"]
        ratios["rss_bytes_per_extra_client"] = (big["peak_rss_bytes"] - s["peak_rss_bytes"]) / (
            int(large) - int(small)
        )
        fixed = by["baseline"]["peak_rss_bytes"]
        ratios[f"rss_above_baseline_{large}_vs_{small}"] = (big["peak_rss_bytes"] - fixed) / max(
            s["peak_rss_bytes"] - fixed, 1
        )
    result = {
        "benchmark": "edge-scale",
        "model": "pfi/tiny-llama",
        "config": {
            "updates": args.updates,
            "steps": args.steps,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "speed_dist": args.speed_dist,
            "cpus": os.cpu_count(),
        },
        "points": rows,
        "ratios": ratios,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{'point':>9} {'clients':>7} {'updates':>7} {'failed':>6} {'seconds':>8} {'updates/s':>9} "
        f"{'train s':>8} {'peak RSS MiB':>12}"
    ]
    for row in result["points"]:
        lines.append(
            f"{row['point']:>9} {row['clients']:>7} {row['updates']:>7} {row['failed']:>6} "
            f"{row['seconds']:>8.1f} {row['updates_per_s']:>9.2f} {row['mean_train_seconds']:>8.3f} "
            f"{row['peak_rss_bytes'] / MIB:>12.1f}"
        )
    for name, value in result["ratios"].items():
        shown = f"{value / 1024:.1f} KiB" if name == "rss_bytes_per_extra_client" else f"{value:.3f}"
        lines.append(f"{name} = {shown}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--updates", type=int, default=1000, help="updates per point (both client counts)")
    parser.add_argument(
        "--clients", type=lambda s: [int(x) for x in s.split(",")], default=[100, 1000], help="e.g. 100,1000"
    )
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--speed-dist", default="lognormal:0.5")
    parser.add_argument("--data", help="user data (default: tinyshakespeare if present, else synthetic)")
    parser.add_argument("--out", default=str(RESULTS), help="where the JSON result goes")
    parser.add_argument("--json", action="store_true", help="print the JSON result instead of a table")


def command(args: argparse.Namespace) -> int:
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "edge-scale", help="updates/s of one simulator process; peak RSS for 100 vs 1000 virtual clients"
    )
    add_arguments(parser)
    parser.set_defaults(func=command)


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m bench.edge_scale")
    add_arguments(cli)
    raise SystemExit(command(cli.parse_args()))
