"""The `pfi federation` commands against the real Redis (`pfi clients` / `pfi token`: test_identity)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from services.settings import PFISettings

pytestmark = pytest.mark.integration


def _pfi(settings: PFISettings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PFI_REDIS_URL": settings.redis(),
        "PFI_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap(),
        "PFI_TOPIC_PREFIX": settings.topic_prefix,
    }
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_federation_lifecycle_through_the_cli(pfi_settings: PFISettings, tmp_path: Path) -> None:
    name = f"cli-{uuid.uuid4().hex[:6]}"
    created = _pfi(
        pfi_settings,
        "federation",
        "create",
        name,
        "--base-model",
        "pfi/tiny-llama",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--target-modules",
        "q_proj,k_proj,v_proj",
        "--buffer-size",
        "2",
    )
    assert created.returncode == 0, created.stderr
    assert f"created federation '{name}'" in created.stdout

    again = _pfi(pfi_settings, "federation", "create", name, "--base-model", "pfi/tiny-llama")
    assert again.returncode == 1
    assert "already exists" in again.stderr

    listed = json.loads(_pfi(pfi_settings, "federation", "list", "--json").stdout)
    assert {"name": name, "version": 0, "base_model": "pfi/tiny-llama"} in listed

    status = json.loads(_pfi(pfi_settings, "federation", "status", name, "--json").stdout)
    assert status["version"] == 0
    assert status["spec"]["lora"]["target_modules"] == ["q_proj", "k_proj", "v_proj"]
    assert status["spec"]["aggregation"]["buffer_size"] == 2
    for field in (
        "updates_accepted_total",
        "updates_aggregated_total",
        "updates_rejected_total",
        "last_version_at",
        "versions",
    ):
        assert field in status
    assert status["versions"][0]["num_updates"] == 0
    assert status["versions"][0]["update_ids"] == []

    missing = _pfi(pfi_settings, "federation", "rollback", name, "--to", "7")
    assert missing.returncode == 1
    assert "no version 7" in missing.stderr

    unknown = _pfi(pfi_settings, "federation", "status", "no-such-fed", "--json")
    assert unknown.returncode == 1
    assert "does not exist" in unknown.stderr


def test_create_from_spec_file_and_bad_spec(pfi_settings: PFISettings, tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.json"
    name = f"spec-{uuid.uuid4().hex[:6]}"
    spec_file.write_text(
        json.dumps(
            {
                "name": name,
                "base_model": "pfi/tiny-llama",
                "lora": {"rank": 2},
                "aggregation": {"lora_mode": "ffa"},
            }
        )
    )
    ok = _pfi(pfi_settings, "federation", "create", "--spec", str(spec_file))
    assert ok.returncode == 0, ok.stderr
    status = json.loads(_pfi(pfi_settings, "federation", "status", name, "--json").stdout)
    assert status["spec"]["aggregation"]["lora_mode"] == "ffa"

    spec_file.write_text("{not json")
    bad = _pfi(pfi_settings, "federation", "create", "--spec", str(spec_file))
    assert bad.returncode == 1
    assert "cannot read spec file" in bad.stderr
