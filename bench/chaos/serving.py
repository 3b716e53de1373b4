"""Chaos of the personalization service: ``kill -9`` of a ``pfi serve`` process during a loop of HTTP
requests, restarted at once (as a supervisor would); a new global version is published while it is
down. Measured: seconds from the kill until it answers 200 again, and whether that answer (and every
later one) serves the latest global version.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import torch
from redis.asyncio import Redis

from bench.chaos.ledger import create_federations, random_delta
from bench.chaos.processes import AggregatorProcess, ChaosError, settings_env
from bench.chaos.stack import ChaosStack
from modeling.blobs import BLOB_ENCODING
from schemas.codec import decode_tensors
from schemas.events import FederationSpec
from services.federation.admin import commit_state
from services.personalization.auth import TokenSigner
from services.stack.processes import free_ports, pfi_command
from services.store.versions import VersionStore

Echo = Callable[[str], None]
TEXT = "Now is the winter of our discontent made glorious summer."


@dataclass
class ServeResult:
    name: str = "serve-kill9"
    trials: int = 0
    cold_start_s: float = 0.0
    recovery_s: list[float] = field(default_factory=list)  # kill -> first 200 of the new process
    stale_after_recovery: int = 0  # 200s after a recovery that served an older version than the latest
    requests_ok: int = 0
    requests_failed: int = 0  # while down (connection refused/reset): expected
    unexpected_status: dict[str, int] = field(default_factory=dict)  # non-200 HTTP answers
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    bound_s: float = 60.0  # recovery within this is a pass (a correctness bound)

    def ok(self, bound_s: float | None = None) -> bool:
        bound_s = self.bound_s if bound_s is None else bound_s
        return (
            len(self.recovery_s) == self.trials > 0
            and max(self.recovery_s) <= bound_s
            and self.stale_after_recovery == 0
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ok": self.ok(),
            "trials": self.trials,
            "cold_start_s": round(self.cold_start_s, 3),
            "recovery_s": [round(x, 3) for x in self.recovery_s],
            "recovery_s_max": round(max(self.recovery_s), 3) if self.recovery_s else None,
            "stale_after_recovery": self.stale_after_recovery,
            "requests_ok": self.requests_ok,
            "requests_failed": self.requests_failed,
            "unexpected_status": dict(self.unexpected_status),
            "elapsed_s": round(self.elapsed_s, 2),
            "notes": self.notes[-40:],
        }


class _Loop:
    """Clients scoring in a loop; keeps (start time, finish time, HTTP status or 0, served version)."""

    def __init__(self, url: str, fed: str, token: str, clients: int) -> None:
        self.url = f"{url}/v1/federations/{fed}/score"
        self.headers = {"Authorization": f"Bearer {token}"}
        self.seen: list[tuple[float, float, int, int | None]] = []
        self.stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._client()) for _ in range(clients)]

    async def _client(self) -> None:
        async with httpx.AsyncClient(timeout=30.0) as client:
            while not self.stop.is_set():
                began = time.monotonic()
                try:
                    response = await client.post(self.url, json={"texts": [TEXT]}, headers=self.headers)
                except httpx.HTTPError:
                    self.seen.append((began, time.monotonic(), 0, None))
                    await asyncio.sleep(0.1)
                    continue
                version = response.json().get("global_version") if response.status_code == 200 else None
                self.seen.append((began, time.monotonic(), response.status_code, version))
                if response.status_code != 200:
                    await asyncio.sleep(0.1)

    def first_ok_after(self, t: float) -> tuple[float, int | None] | None:
        """(finish time, version) of the first 200 of a request sent after ``t``."""
        return next(((end, v) for began, end, code, v in self.seen if began > t and code == 200), None)

    async def close(self) -> None:
        self.stop.set()
        for task in self._tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 40)


async def _publish(store: VersionStore, spec: FederationSpec, seed: int) -> int:
    """Commit the latest state plus a visible random step as the next version; returns its number."""
    latest = await store.latest(spec.name)
    blob = await store.get_blob(spec.name, latest or 0)
    assert blob is not None
    state: dict[str, torch.Tensor] = decode_tensors(blob, BLOB_ENCODING, max_decoded_bytes=1 << 30)
    step = random_delta({k: tuple(v.shape) for k, v in state.items()}, seed=seed, scale=0.3)
    meta = await commit_state(store, spec, {k: v + step[k] for k, v in state.items()}, source="pfi://chaos")
    return meta.version


async def kill9_serve(
    stack: ChaosStack,
    *,
    trials: int,
    seed: int,
    echo: Echo = print,
    clients: int = 2,
    start_timeout_s: float = 180.0,
) -> ServeResult:
    rng = random.Random(seed)
    result = ServeResult()
    started = time.monotonic()

    def note(line: str) -> None:
        stamped = f"{time.monotonic() - started:6.1f}s {line}"
        result.notes.append(stamped)
        echo(f"[serve-kill9] {stamped}")

    settings = await stack.scenario_settings("serve")
    redis = Redis.from_url(settings.redis())
    store = VersionStore(redis)
    processes: list[AggregatorProcess] = []
    loop: _Loop | None = None
    try:
        specs, _, _ = await create_federations(store, redis, [f"serve-{secrets.token_hex(4)}"], 0)
        spec = specs[0]
        latest = await _publish(store, spec, rng.randrange(1 << 30))
        secret = secrets.token_hex(32)
        port = free_ports(1)[0]
        env = settings_env(settings) | {
            "PFI_SERVE_PORT": str(port),
            "PFI_SERVE_TOKEN_SECRET": secret,
            "PFI_SERVE_FEDERATIONS": spec.name,
            "PFI_SERVE_TORCH_THREADS": "1",
        }

        def spawn() -> AggregatorProcess:
            name = f"serve-{len(processes)}"
            proc = AggregatorProcess(name, env, stack.logs / f"{name}.log", command=pfi_command("serve"))
            processes.append(proc)
            return proc.start()

        token = TokenSigner(secret.encode()).issue("chaos-user", ttl_s=3600, federation=spec.name)
        current = spawn()
        loop = _Loop(f"http://127.0.0.1:{port}", spec.name, token, clients)
        first = await _wait_ok(loop, current, current.started_at, start_timeout_s)
        result.cold_start_s = first[0] - current.started_at
        note(f"{current.name} serving v{first[1]} after a cold start of {result.cold_start_s:.1f}s")
        for trial in range(trials):
            await asyncio.sleep(rng.uniform(1.0, 4.0))
            killed_at = time.monotonic()
            current.kill9()
            latest = await _publish(store, spec, rng.randrange(1 << 30))  # published while it is down
            current = spawn()  # the supervisor restarts it at once
            back = await _wait_ok(loop, current, killed_at, start_timeout_s)
            result.trials += 1
            result.recovery_s.append(back[0] - killed_at)
            if back[1] != latest:
                result.stale_after_recovery += 1
            note(
                f"trial {trial}: back after {back[0] - killed_at:.1f}s serving v{back[1]} (latest v{latest})"
            )
        await asyncio.sleep(1.0)
        end = time.monotonic()
        late = [v for began, _, code, v in loop.seen if code == 200 and began > end - 0.8]
        result.stale_after_recovery += sum(1 for v in late if v != latest)
    finally:
        if loop is not None:
            await loop.close()
            for _, _, code, _ in loop.seen:
                if code == 200:
                    result.requests_ok += 1
                elif code == 0:
                    result.requests_failed += 1
                else:
                    result.unexpected_status[str(code)] = result.unexpected_status.get(str(code), 0) + 1
        for proc in processes:
            if proc.alive():
                with contextlib.suppress(Exception):
                    await proc.terminate(timeout_s=30)
            proc.kill9()
        await redis.aclose()
        result.elapsed_s = time.monotonic() - started
    return result


async def _wait_ok(
    loop: _Loop, proc: AggregatorProcess, since: float, within: float
) -> tuple[float, int | None]:
    """The first 200 the loop got after ``since`` (time, served version)."""
    while True:
        found = loop.first_ok_after(since)
        if found is not None:
            return found
        if not proc.alive():
            raise ChaosError(f"{proc.name} exited ({proc.returncode()}); log {proc.log_path}")
        if time.monotonic() - since > within:
            raise ChaosError(f"{proc.name} served no 200 within {within:.0f}s; log {proc.log_path}")
        await asyncio.sleep(0.05)
