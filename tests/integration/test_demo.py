"""``pfi demo`` end to end on the tiny model: the same code path as ``make demo`` (real Kafka topics, the
``pfi aggregator`` and ``pfi serve`` processes, edge agents, scoring through the service), checked on
the report it writes and on the processes it leaves behind (none)."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.stack import processes
from services.stack.components import StackStatus

pytestmark = [pytest.mark.integration, pytest.mark.timeout(480)]

ROOT = Path(__file__).resolve().parents[2]
STYLES = {
    "ann": "the quick brown fox jumps over the lazy dog",
    "bob": "zzz yyy xxx www vvv uuu ttt sss",
    "cid": "0123 4567 89 0123 4567 89 42 42",
    "dee": "HELLO WORLD SHOUTING IN CAPITALS ALWAYS",
    "eve": "la li lo lu la li lo lu",
}
TINY_ARGS = [
    "--base-model", "pfi/tiny-llama", "--rounds", "2", "--steps", "3", "--lr", "5e-3",
    "--personal-lr", "5e-3", "--eval-chunks", "2", "--seed", "1", "--personal-steps", "4",
]  # fmt: skip
_PID = re.compile(r"(aggregator|serve): pid (\d+)")


def user_dir(root: Path) -> Path:
    """``<user>.txt`` files, each user with a distinct little style (a non-IID toy corpus)."""
    root.mkdir(parents=True, exist_ok=True)
    for user, style in STYLES.items():
        rng = random.Random(user)
        words = style.split()
        paragraphs = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))) + "." for _ in range(60)]
        (root / f"{user}.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")
    return root


def demo_env(redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PFI_")}
    env["PFI_REDIS_URL"] = redis_url  # the test database; Kafka: the local stack
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def pfi(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *args]


def child_pids(output: str) -> dict[str, int]:
    return {name: int(pid) for name, pid in _PID.findall(output)}


def assert_gone(pids: dict[str, int], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    for name, pid in pids.items():
        while processes.pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not processes.pid_alive(pid), f"the demo left its {name} process {pid} running"


def test_tiny_demo_writes_the_report_and_personalization_helps(
    stack: StackStatus, redis_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    data = user_dir(tmp_path / "users")
    proc = subprocess.run(
        pfi("demo", *TINY_ARGS, "--data", str(data), "--users", "5", "--out", str(out)),
        cwd=ROOT,
        env=demo_env(redis_url),
        capture_output=True,
        text=True,
        timeout=420,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    pids = child_pids(output)
    assert set(pids) == {"aggregator", "serve"}, output[-2000:]
    assert_gone(pids)
    assert "personalized vs global-only" in proc.stdout  # the summary table

    files = ["report.json", "report.md", "per_user_ppl.png", "per_user_gain.png", "loss_vs_time.png",
             "staleness.png", "version_timeline.png", "logs/aggregator.log", "logs/serve.log"]  # fmt: skip
    for name in files:
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    summary = report["summary"]
    for key in ("rel_gain_personalized_vs_global", "rel_gain_personalized_vs_local", "async_vs_sync_speedup"):
        assert key in summary, key
    variants = {"base", "local", "global", "personalized_ungated", "personalized", "global_rag",
                "personalized_rag", "async_global", "async_personalized"}  # fmt: skip
    versus = {"personalized_ungated", "personalized", "global_rag", "personalized_rag"}
    assert set(summary["worst10_nll"]) == variants
    assert set(summary["worst10_ppl"]) == variants
    for key in ("median_ppl_reduction_vs_global", "share_users_improved", "share_users_harmed"):
        assert set(summary[key]) == versus, key
    for variant in versus:
        assert 0.0 <= summary["share_users_improved"][variant] <= 1.0
        assert 0.0 <= summary["share_users_harmed"][variant] <= 1.0 - summary["share_users_improved"][variant]
        assert summary["median_ppl_reduction_vs_global"][variant] < 1.0
    assert report["personalization_recipe"]["steps"] >= 1
    assert len(report["users"]) == 5
    for row in report["users"]:
        assert set(row["nll"]) == variants
        assert row["served"]["personalized"]["personal_adapter_version"] is not None
        # the gate the device chose is what the service stored, and never worse on its validation text
        assert row["served"]["personal_adapter"]["gate"] == row["gate"]
        losses = row["val_nll_by_gate"]
        assert losses[f"{row['gate']:g}"] <= losses["0"]
        if row["gate"] == 0.0:  # gated off: served exactly as global-only
            assert row["nll"]["personalized"] == row["nll"]["global"]
        # retrieval found the user's training text and prepended it; the held-out text is not in the store
        for variant in ("global_rag", "personalized_rag"):
            served = row["served"][variant]
            assert len(served["hits"]) == row["heldout_chunks"]
            assert all(h >= 1 for h in served["hits"])
            assert all(t > 0 for t in served["context_tokens"])
        assert (
            row["served"]["documents"]["chars"]
            <= row["train_chars"] + 8 * row["served"]["documents"]["documents"]
        )
    # Sync sent rounds x users real updates, one version per round; async ran until it matched the
    # sync run's best loss or hit its cap (1.5x); every update of a version is a real, accepted update.
    sync, asyn = report["runs"]["sync"], report["runs"]["async"]
    assert sync["updates"] == 10
    assert sync["versions"] == 2
    assert 4 <= asyn["updates"] <= 15
    assert asyn["versions"] == asyn["updates"] // 4
    for run in (sync, asyn):
        assert sum(len(v["updates"]) for v in run["version_meta"]) == run["versions"] * run["buffer_size"]
        assert run["curve"][0]["version"] == 0
        assert run["curve"][-1]["version"] == run["versions"]
    assert asyn["reached_sync_best"] or asyn["updates"] == 15
    # The toy users write in very different styles: their own adapter must help on their held-out text.
    assert summary["mean_nll"]["personalized"] < summary["mean_nll"]["global"]
    assert summary["rel_gain_personalized_vs_global"] > 0
    assert summary["mean_nll"]["global"] < summary["mean_nll"]["base"]
    text = (out / "report.md").read_text()
    assert "## Discussion" in text
    assert "## Personalization: which component gives how much" in text
    assert "loss_vs_time.png" in text
    assert "per_user_ppl.png" in text


def test_sigterm_stops_the_demo_and_its_processes(stack: StackStatus, redis_url: str, tmp_path: Path) -> None:
    data = user_dir(tmp_path / "users")
    log = tmp_path / "demo.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            pfi("demo", *TINY_ARGS, "--data", str(data), "--users", "5", "--out", str(tmp_path / "r")),
            cwd=ROOT,
            env=demo_env(redis_url),
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 120
            while "serve: ready" not in log.read_text() and time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.1)
            assert "serve: ready" in log.read_text()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
    output = log.read_text()
    assert code == 1, output[-3000:]
    assert "interrupted" in output
    assert_gone(child_pids(output))
