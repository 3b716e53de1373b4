"""Adapters out and in against the real Redis: ``pfi federation export`` / ``create --init-adapter`` (the
CLI as a process) and the personal adapter export route (in-process app), each checked with stock PEFT
against the service's own ``score`` on the same text.

Tolerance: ``|ΔNLL| < 1e-4`` nats/token (fp32; PEFT's un-merged LoRA vs the service's merged global +
batched personal slot: same function, another summation order).
"""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
import uuid
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from gguf import GGUFReader
from peft import PeftModel
from redis.asyncio import Redis
from safetensors.torch import load_file

from clients.http_source import upload_personal_adapter
from modeling.base import BaseModel, load_base_model
from schemas.errors import ConfigError
from schemas.events import FederationSpec
from services.federation.adapter_export import CONFIG_FILE, GGUF_FILE, PROVENANCE_FILE, WEIGHTS_FILE
from services.federation.adapter_io import create_from_peft, export_global
from services.federation.admin import commit_state
from services.personalization.harness import Harness, serving
from services.settings import PFISettings, ServeSettings
from services.store.versions import VersionStore
from tests.support.federations import global_state, new_federation, random_delta, shapes_of

pytestmark = pytest.mark.integration

TEXT = "To be, or not to be, that is the question."
NLL_TOL = 1e-4


@pytest.fixture(scope="module")
def tiny() -> BaseModel:
    return load_base_model("pfi/tiny-llama")


@pytest.fixture
def settings(redis_url: str, kafka_bootstrap: str) -> PFISettings:
    return PFISettings(redis_url=redis_url, kafka_bootstrap_servers=kafka_bootstrap)


@pytest.fixture
async def fed(redis_client: Redis) -> FederationSpec:
    """A federation whose latest global (v1) is a non-trivial adapter (v0 has B = 0: a no-op)."""
    store = VersionStore(redis_client)
    spec = await new_federation(store)
    shapes = shapes_of(await global_state(store, spec.name))
    await commit_state(store, spec, random_delta(shapes, seed=11, scale=0.5))
    return spec


@pytest.fixture
async def h(settings: PFISettings, fed: FederationSpec) -> AsyncIterator[Harness]:
    async with serving(settings, ServeSettings(), federation=fed.name) as harness:
        yield harness


async def served_nll(h: Harness, fed: str, user: str, **body: Any) -> tuple[float, int | None]:
    response = await h.client.post(
        f"/v1/federations/{fed}/score", json={"texts": [TEXT], **body}, headers=h.auth(user)
    )
    assert response.status_code == 200, response.text
    out = response.json()
    return float(out["results"][0]["mean_nll"]), out["global_version"]


def peft_nll(base: BaseModel, directory: Path) -> float:
    model = PeftModel.from_pretrained(copy.deepcopy(base.model), str(directory))
    model.eval()
    ids = base.tokenizer.encode(TEXT)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return float(F.cross_entropy(logits[:-1], torch.tensor(ids[1:])))


def unzip(body: bytes, into: Path) -> Path:
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        names = archive.namelist()
        assert all("/" not in n for n in names)
        archive.extractall(into)
    return into


# ------------------------------------------------------------------------------------------------ route


async def test_personal_export_loads_in_peft_and_scores_like_the_service(
    h: Harness, fed: FederationSpec, tiny: BaseModel, tmp_path: Path
) -> None:
    name = fed.name
    shapes = shapes_of(await global_state(VersionStore(h.service.engine.redis), name))
    personal = random_delta(shapes, seed=12, scale=0.5)
    await upload_personal_adapter(
        h.client, h.token("alice"), name, "alice", personal, trained_against=1, gate=0.5
    )

    response = await h.client.get(
        f"/v1/federations/{name}/users/alice/adapter/export", headers=h.auth("alice")
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    assert (response.headers["X-PFI-Global-Version"], response.headers["X-PFI-Personal-Adapter-Version"]) == (
        "1",
        "1",
    )
    directory = unzip(response.content, tmp_path / "alice")
    assert sorted(p.name for p in directory.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, PROVENANCE_FILE])
    config = json.loads((directory / CONFIG_FILE).read_text())
    assert (config["r"], config["lora_alpha"]) == (2 * fed.lora.rank, 2 * fed.lora.alpha)
    facts = json.loads((directory / PROVENANCE_FILE).read_text())
    assert (facts["adapter"], facts["global_version"], facts["gate"], facts["user_id"]) == (
        "personal+global",
        1,
        0.5,
        "alice",
    )

    served, version = await served_nll(h, name, "alice")
    global_only, _ = await served_nll(h, name, "alice", use_personal=False)
    assert version == 1
    exported = peft_nll(tiny, directory)
    assert abs(exported - served) < NLL_TOL
    assert abs(served - global_only) > 10 * NLL_TOL  # the personal part matters: this is not the global

    alone = await h.client.get(
        f"/v1/federations/{name}/users/alice/adapter/export",
        params={"include_global": "false"},
        headers=h.auth("alice"),
    )
    assert alone.status_code == 200, alone.text
    tensors = load_file(unzip(alone.content, tmp_path / "alone") / WEIGHTS_FILE)
    assert tensors.keys() == personal.keys()
    assert all(torch.equal(tensors[k], personal[k]) for k in personal)
    assert alone.headers["X-PFI-Global-Version"] == "None"

    gguf = await h.client.get(
        f"/v1/federations/{name}/users/alice/adapter/export",
        params={"format": "gguf"},
        headers=h.auth("alice"),
    )
    assert gguf.status_code == 200, gguf.text
    reader = GGUFReader(unzip(gguf.content, tmp_path / "gguf") / GGUF_FILE)
    general_type = reader.get_field("general.type")
    assert general_type is not None
    assert general_type.contents() == "adapter"
    assert {t.name for t in reader.tensors} >= {"blk.0.attn_q.weight.lora_a", "blk.1.attn_v.weight.lora_b"}


