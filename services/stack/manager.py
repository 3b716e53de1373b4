"""``pfi stack up | down | status``: start, stop and inspect the local Kafka + Redis.

* ``up`` is idempotent: a healthy stack is left alone, a stale pidfile is removed, a running process
  of this stack without a pidfile (one that lost it) is adopted. It waits until both services are
  healthy (Redis answers PING, Kafka answers a metadata request listing a broker) within
  ``settings.stack_start_timeout_s`` and then creates the default topics.
* ``down`` sends SIGTERM to each service's process group, waits, then SIGKILLs, and checks the
  processes are gone; processes of this stack are found by pidfile and by command line.
* ``restart_component_async`` restarts one local component (SIGTERM or SIGKILL), e.g. for chaos runs.
* A component whose address is configured (``PFI_KAFKA_BOOTSTRAP_SERVERS`` / ``PFI_REDIS_URL``) is
  external: never started or stopped, only health-checked.

The processes run detached (own session) so they outlive the ``pfi`` command that started them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from schemas.errors import ConfigError, StackError
from services.settings import PFISettings
from services.stack import broker, keyvalue
from services.stack.topics import ensure_topics
from services.transport import kafka_kwargs

Echo = Callable[[str], None]

LOG_ROTATE_BYTES = 64 * 1024 * 1024
STOP_TIMEOUT_S = {"kafka": 30.0, "redis": 10.0}
PROGRESS_EVERY_S = 5.0

# Children started by this process, kept so that they are reaped (no zombies, no ResourceWarning).
_children: dict[int, subprocess.Popen[bytes]] = {}


# ------------------------------------------------------------------------------------------- status


@dataclass(frozen=True)
class ComponentStatus:
    """One service of the stack as ``status`` sees it."""

    name: str  # "kafka" or "redis"
    up: bool
    address: str  # bootstrap "host:port" (kafka) or "redis://..." (redis)
    external: bool
    pid: int | None = None
    log: Path | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        key = "bootstrap" if self.name == "kafka" else "url"
        return {
            "up": self.up,
            key: self.address,
            "external": self.external,
            "pid": self.pid,
            "log": str(self.log) if self.log is not None else None,
            "error": self.error,
        }


@dataclass(frozen=True)
class StackStatus:
    kafka: ComponentStatus
    redis: ComponentStatus

    @property
    def up(self) -> bool:
        return self.kafka.up and self.redis.up

    def to_dict(self) -> dict[str, Any]:
        return {"kafka": self.kafka.to_dict(), "redis": self.redis.to_dict()}


# ------------------------------------------------------------------------------------- components


@dataclass(frozen=True)
class _Component:
    name: str
    external: bool
    address: str
    ports: tuple[int, ...]
    pidfile: Path
    log: Path
    cwd: Path
    markers: tuple[str, ...]  # all present in the command line of this stack's process
    prepare: Callable[[Echo], list[str]]
    health: Callable[[float], Awaitable[str | None]]


def _components(settings: PFISettings) -> list[_Component]:
    kpaths = broker.kafka_paths(settings)
    rpaths = keyvalue.redis_paths(settings)
    bootstrap = settings.kafka_bootstrap()
    url = settings.redis()
    return [
        _Component(
            name="kafka",
            external=settings.kafka_bootstrap_servers is not None,
            address=bootstrap,
            ports=(settings.kafka_port, settings.kafka_controller_port),
            pidfile=kpaths.pidfile,
            log=kpaths.log,
            cwd=kpaths.root,
            markers=("kafka.Kafka", broker.process_marker(settings)),
            prepare=lambda echo: broker.prepare(settings, echo),
            health=lambda timeout: broker.settings_health(settings, "admin", timeout_s=timeout),
        ),
        _Component(
            name="redis",
            external=settings.redis_url is not None,
            address=url,
            ports=(settings.redis_port,),
            pidfile=rpaths.pidfile,
            log=rpaths.log,
            cwd=rpaths.root,
            markers=("redis-server", keyvalue.process_marker(settings)),
            prepare=lambda echo: keyvalue.prepare(settings, echo),
            health=lambda timeout: keyvalue.redis_health(url, timeout_s=timeout),
        ),
    ]


# -------------------------------------------------------------------------------------- processes


def _reap(pid: int) -> None:
    child = _children.get(pid)
    if child is not None:
        if child.poll() is not None:
            _children.pop(pid, None)
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


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


def _matches(pid: int, markers: Sequence[str]) -> bool:
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
            if _matches(pid, markers) and pid_alive(pid):
                found.append(pid)
    return sorted(found)


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _running_pid(comp: _Component, echo: Echo | None = None) -> int | None:
    """The pid of this stack's process for ``comp``; removes a stale pidfile, adopts an orphan."""
    pid = _read_pid(comp.pidfile)
    if pid is not None and pid_alive(pid) and _matches(pid, comp.markers):
        return pid
    if comp.pidfile.exists() and echo is not None:
        echo(f"{comp.name}: removing stale pidfile {comp.pidfile} (pid {pid} is not running)")
        comp.pidfile.unlink(missing_ok=True)
    orphans = find_pids(comp.markers)
    if orphans:
        if echo is not None:
            echo(f"{comp.name}: found running process {orphans[0]} without pidfile; adopting it")
            comp.pidfile.parent.mkdir(parents=True, exist_ok=True)
            comp.pidfile.write_text(f"{orphans[0]}\n")
        return orphans[0]
    return None


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _rotate(log: Path) -> None:
    with contextlib.suppress(OSError):
        if log.stat().st_size > LOG_ROTATE_BYTES:
            log.replace(log.with_name(log.name + ".1"))


