"""Edge devices in tests: agents that enroll through the real personalization app (in-process, or a
``pfi serve`` subprocess) and upload through its ingest route."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from clients.agent import AgentOptions, EdgeAgent
from clients.credentials import credential_path
from clients.enrollment import DeviceIdentity
from clients.http_source import HttpGlobalSource
from clients.outbox import Outbox
from clients.settings import EdgeSettings
from clients.training import AdapterTrainer
from clients.uploader import HttpUpdateSender
from services.personalization.harness import BASE_URL, Harness
from services.settings import PFISettings
from services.stack.processes import free_port
from services.transport import kafka_env

ROOT = Path(__file__).resolve().parents[2]


class Devices:
    """Edge agents of an in-process service: each enrolls once (its credential under ``root/<state>``)
    and later instances of the same user load the stored credential, as a restarted device would."""

    def __init__(self, h: Harness, trainer: AdapterTrainer, root: Path) -> None:
        self.h = h
        self.trainer = trainer
        self.root = root
        self.identities: list[DeviceIdentity] = []

    async def identity(self, federation: str, user: str, state_dir: Path, **edge: object) -> DeviceIdentity:
        settings = EdgeSettings(service_url=BASE_URL, state_dir=state_dir, **edge)  # type: ignore[arg-type]
        if not credential_path(state_dir, federation, user).exists():
            issued = await self.h.service.enrollment.issue(federation, uses=1, ttl_s=120)
            settings = settings.model_copy(update={"enrollment_token": issued.token})
        identity = await DeviceIdentity.obtain(settings, federation, user, client=self.h.client)
        self.identities.append(identity)
        return identity

    async def make(
        self,
        federation: str,
        user: str,
        *,
        options: AgentOptions | None = None,
        state: str = "state",
        edge: EdgeSettings | None = None,
    ) -> EdgeAgent:
        state_dir = self.root / state
        identity = await self.identity(federation, user, state_dir)
        source = HttpGlobalSource(BASE_URL, identity.token, client=self.h.client)
        sender = HttpUpdateSender(BASE_URL, identity.token, refresh=identity.refresh, client=self.h.client)
        return EdgeAgent(
            federation,
            user,
            identity.key,
            source,
            self.trainer,
            Outbox(state_dir / user / "outbox"),
            sender,
            state_dir,
            options or AgentOptions(),
            edge_settings=edge or EdgeSettings(),
        )


@contextlib.asynccontextmanager
async def serve_process(settings: PFISettings, home: Path, timeout_s: float = 120.0) -> AsyncIterator[str]:
    """``pfi serve`` on a free port (its own ``PFI_HOME``, the test's Redis, Kafka and topics); yields
    its base URL once ``/healthz`` answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PFI_")}
    env.update(
        PFI_REDIS_URL=settings.redis(),
        PFI_TOPIC_PREFIX=settings.topic_prefix,
        **kafka_env(settings),
        PFI_HOME=str(home),
    )
    home.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before the process starts
    log_path = home / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(  # noqa: ASYNC220 - started once; everything after it awaits
            [sys.executable, "-m", "cli.main", "serve", "--port", str(port)],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            deadline = time.monotonic() + timeout_s
            while True:
                assert proc.poll() is None, log_path.read_text()
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/healthz")).status_code == 200:
                        break
                assert time.monotonic() < deadline, log_path.read_text()
                await asyncio.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 30)
            except subprocess.TimeoutExpired:
                proc.kill()
