"""Process control shared by the local stack, the demo, the benchmarks, chaos runs and the tests.

* **pids** of detached processes (the stack's Kafka and Redis, which outlive the ``pfi`` command that
  started them): :func:`pid_alive`, :func:`find_pids` (by command-line markers), :func:`spawn_detached`,
  :func:`signal_process`, :func:`stop_pids` (SIGTERM, wait, SIGKILL, make sure they are gone);
* **child services** of a harness (``pfi aggregator``, ``pfi serve``): :class:`ServiceProcess`, one OS
  process in its own session, configured only through ``PFI_*`` variables (:func:`child_env`), logging
  to a file, dying with its parent (``PR_SET_PDEATHSIG``), waited for on ``/readyz``;
* free loopback ports, the ``pfi`` command, and memory figures (:func:`peak_rss_bytes`, :func:`rss_bytes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Self

from schemas.errors import PFIError, StackError
from services.settings import PFISettings
from services.transport import kafka_env

Echo = Callable[[str], None]

REPO_ROOT = Path(__file__).resolve().parents[2]
LOG_ROTATE_BYTES = 64 * 1024 * 1024

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

# Children started by this process, kept so that they are reaped (no zombies, no ResourceWarning).
_children: dict[int, subprocess.Popen[bytes]] = {}


class ServiceError(PFIError):
    """A service process did not start, became unhealthy or exited."""


# ------------------------------------------------------------------------------------------- pids


def _reap(pid: int) -> None:
    child = _children.get(pid)
    if child is not None:
        if child.poll() is not None:
            _children.pop(pid, None)
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def forget(pid: int) -> None:
    """Stop tracking a child started by :func:`spawn_detached` (it is gone)."""
    _children.pop(pid, None)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` is a live process (zombies count as gone; our own are reaped)."""
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def matches(pid: int, markers: Sequence[str]) -> bool:
    """Every marker is an argument (or a program's base name, or ends a rewritten process title).

    Whole arguments, not substrings: ``/pfi/stack/...`` must not match ``/tmp/pfi/stack/...``.
    """
    args = _cmdline(pid)
    if not args:
        return False
    title = " ".join(args).strip()  # redis-server rewrites its argv into one title string

    program = title.split(" ", 1)[0]

    def found(marker: str) -> bool:
        if any(a == marker or a.endswith("/" + marker) for a in args):
            return True
        return program.endswith("/" + marker) or program == marker or title.endswith(" " + marker)

    return all(found(m) for m in markers)


def find_pids(markers: Sequence[str]) -> list[int]:
    """Live processes whose command line holds every marker."""
    found = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != me:
            pid = int(entry.name)
            if matches(pid, markers) and pid_alive(pid):
                found.append(pid)
    return sorted(found)


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _rotate(log: Path) -> None:
    with contextlib.suppress(OSError):
        if log.stat().st_size > LOG_ROTATE_BYTES:
            log.replace(log.with_name(log.name + ".1"))


def spawn_detached(name: str, cmd: list[str], cwd: Path, log: Path) -> int:
    """Start ``cmd`` in its own session (it outlives us), appending to ``log`` (rotated when large)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    cwd.mkdir(parents=True, exist_ok=True)
    _rotate(log)
    with log.open("ab") as out:
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        out.write(f"\n===== {stamp} pfi stack: starting {name}: {' '.join(cmd)}\n".encode())
        out.flush()
        try:
            child = subprocess.Popen(
                cmd,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as err:
            raise StackError(f"cannot start {name} ({cmd[0]}): {err}") from err
    _children[child.pid] = child
    return child.pid


def signal_process(pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to ``pid``, and to its whole group when it leads one (its children too)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        try:
            group = os.getpgid(pid)
        except ProcessLookupError:
            return
        if group == pid:  # our own session: signal children too
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def log_tail(log: Path, lines: int = 15) -> str:
    """The last lines of ``log`` since its last ``=====`` start marker."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    start = text.rfind("===== ")
    tail = [line for line in text[max(start, 0) :].splitlines() if line.strip()][-lines:]
    return "\n    ".join(tail)


