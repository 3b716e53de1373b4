"""A private Kafka + Redis for chaos runs: its own home (a temporary folder), free loopback ports and
Redis AOF on, so that killing and restarting a broker never disturbs the shared stack (``~/.pfi``).

The Kafka jars are not downloaded again: ``<home>/cache`` is a symlink to the shared cache
(``~/.pfi/cache`` or ``PFI_HOME/cache``). Everything else (configs, data, logs) lives in the temporary
home, wiped by :meth:`ChaosStack.stop`.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from services.settings import PFISettings
from services.stack import manager
from services.stack.processes import free_ports
from services.stack.topics import ensure_topics

Echo = Callable[[str], None]


@dataclass
class ChaosStack:
    settings: PFISettings  # the stack's own ports and home; ``topic_prefix`` "chaos"
    root: Path
    echo: Echo

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @classmethod
    async def start(cls, *, echo: Echo = print, partitions: int = 3, chunk_bytes: int = 4096) -> ChaosStack:
        shared_cache = PFISettings().cache_dir
        root = Path(tempfile.mkdtemp(prefix="pfi-chaos-"))
        home = root / "home"
        home.mkdir()
        shared_cache.mkdir(parents=True, exist_ok=True)
        (home / "cache").symlink_to(shared_cache, target_is_directory=True)
        kafka, controller, redis = free_ports(3)
        settings = PFISettings(
            home=home,
            kafka_bootstrap_servers=None,
            redis_url=None,
            kafka_port=kafka,
            kafka_controller_port=controller,
            redis_port=redis,
            kafka_heap="384m",
            redis_aof=True,
            topic_prefix="chaos",
            update_partitions=partitions,
            chunk_bytes=chunk_bytes,
            stack_start_timeout_s=180.0,
        )
        stack = cls(settings, root, echo)
        try:
            await manager.up_async(settings, echo=echo, topics=False)
        except BaseException:
            await stack.stop()
            raise
        stack.logs.mkdir(exist_ok=True)
        return stack

    async def scenario_settings(self, name: str) -> PFISettings:
        """Settings with fresh topics for one scenario (so scenarios never replay each other's streams)."""
        prefix = f"chaos-{name}-{uuid.uuid4().hex[:6]}"
        settings = self.settings.model_copy(update={"topic_prefix": prefix})
        await ensure_topics(settings)
        return settings

    async def restart(self, component: str, *, hard: bool, downtime_s: float = 0.0) -> float:
        """Restart Kafka or Redis of this stack; returns seconds from its new start to healthy."""
        return await manager.restart_component_async(
            self.settings, component, hard=hard, downtime_s=downtime_s, echo=self.echo
        )

    async def stop(self, *, keep: bool = False) -> None:
        """Stop both services, delete their data and (unless ``keep``) the temporary home."""
        with contextlib.suppress(Exception):
            await manager.down_async(self.settings, echo=self.echo, wipe=not keep)
        if not keep:
            (self.settings.home / "cache").unlink(missing_ok=True)  # the link, never the shared cache
            shutil.rmtree(self.root, ignore_errors=True)


@contextlib.asynccontextmanager
async def chaos_stack(*, echo: Echo = print, keep: bool = False) -> AsyncIterator[ChaosStack]:
    stack = await ChaosStack.start(echo=echo)
    try:
        yield stack
    finally:
        await stack.stop(keep=keep)