async def test_export_route_respects_isolation_and_refuses_bad_requests(
    h: Harness, fed: FederationSpec
) -> None:
    name = fed.name
    shapes = shapes_of(await global_state(VersionStore(h.service.engine.redis), name))
    await upload_personal_adapter(
        h.client, h.token("alice"), name, "alice", random_delta(shapes, seed=13), trained_against=1
    )
    url = f"/v1/federations/{name}/users/alice/adapter/export"

    stolen = await h.client.get(url, headers=h.auth("bob"))
    assert stolen.status_code == 403, stolen.text
    assert stolen.json()["error"]["code"] == "forbidden"
    assert (await h.client.get(url)).status_code == 401
    other_fed = await h.client.get(
        url, headers={"Authorization": f"Bearer {h.token('alice', federation='other')}"}
    )
    assert other_fed.status_code == 403
    assert (await h.client.get(url, headers=h.auth("root", admin=True))).status_code == 200
    none = await h.client.get(f"/v1/federations/{name}/users/bob/adapter/export", headers=h.auth("bob"))
    assert none.status_code == 404, none.text
    bad = await h.client.get(url, params={"format": "onnx"}, headers=h.auth("alice"))
    assert bad.status_code == 422
    assert bad.json()["error"]["code"] == "invalid_request"
    missing = await h.client.get(
        f"/v1/federations/fed-{uuid.uuid4().hex[:8]}/users/alice/adapter/export", headers=h.auth("alice")
    )
    assert missing.status_code == 403  # the token is of another federation: nothing is looked up


# ------------------------------------------------------------------------------------------------ CLI


def _pfi(settings: PFISettings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PFI_REDIS_URL": settings.redis(),
        "PFI_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap(),
        "OMP_NUM_THREADS": "2",
    }
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )


async def test_cli_export_import_round_trip_and_service_scores(
    settings: PFISettings, h: Harness, fed: FederationSpec, tiny: BaseModel, tmp_path: Path
) -> None:
    out = tmp_path / "v1"
    done = _pfi(settings, "federation", "export", fed.name, "--format", "peft", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert f"exported {fed.name} v1" in done.stdout
    served, version = await served_nll(h, fed.name, "bob", use_personal=False)
    assert version == 1
    assert abs(peft_nll(tiny, out) - served) < NLL_TOL

    store = VersionStore(h.service.engine.redis)
    with pytest.raises(ConfigError, match="not empty"):
        await export_global(store, fed.name, out)
    again = await export_global(store, fed.name, out, version=0, force=True)
    assert again.version == 0
    gguf = await export_global(store, fed.name, tmp_path / "gguf", fmt="gguf")
    assert gguf.files == (GGUF_FILE, PROVENANCE_FILE)
    tensors = GGUFReader(tmp_path / "gguf" / GGUF_FILE).tensors
    assert len(tensors) == len(await global_state(store, fed.name))  # lora_a/lora_b per lora_A/lora_B
    await export_global(store, fed.name, out, version=1, force=True)

    name = f"imp-{uuid.uuid4().hex[:6]}"
    tiny_spec = FederationSpec(name=name, base_model="pfi/tiny-llama")
    with pytest.raises(ConfigError, match="rank 8 != adapter r 4"):  # what `--rank 8` checks
        await create_from_peft(store, tiny_spec, out, given={"rank": 8})
    assert await store.get_spec(name) is None  # nothing written

    created = _pfi(
        settings, "federation", "create", name, "--base-model", "pfi/tiny-llama", "--init-adapter", str(out)
    )
    assert created.returncode == 0, created.stderr
    spec = await store.require_spec(name)
    assert (spec.lora.rank, spec.lora.alpha, set(spec.lora.target_modules)) == (4, 8.0, {"q_proj", "v_proj"})
    original = await global_state(store, fed.name, 1)
    imported = await global_state(store, name, 0)
    assert all(torch.equal(imported[k], original[k]) for k in original)

    back = tmp_path / "back"
    await export_global(store, name, back)
    first, second = load_file(out / WEIGHTS_FILE), load_file(back / WEIGHTS_FILE)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert json.loads((back / PROVENANCE_FILE).read_text())["federation"] == name