async def stop_pids(pids: dict[int, str], echo: Echo, timeouts: Mapping[str, float]) -> None:
    """SIGTERM, wait (``timeouts`` per name), SIGKILL, then make sure every pid is gone."""
    for pid, name in pids.items():
        echo(f"{name}: stopping pid {pid} (SIGTERM)")
        signal_process(pid, signal.SIGTERM)
    start = time.monotonic()
    killed: dict[int, float] = {}  # pid -> when SIGKILL was sent
    remaining = dict(pids)
    while True:
        remaining = {pid: name for pid, name in remaining.items() if pid_alive(pid)}
        if not remaining:
            break
        now = time.monotonic()
        for pid, name in remaining.items():
            if pid not in killed and now - start > timeouts[name]:
                echo(f"{name}: pid {pid} ignored SIGTERM for {timeouts[name]:.0f}s, sending SIGKILL")
                signal_process(pid, signal.SIGKILL)
                killed[pid] = now
            elif pid in killed and now - killed[pid] > 10.0:
                raise StackError(f"{name}: pid {pid} is still alive 10s after SIGKILL")
        await asyncio.sleep(0.1)
    for pid, name in pids.items():
        forget(pid)
        echo(f"{name}: stopped (pid {pid})")
    echo(f"stack: stopped in {time.monotonic() - start:.1f}s")


# --------------------------------------------------------------------------------- child services


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
    """One child service in its own session (signals reach it alone), output to ``log_path``; ``url``
    (when given) answers ``/readyz`` once it is ready."""

    def __init__(
        self, name: str, command: list[str], env: dict[str, str], log_path: Path, url: str = ""
    ) -> None:
        self.name = name
        self.command = command
        self.env = env
        self.log_path = log_path
        self.url = url.rstrip("/")
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.started_at = 0.0
        self.exit_signal: str | None = None  # how we ended it: "SIGKILL", "SIGTERM"

    def start(self) -> Self:
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

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 12) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def describe(self, tail_lines: int = 150) -> str:
        """A header (pid, exit status, how it ended) and the last lines of the log."""
        lines = self.log_text().splitlines()
        shown = lines[-tail_lines:]
        head = (
            f"===== {self.name} pid={self.pid} rc={self.returncode()} "
            f"ended_by={self.exit_signal} log={self.log_path} ({len(lines)} lines"
            f"{', last ' + str(len(shown)) if len(shown) < len(lines) else ''}) ====="
        )
        return "\n".join([head, *shown])

    def check(self) -> None:
        """Raise :class:`ServiceError` when the process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise ServiceError(
                f"{self.name} exited with status {self.proc.returncode}; log {self.log_path}:\n{self.tail()}"
            )

    async def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        """Poll ``/readyz`` until it answers 200; raises :class:`ServiceError` on exit or timeout."""
        import httpx  # here: the stack and the wall-clock simulator never need an HTTP client

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
            self._close_log()

    def kill9(self) -> None:
        """SIGKILL the process alone (no shutdown code runs) and reap it."""
        if self.proc is not None and self.alive():
            self.exit_signal = "SIGKILL"
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
        self._reap(10.0)

    async def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM the process alone (graceful shutdown) and wait for its exit; SIGKILL (and
        :meth:`failure`) when it does not come within ``timeout_s``."""
        if self.proc is None:
            raise self.failure(f"{self.name} was never started")
        if self.alive():
            self.exit_signal = "SIGTERM"
            self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.alive() or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        if self.alive():
            self.kill9()
            raise self.failure(f"{self.name} ignored SIGTERM for {timeout_s:.0f}s (killed)")
        self._reap(1.0)
        code = self.returncode()
        assert code is not None
        return code

    def failure(self, message: str) -> Exception:
        """The error a failed wait raises (a harness may raise its own type)."""
        return ServiceError(message)

    def _reap(self, timeout_s: float) -> None:
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout_s)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


# ----------------------------------------------------------------------------------------- memory


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def rss_bytes(pid: int) -> int:
    """The current resident set size of ``pid`` (Linux ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ServiceError(f"no VmRSS for pid {pid}")
