"""What every part of the :class:`~services.aggregator.service.Aggregator` shares: its state and its
worker threads.

The service is one class built in layers, each a file along one seam, each using only the layers below
it: :class:`AggregatorCore` (state, ``run_cpu``) < :class:`~services.aggregator.progress.Progress`
(partitions, durable progress, watermarks) < :class:`~services.aggregator.flushing.Flushing` (versions)
< :class:`~services.aggregator.intake.Intake` (chunks and updates) < ``Aggregator`` (lifecycle and the
consumer loop, which builds the state). One asyncio task runs all of it (see the service's docstring).
"""

from __future__ import annotations

import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from schemas.chunking import ReassemblyBudget
from services.aggregator.batch import BatchPreparer
from services.aggregator.metrics import AggregatorMetrics
from services.aggregator.publisher import Publisher
from services.aggregator.quality import QualityMonitor
from services.aggregator.rejects import Rejections
from services.aggregator.runtime import FederationRuntime
from services.aggregator.state_loader import StateLoader
from services.aggregator.versioning import VersionWriter
from services.health import HealthServer
from services.identity.keys import FederationKeys
from services.settings import AggregatorSettings, PFISettings
from services.store.versions import VersionStore

# The GIL switch interval of an aggregator process (Python's default: 5 ms). The event loop releases the GIL
# on every socket call and thread hand-off; while a worker thread holds it (Python code of the decode or
# the validation), getting it back took up to the whole interval: a cProfile of the loop at 64 KiB showed
# ``socket.send`` and ``SimpleQueue.put`` waiting ~3 ms per call, a third of the run. At 1 ms, ``pfi bench
# aggregator`` at 64 KiB measured 0.19-0.22 of the raw consumer against 0.15-0.17 at 5 ms (3 runs each).
GIL_SWITCH_INTERVAL_S = 0.001


def cpu_pool(agg: AggregatorSettings) -> ThreadPoolExecutor:
    """The worker threads of decoding, validation and the fold, each with ``agg.torch_threads`` intra-op
    threads. Torch's default (one OpenMP thread per core in every worker) makes each small tensor op a
    fork/join across cores: with two workers on two busy cores, validating a 32 MiB update took 10x
    longer than with one thread per worker (see bench/aggregator.py). Also shortens the process's GIL
    switch interval to :data:`GIL_SWITCH_INTERVAL_S` (never lengthens it): the event loop shares the GIL
    with these threads."""
    sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
    return ThreadPoolExecutor(
        max_workers=agg.worker_threads,
        thread_name_prefix="pfi-agg",
        initializer=_init_worker,
        initargs=(agg.torch_threads,),
    )


def _init_worker(torch_threads: int) -> None:
    if torch_threads > 0:
        # OpenMP keeps the thread count per thread: this sets it for this worker (and, through torch's
        # global default, for threads that start torch later; the threads already running keep theirs).
        torch.set_num_threads(torch_threads)


class AggregatorCore:
    """The aggregator's state (set by ``Aggregator.__init__``) and its worker threads."""

    settings: PFISettings
    agg: AggregatorSettings
    registry: CollectorRegistry
    metrics: AggregatorMetrics
    quality: QualityMonitor  # clients' quality reports -> metrics (issue 16; monitoring only)
    instance: str
    topic: str
    redis: Redis
    store: VersionStore
    keys: FederationKeys
    pool: ThreadPoolExecutor
    budget: ReassemblyBudget  # one reassembly bound for every federation
    loader: StateLoader
    consumer: AIOKafkaConsumer
    producer: AIOKafkaProducer
    publisher: Publisher
    rejections: Rejections
    preparer: BatchPreparer
    writer: VersionWriter
    health: HealthServer
    runtimes: dict[str, FederationRuntime]
    processed: dict[int, int]  # partition -> next offset to process
    generation: int  # bumped whenever the in-memory state is dropped (see Progress.forget_state)
    stopping: asyncio.Event
    started: asyncio.Event
    _last_progress: float
    _last_poll: float
    _live_due: set[str]
    # Federations with a watermark on an assigned partition (read at the seek), loaded or not: raising
    # the partition's seek position raises theirs (see Progress.raise_watermarks).
    _marked: dict[str, set[int]]
    _wm_written: dict[tuple[str, int], int]  # (federation, partition) -> last raised to

    async def run_cpu(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, lambda: fn(*args, **kwargs))
