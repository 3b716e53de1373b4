"""The demo's service processes: ``pfi aggregator`` and ``pfi serve`` as real OS processes.

Each one runs in its own session (a Ctrl-C in the terminal reaches the demo, which then stops them in
order), is configured only through ``PFI_*`` environment variables, logs to a file in the report
directory, and dies with the demo even when the demo itself is killed (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import httpx

from schemas.errors import PFIError
from services.demo.config import REPO_ROOT
from services.settings import PFISettings
from services.transport import kafka_env

#: ``PFISettings`` fields handed to the children (everything the demo, a benchmark or a test may set).
SETTINGS_FIELDS = (
    "home",
    "topic_prefix",
    "update_partitions",
    "max_update_bytes",
    "max_decoded_bytes",
    "chunk_bytes",
    "kafka_max_message_bytes",
    "chunk_ttl_s",
    "max_inflight_chunk_bytes",
)


class ServiceError(PFIError):
    """A service process did not start, became unhealthy or exited."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports free right now (bound together, then released)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def child_env(settings: PFISettings, **extra: str) -> dict[str, str]:
    """The environment of a child that sees exactly ``settings`` (plus ``extra``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PFI_")}
    env.update(kafka_env(settings))  # bootstrap servers, protocol, credentials file
    env["PFI_REDIS_URL"] = settings.redis()
    for name in SETTINGS_FIELDS:
        value = getattr(settings, name)
        if value is not None:
            env[f"PFI_{name.upper()}"] = str(value)
    env.update(extra)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def pfi_command(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("pfi")
    if script.is_file():
        return [str(script), *args]
    return [sys.executable, "-m", "services.cli", *args]


def die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """In the child before exec: SIGKILL it when its parent dies (Linux), so no service outlives a
    run that was itself killed before its clean-up could run."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class ServiceProcess:
    """One child service; ``url`` answers ``/readyz`` once it is ready."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log_path: Path, url: str) -> None:
        self.name = name
        self.command = command
        self.env = env
        self.log_path = log_path
        self.url = url.rstrip("/")
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> ServiceProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.command,
            cwd=REPO_ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        return self

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 12) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check(self) -> None:
        """Raise :class:`ServiceError` when the process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise ServiceError(
                f"{self.name} exited with status {self.proc.returncode}; log {self.log_path}:\n{self.tail()}"
            )

    async def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        """Poll ``/readyz`` until it answers 200; raises :class:`ServiceError` on exit or timeout."""
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        async with httpx.AsyncClient(timeout=5.0) as client:
            while True:
                self.check()
                try:
                    response = await client.get(f"{self.url}/readyz")
                    if response.status_code == 200:
                        body: dict[str, Any] = response.json()
                        return body
                    last = f"HTTP {response.status_code} {response.text[:200]}"
                except httpx.HTTPError as err:
                    last = f"{type(err).__name__}"
                if time.monotonic() > deadline:
                    raise ServiceError(
                        f"{self.name} not ready after {timeout_s:.0f}s ({last}); log {self.log_path}"
                    )
                await asyncio.sleep(0.5)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM to the process group, then SIGKILL after ``timeout_s``; returns the exit status."""
        proc = self.proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
            return proc.returncode
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