def _spawn(comp: _Component, cmd: list[str]) -> int:
    comp.log.parent.mkdir(parents=True, exist_ok=True)
    comp.cwd.mkdir(parents=True, exist_ok=True)
    _rotate(comp.log)
    with comp.log.open("ab") as out:
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        out.write(f"\n===== {stamp} pfi stack: starting {comp.name}: {' '.join(cmd)}\n".encode())
        out.flush()
        try:
            child = subprocess.Popen(
                cmd,
                cwd=comp.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as err:
            raise StackError(f"cannot start {comp.name} ({cmd[0]}): {err}") from err
    _children[child.pid] = child
    comp.pidfile.parent.mkdir(parents=True, exist_ok=True)
    comp.pidfile.write_text(f"{child.pid}\n")
    return child.pid


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        try:
            group = os.getpgid(pid)
        except ProcessLookupError:
            return
        if group == pid:  # our own session: signal children too
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _log_tail(log: Path, lines: int = 15) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    start = text.rfind("===== ")
    tail = [line for line in text[max(start, 0) :].splitlines() if line.strip()][-lines:]
    return "\n    ".join(tail)


async def _stop_pids(pids: dict[int, str], echo: Echo) -> None:
    """SIGTERM, wait (per-service timeout), SIGKILL, then make sure every pid is gone."""
    for pid, name in pids.items():
        echo(f"{name}: stopping pid {pid} (SIGTERM)")
        _signal(pid, signal.SIGTERM)
    start = time.monotonic()
    killed: dict[int, float] = {}  # pid -> when SIGKILL was sent
    remaining = dict(pids)
    while True:
        remaining = {pid: name for pid, name in remaining.items() if pid_alive(pid)}
        if not remaining:
            break
        now = time.monotonic()
        for pid, name in remaining.items():
            if pid not in killed and now - start > STOP_TIMEOUT_S[name]:
                echo(f"{name}: pid {pid} ignored SIGTERM for {STOP_TIMEOUT_S[name]:.0f}s, sending SIGKILL")
                _signal(pid, signal.SIGKILL)
                killed[pid] = now
            elif pid in killed and now - killed[pid] > 10.0:
                raise StackError(f"{name}: pid {pid} is still alive 10s after SIGKILL")
        await asyncio.sleep(0.1)
    for pid, name in pids.items():
        _children.pop(pid, None)
        echo(f"{name}: stopped (pid {pid})")
    echo(f"stack: stopped in {time.monotonic() - start:.1f}s")


# ------------------------------------------------------------------------------------------ locking


@contextlib.asynccontextmanager
async def _stack_lock(settings: PFISettings, echo: Echo) -> AsyncIterator[None]:
    """One ``up``/``down`` at a time per stack dir (other processes wait)."""
    path = settings.stack_dir / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        told = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if not told:
                    echo(f"stack: waiting for another `pfi stack` command ({path})")
                    told = True
                await asyncio.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------- up


async def _wait_healthy(
    comp: _Component, pid: int | None, deadline: float, timeout_s: float, echo: Echo
) -> None:
    start = time.monotonic()
    last_progress = start
    where = f"{comp.address}" + ("" if comp.external else f" (pid {pid})")
    while True:
        error = await comp.health(min(5.0, max(1.0, deadline - time.monotonic())))
        now = time.monotonic()
        if error is None:
            echo(f"{comp.name}: up at {comp.address} ({now - start:.1f}s)")
            return
        if pid is not None and not pid_alive(pid):
            tail = _log_tail(comp.log)
            raise StackError(
                f"{comp.name} exited during start-up; see {comp.log}"
                + (f"; last lines:\n    {tail}" if tail else "")
            )
        if now > deadline:
            hint = f"external {comp.name} at {comp.address}" if comp.external else f"see {comp.log}"
            raise StackError(f"{comp.name} not healthy after {timeout_s:.0f}s ({error}); {hint}")
        if now - last_progress >= PROGRESS_EVERY_S:
            echo(f"{comp.name}: waiting for {where} ... {now - start:.0f}s ({error})")
            last_progress = now
        await asyncio.sleep(0.25)


async def _upgrade_kafka_auth(settings: PFISettings, comps: Sequence[_Component], echo: Echo) -> None:
    """A local broker whose storage has no (or other) SCRAM users is stopped and its data deleted, so that
    the start below formats it with authentication (local dev data: topics and offsets are lost)."""
    comp = next(c for c in comps if c.name == "kafka")
    if comp.external:
        return
    reason = await asyncio.to_thread(broker.auth_outdated, settings)
    if reason is None:
        return
    echo(f"kafka: {reason}; re-formatting the local broker with SASL/SCRAM + ACLs (its data is deleted)")
    pids = set(find_pids(comp.markers))
    pid = _read_pid(comp.pidfile)
    if pid is not None and pid_alive(pid) and _matches(pid, comp.markers):
        pids.add(pid)
    if pids:
        await _stop_pids({p: comp.name for p in sorted(pids)}, echo)
    comp.pidfile.unlink(missing_ok=True)
    await asyncio.to_thread(broker.reset_storage, settings)


async def up_async(
    settings: PFISettings | None = None,
    *,
    echo: Echo = print,
    topics: bool = True,
    timeout_s: float | None = None,
) -> StackStatus:
    """Bring the stack up (idempotent) and wait until healthy; creates the default topics if ``topics``."""
    settings = settings or PFISettings()
    timeout = timeout_s if timeout_s is not None else settings.stack_start_timeout_s
    comps = _components(settings)
    async with _stack_lock(settings, echo):
        await _upgrade_kafka_auth(settings, comps, echo)
        pids: dict[str, int | None] = {}
        to_start: list[_Component] = []
        # Look first, start later: nothing is started when one component cannot be.
        for comp in comps:
            if comp.external:
                echo(f"{comp.name}: external at {comp.address} (not started here)")
                pids[comp.name] = None
                continue
            pid = _running_pid(comp, echo)
            if pid is not None:
                echo(f"{comp.name}: already running (pid {pid})")
                pids[comp.name] = pid
                continue
            busy = [port for port in comp.ports if _port_in_use(port)]
            if busy:
                raise StackError(
                    f"{comp.name}: port {busy[0]} on 127.0.0.1 is taken by a process this stack did not "
                    f"start ({settings.stack_dir}); stop it, choose other ports (PFI_KAFKA_PORT, "
                    "PFI_KAFKA_CONTROLLER_PORT, PFI_REDIS_PORT) or point PFI_KAFKA_BOOTSTRAP_SERVERS / "
                    "PFI_REDIS_URL at it"
                )
            to_start.append(comp)
        # Jars, binaries, configs, storage format (blocking work: off the event loop).
        commands = {comp.name: await asyncio.to_thread(comp.prepare, echo) for comp in to_start}
        for comp in to_start:
            pid = _spawn(comp, commands[comp.name])
            echo(f"{comp.name}: started (pid {pid}), log {comp.log}")
            pids[comp.name] = pid
        try:  # fail fast: a health probe without credentials would only time out
            kafka_kwargs(settings, "admin")
        except ConfigError as err:
            raise StackError(f"kafka: {err}") from err
        deadline = time.monotonic() + timeout
        await asyncio.gather(*(_wait_healthy(c, pids[c.name], deadline, timeout, echo) for c in comps))
        if topics:
            await ensure_topics(settings, timeout_s=max(30.0, deadline - time.monotonic()))
            names = (settings.updates_topic, settings.dlq_topic, settings.versions_topic)
            echo(f"kafka: topics ready: {', '.join(names)}")
    return await status_async(settings)


async def status_async(settings: PFISettings | None = None, *, timeout_s: float = 3.0) -> StackStatus:
    settings = settings or PFISettings()
    comps = _components(settings)

    async def one(comp: _Component) -> ComponentStatus:
        pid = None if comp.external else _running_pid(comp)
        error = await comp.health(timeout_s)
        if error is not None and not comp.external and pid is None:
            error = "not running"
        return ComponentStatus(
            name=comp.name,
            up=error is None,
            address=comp.address,
            external=comp.external,
            pid=pid,
            log=None if comp.external else comp.log,
            error=error,
        )

    kafka, redis = await asyncio.gather(*(one(c) for c in comps))
    return StackStatus(kafka=kafka, redis=redis)


async def down_async(settings: PFISettings | None = None, *, echo: Echo = print, wipe: bool = False) -> None:
    """Stop the local services (external ones are left alone); ``wipe`` also deletes their data."""
    settings = settings or PFISettings()
    comps = _components(settings)
    async with _stack_lock(settings, echo):
        targets: dict[int, str] = {}
        for comp in comps:
            if comp.external:
                echo(f"{comp.name}: external at {comp.address}, left alone")
                continue
            pids = set(find_pids(comp.markers))
            pid = _read_pid(comp.pidfile)
            if pid is not None and pid_alive(pid) and _matches(pid, comp.markers):
                pids.add(pid)
            if not pids:
                echo(f"{comp.name}: not running")
            targets.update({p: comp.name for p in sorted(pids)})
        if targets:
            await _stop_pids(targets, echo)
        for comp in comps:
            if not comp.external:
                comp.pidfile.unlink(missing_ok=True)
        if wipe:
            for comp in comps:
                if not comp.external:
                    data = comp.cwd / "data"
                    shutil.rmtree(data, ignore_errors=True)
                    echo(f"{comp.name}: removed {data}")


async def restart_component_async(
    settings: PFISettings,
    name: str,
    *,
    hard: bool = False,
    downtime_s: float = 0.0,
    echo: Echo = print,
    timeout_s: float | None = None,
) -> float:
    """Restart ONE local component (``"kafka"`` or ``"redis"``) of this stack; the other is untouched.

    ``hard``: SIGKILL (a crash: no shutdown code runs), else SIGTERM with the usual SIGKILL fallback. The
    component stays down for ``downtime_s``, then is started again with its data and waited for until
    healthy. Returns the seconds from the new start to healthy. For chaos tests and operators."""
    comp = next((c for c in _components(settings) if c.name == name), None)
    if comp is None:
        raise StackError(f"unknown stack component {name!r} (kafka or redis)")
    if comp.external:
        raise StackError(f"{name} is external at {comp.address}: not restarted here")
    timeout = timeout_s if timeout_s is not None else settings.stack_start_timeout_s
    async with _stack_lock(settings, echo):
        pids = set(find_pids(comp.markers))
        pid = _running_pid(comp)
        if pid is not None:
            pids.add(pid)
        if hard:
            for victim in sorted(pids):
                echo(f"{name}: killing pid {victim} (SIGKILL)")
                _signal(victim, signal.SIGKILL)
            deadline = time.monotonic() + 10.0
            while any(pid_alive(p) for p in pids):
                if time.monotonic() > deadline:
                    raise StackError(f"{name}: still alive 10s after SIGKILL: {sorted(pids)}")
                await asyncio.sleep(0.05)
            for victim in pids:
                _children.pop(victim, None)
        elif pids:
            await _stop_pids({p: name for p in sorted(pids)}, echo)
        comp.pidfile.unlink(missing_ok=True)
        if downtime_s > 0:
            await asyncio.sleep(downtime_s)
        command = await asyncio.to_thread(comp.prepare, echo)
        started = time.monotonic()
        new_pid = _spawn(comp, command)
        echo(f"{name}: restarted (pid {new_pid}), log {comp.log}")
        await _wait_healthy(comp, new_pid, started + timeout, timeout, echo)
        return time.monotonic() - started


# --------------------------------------------------------------------------------------- sync API


def up(
    settings: PFISettings | None = None,
    *,
    echo: Echo = print,
    topics: bool = True,
    timeout_s: float | None = None,
) -> StackStatus:
    """Synchronous :func:`up_async` (not from inside a running event loop)."""
    return asyncio.run(up_async(settings, echo=echo, topics=topics, timeout_s=timeout_s))


def status(settings: PFISettings | None = None, *, timeout_s: float = 3.0) -> StackStatus:
    return asyncio.run(status_async(settings, timeout_s=timeout_s))


def down(settings: PFISettings | None = None, *, echo: Echo = print, wipe: bool = False) -> None:
    asyncio.run(down_async(settings, echo=echo, wipe=wipe))
