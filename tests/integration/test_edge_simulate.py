"""The fleet simulator on the real stack: many virtual agents, one process, a running aggregator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from redis.asyncio import Redis

from clients.training import TrainConfig
from schemas.errors import ConfigError
from services.federation.admin import federation_status
from services.settings import PFISettings
from services.store.versions import VersionStore
from sim.devices import parse_speed_dist
from sim.fleet import SimulationConfig, simulate
from tests.support.federations import new_federation, running_aggregator, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(150),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
]

ROOT = Path(__file__).resolve().parents[2]
FAST = TrainConfig(steps=2, batch_size=4, seq_len=32, seed=0)
STYLES = ["ZORP blik TAK", "the sea the sea", "numbers 1 2 3 5 8 13", "la la la", "to be or not"]


def user_dir(root: Path, users: int = 8) -> Path:
    """``<user>.txt`` files, each user with its own little style (non-IID)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(users):
        style = STYLES[i % len(STYLES)]
        text = "\n\n".join(f"{style}! line {j} of user {i}." for j in range(20))
        (root / f"user-{i}.txt").write_text(text, encoding="utf-8")
    return root


async def test_simulate_20_clients_yields_20_accepted_updates(
    pfi_settings: PFISettings, redis_client: Redis, tmp_path: Path
) -> None:
    store = VersionStore(redis_client)
    spec = await new_federation(store, buffer_size=4, flush_timeout_s=1.0)
    cfg = SimulationConfig(
        federation=spec.name,
        data=user_dir(tmp_path / "users"),
        clients=20,
        updates=24,
        speed_sigma=0.8,
        dropout=0.2,
        offline_s=0.2,
        network_delay_s=0.02,
        train=FAST,
        seed=3,
        progress=False,
    )
    async with running_aggregator(pfi_settings):
        summary = await simulate(cfg, pfi_settings, redis=redis_client)

        async def accepted() -> bool:
            status = await federation_status(store, spec.name)
            return int(status["updates_aggregated_total"]) >= 20

        try:
            await wait_for(accepted, timeout=60)
        except AssertionError:
            status = await federation_status(store, spec.name)
            counts = {k: v for k, v in status.items() if k.startswith("updates")}
            raise AssertionError(f"not aggregated: {counts}; {summary}") from None
        status = await federation_status(store, spec.name)
    assert summary.clients == 20
    assert summary.users == 8
    assert summary.published == 24
    assert summary.failed == 0
    assert summary.queued == 0
    assert summary.rounds == 24
    assert summary.dropped > 0  # dropout 0.2 over 24+ rounds
    assert summary.mean_train_seconds > 0
    assert summary.updates_per_s > 0
    assert summary.peak_rss_bytes > 0
    assert status["updates_rejected_total"]["total"] == 0, status["updates_rejected_total"]
    assert status["updates_accepted_total"] >= 20
    assert status["version"] >= 5  # 20+ updates, buffers of 4
    clients = {
        u["client_id"]
        for v in range(1, status["head"] + 1)
        if (meta := await store.get_meta(spec.name, v)) is not None
        for u in meta.model_dump()["updates"]
    }
    assert len(clients) >= 10  # many different virtual clients contributed
    as_json = summary.to_dict()
    assert {"published", "failed", "clients", "duration_s", "updates_per_s", "queued"} <= set(as_json)
    assert json.loads(json.dumps(as_json)) == as_json


async def test_simulate_stops_after_the_duration(
    pfi_settings: PFISettings, redis_client: Redis, tmp_path: Path
) -> None:
    spec = await new_federation(VersionStore(redis_client))
    cfg = SimulationConfig(
        federation=spec.name,
        data=user_dir(tmp_path / "users", users=3),
        clients=5,
        duration_s=2.0,
        speed_sigma=0.0,
        train=FAST,
        progress=False,
    )
    summary = await simulate(cfg, pfi_settings, redis=redis_client)
    assert 2.0 <= summary.duration_s < 10.0
    assert summary.published >= 1
    assert summary.published == summary.rounds
    assert summary.failed == 0


def test_config_errors() -> None:
    assert parse_speed_dist("lognormal:0.7") == 0.7
    assert parse_speed_dist("constant") == 0.0
    for bad in ("gaussian:1", "lognormal:", "lognormal:x", "lognormal:-1"):
        with pytest.raises(ConfigError):
            parse_speed_dist(bad)
    with pytest.raises(ConfigError, match="--duration"):
        SimulationConfig(federation="f", data=Path("."), clients=1)
    with pytest.raises(ConfigError, match="dropout"):
        SimulationConfig(federation="f", data=Path("."), clients=1, updates=1, dropout=1.0)


def _cli(args: list[str], settings: PFISettings, redis_url: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PFI_TOPIC_PREFIX": settings.topic_prefix,
        "PFI_REDIS_URL": redis_url,
        "PFI_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap(),
    }
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_cli_simulate_prints_a_json_summary(
    pfi_settings: PFISettings, redis_client: Redis, redis_url: str, tmp_path: Path
) -> None:
    spec = await new_federation(VersionStore(redis_client))
    data = user_dir(tmp_path / "users", users=2)
    out = _cli(
        [
            "edge",
            "simulate",
            "--federation",
            spec.name,
            "--data",
            str(data),
            "--clients",
            "3",
            "--updates",
            "3",
            "--steps",
            "1",
            "--seq-len",
            "32",
            "--speed-dist",
            "constant",
            "--dropout",
            "0",
            "--json",
            "--no-progress",
        ],
        pfi_settings,
        redis_url,
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["published"] == 3
    assert summary["failed"] == 0
    assert summary["clients"] == 3
    assert summary["queued"] == 0

    missing = _cli(
        [
            "edge",
            "simulate",
            "--federation",
            "no-such-fed",
            "--data",
            str(data),
            "--clients",
            "1",
            "--updates",
            "1",
            "--json",
        ],
        pfi_settings,
        redis_url,
    )
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert missing.stderr.strip().splitlines()[-1] == (
        "pfi edge: error: federation 'no-such-fed' does not exist"
    )
