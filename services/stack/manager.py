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

The processes run detached (own session) so they outlive the ``pfi`` command that started them; the
process control itself (pids, signals, detached spawns) is :mod:`services.stack.processes`, shared with
the demo, the benchmarks, chaos runs and the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import shutil
import signal
import time
from collections.abc import AsyncIterator, Sequence

from schemas.errors import ConfigError, StackError
from services.settings import PFISettings
from services.stack import broker
from services.stack.components import Component, ComponentStatus, StackStatus, components
from services.stack.processes import (
    Echo,
    find_pids,
    forget,
    log_tail,
    matches,
    pid_alive,
    port_in_use,
    read_pid,
    signal_process,
    spawn_detached,
    stop_pids,
)
from services.stack.topics import ensure_topics
from services.transport import kafka_kwargs

STOP_TIMEOUT_S = {"kafka": 30.0, "redis": 10.0}
PROGRESS_EVERY_S = 5.0

# -------------------------------------------------------------------------------------- processes


def _running_pid(comp: Component, echo: Echo | None = None) -> int | None:
    """The pid of this stack's process for ``comp``; removes a stale pidfile, adopts an orphan."""
    pid = read_pid(comp.pidfile)
    if pid is not None and pid_alive(pid) and matches(pid, comp.markers):
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


def _stack_pids(comp: Component) -> set[int]:
    """Every live process of this stack's ``comp`` (by command line and by pidfile)."""
    pids = set(find_pids(comp.markers))
    pid = read_pid(comp.pidfile)
    if pid is not None and pid_alive(pid) and matches(pid, comp.markers):
        pids.add(pid)
    return pids


def _spawn(comp: Component, cmd: list[str]) -> int:
    pid = spawn_detached(comp.name, cmd, comp.cwd, comp.log)
    comp.pidfile.parent.mkdir(parents=True, exist_ok=True)
    comp.pidfile.write_text(f"{pid}\n")
    return pid


async def _stop_pids(pids: dict[int, str], echo: Echo) -> None:
    await stop_pids(pids, echo, STOP_TIMEOUT_S)


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
    comp: Component, pid: int | None, deadline: float, timeout_s: float, echo: Echo
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
            tail = log_tail(comp.log)
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


async def _upgrade_kafka_auth(settings: PFISettings, comps: Sequence[Component], echo: Echo) -> None:
    """A local broker whose storage has no (or other) SCRAM users is stopped and its data deleted, so that
    the start below formats it with authentication (local dev data: topics and offsets are lost)."""
    comp = next(c for c in comps if c.name == "kafka")
    if comp.external:
        return
    reason = await asyncio.to_thread(broker.auth_outdated, settings)
    if reason is None:
        return
    echo(f"kafka: {reason}; re-formatting the local broker with SASL/SCRAM + ACLs (its data is deleted)")
    pids = _stack_pids(comp)
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
    comps = components(settings)
    async with _stack_lock(settings, echo):
        await _upgrade_kafka_auth(settings, comps, echo)
        pids: dict[str, int | None] = {}
        to_start: list[Component] = []
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
            busy = [port for port in comp.ports if port_in_use(port)]
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
    comps = components(settings)

    async def one(comp: Component) -> ComponentStatus:
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
    comps = components(settings)
    async with _stack_lock(settings, echo):
        targets: dict[int, str] = {}
        for comp in comps:
            if comp.external:
                echo(f"{comp.name}: external at {comp.address}, left alone")
                continue
            pids = _stack_pids(comp)
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
    comp = next((c for c in components(settings) if c.name == name), None)
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
                signal_process(victim, signal.SIGKILL)
            deadline = time.monotonic() + 10.0
            while any(pid_alive(p) for p in pids):
                if time.monotonic() > deadline:
                    raise StackError(f"{name}: still alive 10s after SIGKILL: {sorted(pids)}")
                await asyncio.sleep(0.05)
            for victim in pids:
                forget(victim)
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
