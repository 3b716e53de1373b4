"""The edge agent on the real stack (tiny model): it enrolls through the personalization app, fetches the
global adapter from it, uploads through its ingest route (Kafka behind it) and gets aggregated. The
``pfi edge run`` test gives the device nothing but the service URL and an enrollment token: its Redis
address points at a closed port."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
from redis.asyncio import Redis

from clients.agent import AgentOptions, SpecMismatchError, wire_encoding
from clients.credentials import credential_path, load_credential
from clients.data import UserData
from clients.enrollment import DeviceIdentity, EnrollmentError
from clients.personal import DiskPersonalStore
from clients.settings import EdgeSettings
from clients.training import AdapterTrainer, TrainConfig
from modeling.base import TINY_LLAMA, load_base_model
from schemas.errors import ConfigError
from schemas.events import DPMetadata, FederationSpec, LoraSpec
from services.federation.admin import create_federation
from services.identity.enrollment import Enrollment
from services.identity.registry import ClientRegistry
from services.personalization.harness import BASE_URL, serving
from services.settings import PFISettings, ServeSettings
from services.store.versions import VersionStore
from tests.support.edge import Devices, serve_process
from tests.support.federations import (
    fed_name,
    global_state,
    read_events,
    running_aggregator,
    tiny_spec,
    wait_for,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
]

ROOT = Path(__file__).resolve().parents[2]
CFG = TrainConfig(steps=8, batch_size=4, seq_len=64, lr=1e-2, seed=1)


def synthetic_user(user_id: str, seed: int = 0, paragraphs: int = 40) -> UserData:
    """A distinctive style (few shouted words, rhythmic lines): easy to learn, held-out part alike."""
    rng = random.Random(seed)
    words = ["ZORP", "blik", "QUANDO", "fee", "mumble", "TAK"]
    text = "\n\n".join(
        "\n".join(" ".join(rng.choice(words) for _ in range(6)) + "!" for _ in range(3))
        for _ in range(paragraphs)
    )
    return UserData.from_text(user_id, text, heldout_fraction=0.2)


@pytest.fixture(scope="module")
def trainer() -> AdapterTrainer:
    """One trainer for every federation made by ``tiny_spec`` (their fingerprints are equal)."""
    return AdapterTrainer(load_base_model(TINY_LLAMA), tiny_spec())


@pytest.fixture
async def agents(
    pfi_settings: PFISettings, trainer: AdapterTrainer, tmp_path: Path
) -> AsyncIterator[Devices]:
    async with serving(pfi_settings, ServeSettings()) as h:
        devices = Devices(h, trainer, tmp_path)
        try:
            yield devices
        finally:
            for identity in devices.identities:
                await identity.aclose()


async def read_updates(settings: PFISettings, count: int, timeout_s: float = 20.0) -> list[Any]:
    return await read_events(settings, settings.updates_topic, count, timeout_s)


async def test_shared_and_personal_training_lowers_heldout_loss(
    agents: Devices, redis_client: Redis, trainer: AdapterTrainer
) -> None:
    store = VersionStore(redis_client)
    spec = tiny_spec()
    await create_federation(store, spec)
    agent = await agents.make(spec.name, "zorp")
    data = synthetic_user("zorp")
    v0 = await global_state(store, spec.name, 0)
    base_loss = trainer.evaluate({"shared": v0}, [data.heldout_text], seq_len=CFG.seq_len).mean_nll

    first = await agent.run_round(data, CFG)
    assert first.loss_on == "heldout"
    assert first.loss_after < first.loss_before - 0.05
    assert first.published
    assert first.queued == 0
    second = await agent.run_round(data, TrainConfig(**{**CFG.__dict__, "seed": 2}))
    # The personal adapter carried over: round 2 starts where round 1's personal training left off.
    assert second.loss_before < first.loss_before - 0.05
    assert second.loss_after < second.loss_before

    personal = agent.personal_adapter()
    assert personal is not None
    with_personal = trainer.evaluate(
        {"shared": v0, "personal": personal}, [data.heldout_text], seq_len=CFG.seq_len
    ).mean_nll
    assert with_personal < base_loss - 0.1, (base_loss, with_personal)


async def test_updates_are_accepted_by_the_aggregator_fp16_int8_and_dp(
    agents: Devices, pfi_settings: PFISettings, redis_client: Redis
) -> None:
    store = VersionStore(redis_client)
    spec = tiny_spec(buffer_size=3)
    await create_federation(store, spec)
    plain = await agents.make(spec.name, "alice")
    int8 = await agents.make(spec.name, "bob", options=AgentOptions(encoding=wire_encoding(int8=True)))
    noisy = await agents.make(
        spec.name, "carol", options=AgentOptions(clip_norm=1.0, noise_multiplier=0.05, noise_seed=3)
    )
    results = []
    async with running_aggregator(pfi_settings) as aggregator:
        for seed, agent in enumerate((plain, int8, noisy)):
            data = synthetic_user(agent.user_id, seed=seed)
            results.append(await agent.run_round(data, CFG))
        assert all(r.published and r.base_version == 0 for r in results)

        async def aggregated() -> bool:
            return (await store.latest(spec.name) or 0) >= 1

        await wait_for(aggregated, timeout=60)
        meta = await store.get_meta(spec.name, 1)
        assert meta is not None
        assert sorted(meta.update_ids) == sorted(r.update_id for r in results)
        assert (await store.get_stats(spec.name)).get("rejected_total", 0) == 0
        assert aggregator.started.is_set()

    assert results[0].encoding == wire_encoding()  # fp16 + zstd by default
    assert results[0].encoding.dtype == "float16"
    assert results[1].encoding.quantization == "int8"
    assert results[2].dp == DPMetadata(clip_norm=1.0, noise_multiplier=0.05)
    assert results[2].delta_norm > 0
    # What went over the wire says so too (signed, so the aggregator saw the same).
    sent = {u.update_id: u for u in await read_updates(pfi_settings, 3)}
    assert set(sent) == {r.update_id for r in results}
    assert sent[results[2].update_id].dp == DPMetadata(clip_norm=1.0, noise_multiplier=0.05)
    assert sent[results[0].update_id].dp is None
    assert sent[results[1].update_id].encoding.quantization == "int8"
    assert all(u.signature for u in sent.values())
    assert all(u.metrics.loss_after is not None and u.metrics.steps == CFG.steps for u in sent.values())
    v1 = await global_state(store, spec.name, 1)
    v0 = await global_state(store, spec.name, 0)
    assert any(not torch.equal(v1[k], v0[k]) for k in v0)


async def test_agent_refuses_a_global_adapter_of_another_spec(
    agents: Devices, redis_client: Redis, tmp_path: Path
) -> None:
    store = VersionStore(redis_client)
    other = FederationSpec(
        name=fed_name(), base_model=TINY_LLAMA, lora=LoraSpec(rank=8, alpha=16, target_modules=("q_proj",))
    )
    await create_federation(store, other)
    agent = await agents.make(other.name, "dave")
    with pytest.raises(SpecMismatchError, match=r"spec fingerprint .* LoRA config") as info:
        await agent.run_round(synthetic_user("dave"), CFG)
    assert "refusing to train" in str(info.value)
    assert len(agent.outbox) == 0
    assert not (tmp_path / "state" / "dave" / "personal.safetensors").exists()


async def test_personal_adapter_and_key_persist_across_agent_restarts(
    agents: Devices, redis_client: Redis, trainer: AdapterTrainer, tmp_path: Path
) -> None:
    store = VersionStore(redis_client)
    spec = tiny_spec()
    await create_federation(store, spec)
    data = synthetic_user("erin", seed=5)
    first = await agents.make(spec.name, "erin")
    await first.run_round(data, CFG)
    path = tmp_path / "state" / "erin" / "personal.safetensors"
    assert path.is_file()
    saved = DiskPersonalStore(tmp_path / "state").load("erin", spec.fingerprint())
    assert saved is not None

    second = await agents.make(spec.name, "erin")  # a new process would do the same
    assert second.key == first.key
    reloaded = second.personal_adapter()
    assert reloaded is not None
    assert all(torch.equal(reloaded[k], saved[k]) for k in saved)
    fresh = trainer.fresh_adapter("erin", CFG.seed)
    assert any(not torch.equal(reloaded[k], fresh[k]) for k in fresh)

    # The next round trains from the reloaded adapter: its starting loss is the saved adapter's.
    v0 = await global_state(store, spec.name, 0)
    expected = trainer.evaluate(
        {"shared": v0, "personal": saved}, [data.heldout_text], seq_len=CFG.seq_len, batch_size=CFG.batch_size
    ).mean_nll
    result = await second.run_round(data, CFG)
    assert result.loss_before == pytest.approx(expected, rel=1e-4)
    after = DiskPersonalStore(tmp_path / "state").load("erin", spec.fingerprint())
    assert after is not None
    assert any(not torch.equal(after[k], saved[k]) for k in saved)

    # An adapter saved for another spec is set aside, not loaded into the wrong shapes.
    assert DiskPersonalStore(tmp_path / "state").load("erin", "0" * 64) is None
    assert not path.exists()
    assert list(path.parent.glob("personal.safetensors.spec-*"))


async def test_enrollment_stores_a_private_credential_and_the_key_proof_refreshes_the_token(
    agents: Devices, redis_client: Redis, tmp_path: Path
) -> None:
    fed = fed_name()
    state_dir = tmp_path / "creds"
    identity = await agents.identity(fed, "kim", state_dir)
    path = credential_path(state_dir, fed, "kim")
    assert path.stat().st_mode & 0o777 == 0o600
    stored = load_credential(path)
    assert stored == identity.credential
    record = await ClientRegistry(redis_client).get(fed, "kim")
    assert record is not None
    assert record.key == identity.key
    assert record.active

    old = identity.credential.token
    new = await identity.refresh()
    assert new != old
    assert load_credential(path).token == new  # saved for the next start
    assert agents.h.service.authenticator.authenticate(f"Bearer {new}").device

    # A token about to expire is refreshed before use.
    soon = identity.credential.with_token(new, expires_at=time.time() + 5)
    identity.credential = soon
    assert await identity.token() != new

    # The next start loads it (no enrollment token needed); a mismatched or exposed file is refused.
    again = await agents.identity(fed, "kim", state_dir)
    assert again.key == identity.key
    settings = EdgeSettings(service_url=BASE_URL, state_dir=state_dir)
    with pytest.raises(ConfigError, match="no credential"):
        await DeviceIdentity.obtain(settings, fed, "nobody", client=agents.h.client)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        await DeviceIdentity.obtain(settings, fed, "kim", client=agents.h.client)

    # An enrollment token works its number of uses only; a revoked client cannot refresh its token.
    issued = await Enrollment(redis_client).issue(fed, uses=1, ttl_s=60)
    once = settings.model_copy(update={"enrollment_token": issued.token})
    first = await DeviceIdentity.obtain(once, fed, "lee", client=agents.h.client)
    with pytest.raises(EnrollmentError) as used_up:
        await DeviceIdentity.obtain(once, fed, "max", client=agents.h.client)
    assert used_up.value.status == 401
    await ClientRegistry(redis_client).revoke(fed, "lee")
    with pytest.raises(EnrollmentError):
        await first.refresh()


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


async def test_cli_edge_run_needs_only_the_service_and_an_enrollment_token(
    pfi_settings: PFISettings, redis_client: Redis, tmp_path: Path
) -> None:
    spec = await new_federation_tiny(redis_client)
    data = tmp_path / "users.jsonl"
    lines = [{"user_id": "hal", "text": synthetic_user("hal").train_text}, {"user_id": "ivy", "text": "hi"}]
    data.write_text("\n".join(json.dumps(line) for line in lines), encoding="utf-8")
    issued = await Enrollment(redis_client).issue(spec.name, uses=1, ttl_s=300)
    state = tmp_path / "state"
    async with serve_process(pfi_settings, tmp_path / "serve-home") as url:
        # The device: no Redis (a closed port), no Kafka, no server credentials; its own PFI_HOME.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PFI_")}
        env.update(
            PFI_HOME=str(tmp_path / "device-home"),
            PFI_REDIS_URL="redis://127.0.0.1:1/0",
            PFI_KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1",
            PFI_EDGE_SERVICE_URL=url,
            PFI_EDGE_ENROLLMENT_TOKEN=issued.token,
        )
        common = ["--federation", spec.name, "--data", str(data), "--state-dir", str(state), "--no-progress"]
        training = [
            "--rounds",
            "2",
            "--steps",
            "2",
            "--seq-len",
            "32",
            "--int8",
            "--dp-noise",
            "0.01",
            "--json",
        ]
        out = await asyncio.to_thread(run_cli, ["edge", "run", "--user", "hal", *common, *training], env)
        assert out.returncode == 0, out.stderr
        summary = json.loads(out.stdout)
        assert summary["published"] == 2
        assert summary["queued"] == 0
        assert [r["encoding"]["quantization"] for r in summary["rounds"]] == ["int8", "int8"]
        dp = {"mechanism": "gaussian", "clip_norm": 10.0, "noise_multiplier": 0.01}
        assert summary["rounds"][0]["dp"] == dp
        assert "round 2/2" in out.stderr
        assert (state / "hal" / "personal.safetensors").is_file()
        credential = load_credential(credential_path(state, spec.name, "hal"))
        record = await ClientRegistry(redis_client).get(spec.name, "hal")
        assert record is not None
        assert record.key == credential.signing_key

        # The enrollment token is used up; the stored credential is enough for the next run.
        del env["PFI_EDGE_ENROLLMENT_TOKEN"]
        again = await asyncio.to_thread(
            run_cli, ["edge", "run", "--user", "hal", *common, "--steps", "1", "--seq-len", "32"], env
        )
        assert again.returncode == 0, again.stderr

        flushed = await asyncio.to_thread(
            run_cli, ["edge", "flush", "--user", "hal", "--state-dir", str(state), "--timeout", "5"], env
        )
        assert flushed.returncode == 0, flushed.stderr
        assert "sent 0 update(s); 0 still queued" in flushed.stdout

        unknown = await asyncio.to_thread(run_cli, ["edge", "run", "--user", "zed", *common], env)
        assert unknown.returncode == 1
        assert unknown.stderr.strip().splitlines()[-1].startswith("pfi edge: error: user 'zed' is not in")

    # What reached the updates topic came through the ingest, signed with the device's key.
    sent = await read_updates(pfi_settings, 3)
    assert len(sent) == 3
    for update in sent:
        assert update.client_id == "hal"
        assert update.signature


async def new_federation_tiny(redis: Redis) -> FederationSpec:
    spec = tiny_spec()
    await create_federation(VersionStore(redis), spec)
    return spec
