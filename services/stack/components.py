"""What the local stack is made of: Kafka (KRaft) and Redis as components (ports, pidfile, log, how to
recognise this stack's process, how to prepare its command, how to check its health), and the status
records ``pfi stack status`` prints. :mod:`services.stack.manager` starts, stops and restarts them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.settings import PFISettings
from services.stack import broker, keyvalue
from services.stack.processes import Echo

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
class Component:
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


def components(settings: PFISettings) -> list[Component]:
    kpaths = broker.kafka_paths(settings)
    rpaths = keyvalue.redis_paths(settings)
    bootstrap = settings.kafka_bootstrap()
    url = settings.redis()
    return [
        Component(
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
        Component(
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
