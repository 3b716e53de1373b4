"""The model thread: every forward pass of the service runs here, never on the event loop.

Requests are submitted as :class:`Job` objects and awaited as asyncio futures. The thread takes the
oldest job and, in the same pass, every queued job that can share its forward: same model stack (a
global version; jobs on an old stack during a swap never mix with the new one), same kind, within the
row / padded-token / distinct-adapter limits and, for generation, a similar token budget (a
2-token request does not wait for a 200-token one). Different users' jobs share a batch: each row is
served with its user's personal adapter (the serving backend binds them to slots: :mod:`.backends`).
Under load, requests queue while a batch runs and the next pass takes them together, which is where
batching pays off. On top of that the thread lingers up to ``linger_s`` for requests that are already
*on their way* (counted by :meth:`incoming`: past authentication, still loading an adapter or
tokenizing), never for traffic that may not come, so a lone request on an idle service is answered at
once.

A batch that fails is retried job by job, so one bad request cannot fail its neighbours. Jobs whose
caller gave up (future cancelled) before their batch started are skipped.

Bounds and fairness: jobs queue per *tenant* (the authenticated principal), and tenants take turns.
The oldest job of the tenant whose turn it is opens a batch (that tenant then goes to the back of the
rotation); the rest of the batch is filled round-robin across tenants (each tenant's first job, then
each one's second, ...), so one tenant flooding the service delays only itself. At most ``max_queue``
jobs wait in all, and a tenant has at most ``max_per_tenant`` jobs queued or running; past either
bound :meth:`Batcher.submit` refuses at once with :class:`~.errors.TooManyRequests` (429) and a
``Retry-After`` estimated from the recent batch time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.personalization.backends.base import GenOut, GenRow, ModelStack, ScoreOut, ScoreRow
from services.personalization.errors import TooManyRequests
from services.personalization.metrics import ServeMetrics
from services.personalization.user_adapters import PersonalAdapter

log = logging.getLogger("pfi.serve.batcher")


@dataclass(frozen=True)
class BatchInfo:
    queue_seconds: float
    compute_seconds: float
    batch_rows: int
    batch_requests: int


@dataclass(eq=False)
class Job:
    kind: str  # "score" | "generate"
    stack: ModelStack
    adapter: PersonalAdapter | None
    rows: Sequence[ScoreRow] | Sequence[GenRow]
    future: asyncio.Future[tuple[list[Any], BatchInfo]]
    loop: asyncio.AbstractEventLoop
    tenant: str = ""
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def tokens(self) -> int:
        if self.kind == "generate":
            return sum(len(r.ids) + r.max_new_tokens for r in self.rows if isinstance(r, GenRow))
        return sum(len(r.ids) for r in self.rows)

    @property
    def budget(self) -> int:
        return max((r.max_new_tokens for r in self.rows if isinstance(r, GenRow)), default=0)


class Incoming:
    """A request on its way to :meth:`Batcher.submit` (see :meth:`Batcher.incoming`)."""

    __slots__ = ("open",)

    def __init__(self) -> None:
        self.open = True


def _similar_budget(a: int, b: int) -> bool:
    return max(a, b) <= 2 * min(a, b) + 8


class Batcher:
    def __init__(
        self,
        metrics: ServeMetrics,
        *,
        max_rows: int,
        max_tokens: int,
        linger_s: float = 0.0,
        batching: bool = True,
        max_queue: int = 256,
        max_per_tenant: int = 8,
    ) -> None:
        self.metrics = metrics
        self.max_rows = max_rows
        self.max_tokens = max_tokens
        self.linger_s = linger_s
        self.batching = batching
        self.max_queue = max_queue
        self.max_per_tenant = max_per_tenant
        self._queues: OrderedDict[str, deque[Job]] = OrderedDict()  # tenant -> jobs; order = turns
        self._queued = 0
        self._active: dict[str, int] = {}  # tenant -> jobs queued or running
        self._batch_seconds = 0.05  # moving average, for Retry-After
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._incoming = 0
        self.idle_hooks: list[Callable[[], None]] = []  # run on the model thread between batches
        self.batches = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pfi-model", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cond:
            jobs = [job for queue in self._queues.values() for job in queue]
            self._queues.clear()
            self._queued = 0
        for job in jobs:
            self._deliver(job, error=RuntimeError("the service is shutting down"))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def depth(self) -> int:
        return self._queued

    def retry_after_s(self) -> int:
        """Seconds until the queue has likely drained (at least 1)."""
        batches = math.ceil(max(1, self._queued) / max(1, self.max_rows))
        return max(1, min(60, math.ceil(batches * self._batch_seconds)))

    def _refuse_if_full(self) -> None:
        if self._queued >= self.max_queue:
            self.metrics.overload_rejections.labels(reason="queue_full").inc()
            raise TooManyRequests(
                f"the model queue is full ({self.max_queue} requests)",
                retry_after_s=self.retry_after_s(),
                code="queue_full",
            )

    @contextlib.contextmanager
    def admit(self, tenant: str) -> Iterator[None]:
        """Count a request of ``tenant`` from its start (before it loads adapters or tokenizes) to its
        end; refuses at once (429) past the tenant's bound or when the queue is already full."""
        with self._cond:
            if self._active.get(tenant, 0) >= self.max_per_tenant:
                self.metrics.overload_rejections.labels(reason="user_limit").inc()
                raise TooManyRequests(
                    f"{self.max_per_tenant} requests of this user are already queued or running",
                    retry_after_s=self.retry_after_s(),
                    code="user_limit",
                )
            self._refuse_if_full()
            self._active[tenant] = self._active.get(tenant, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                left = self._active.get(tenant, 1) - 1
                if left > 0:
                    self._active[tenant] = left
                else:
                    self._active.pop(tenant, None)

    async def submit(
        self,
        kind: str,
        stack: ModelStack,
        adapter: PersonalAdapter | None,
        rows: Sequence[Any],
        *,
        mark: Incoming | None = None,
        tenant: str = "",
        admitted: bool = False,
    ) -> tuple[list[Any], BatchInfo]:
        """Queue a job and wait for its results. ``admitted``: the caller holds :meth:`admit` for
        ``tenant`` already (else the job is admitted here)."""
        if not rows:
            raise ValueError("a job needs at least one row")
        if not admitted:
            with self.admit(tenant):
                return await self.submit(kind, stack, adapter, rows, mark=mark, tenant=tenant, admitted=True)
        loop = asyncio.get_running_loop()
        job = Job(kind, stack, adapter, rows, loop.create_future(), loop, tenant)
        with self._cond:
            if self._stopping:
                raise RuntimeError("the service is shutting down")
            if mark is not None:
                self._settle(mark)
            self._refuse_if_full()
            queue = self._queues.get(tenant)
            if queue is None:
                queue = self._queues[tenant] = deque()
            queue.append(job)
            self._queued += 1
            self.metrics.queue_depth.set(self._queued)
            self._cond.notify()
        return await job.future

    def _remove(self, job: Job) -> None:
        """Take ``job`` out of its tenant's queue (under the lock)."""
        queue = self._queues[job.tenant]
        queue.remove(job)
        self._queued -= 1
        if not queue:
            del self._queues[job.tenant]

    def _round_robin(self) -> Iterator[Job]:
        """Queued jobs, interleaved across tenants in turn order: each tenant's 1st, then 2nd, ..."""
        queues = [list(q) for q in self._queues.values()]
        for depth in range(max((len(q) for q in queues), default=0)):
            for queue in queues:
                if depth < len(queue):
                    yield queue[depth]

    @contextlib.contextmanager
    def incoming(self) -> Iterator[Incoming]:
        """Mark a request that will submit soon (the model thread may wait a little for it); the mark
        ends when the request's job is queued (``submit(..., mark=...)``) or the block exits."""
        mark = Incoming()
        with self._cond:
            self._incoming += 1
        try:
            yield mark
        finally:
            with self._cond:
                self._settle(mark)

    def _settle(self, mark: Incoming) -> None:
        if mark.open:
            mark.open = False
            self._incoming -= 1
            self._cond.notify()

    def run_on_thread(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the model thread before the next batch (model mutations from elsewhere)."""
        with self._cond:
            self.idle_hooks.append(fn)
            self._cond.notify()

    # -- model thread -----------------------------------------------------------------------------
    def _take(self) -> list[Job] | None:
        with self._cond:
            while not self._queued and not self.idle_hooks and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            if not self._queued:
                return []
            if self.batching and self.linger_s > 0:
                deadline = time.perf_counter() + self.linger_s
                while self._incoming > 0 and self._queued < self.max_rows and not self._stopping:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            if self._stopping or not self._queued:
                return None if self._stopping else []
            tenant, queue = next(iter(self._queues.items()))  # whose turn it is
            first = queue[0]
            self._remove(first)
            if tenant in self._queues:
                self._queues.move_to_end(tenant)  # next turn: the others first
            batch = [first]
            if self.batching:
                rows, tokens = len(first.rows), first.tokens
                adapters: list[PersonalAdapter] = [] if first.adapter is None else [first.adapter]
                for job in list(self._round_robin()):
                    if job.stack is not first.stack or job.kind != first.kind or job.future.done():
                        continue
                    if first.kind == "generate" and not _similar_budget(job.budget, first.budget):
                        continue
                    new_adapter = job.adapter is not None and not any(job.adapter is a for a in adapters)
                    slots = first.stack.slots
                    if (
                        rows + len(job.rows) > self.max_rows
                        or tokens + job.tokens > self.max_tokens
                        or (new_adapter and len(adapters) + 1 > slots)
                    ):
                        continue
                    self._remove(job)
                    batch.append(job)
                    rows += len(job.rows)
                    tokens += job.tokens
                    if new_adapter and job.adapter is not None:
                        adapters.append(job.adapter)
            self.metrics.queue_depth.set(self._queued)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            self._hooks()
            live = [job for job in batch if not job.future.done()]
            if live:
                try:
                    self._execute(live)
                except Exception:  # never let the model thread die
                    log.exception("model batch failed")
            for stack in {id(job.stack): job.stack for job in batch}.values():
                stack.release_evicted()

    def _hooks(self) -> None:
        with self._cond:
            hooks, self.idle_hooks = self.idle_hooks, []
        for hook in hooks:
            try:
                hook()
            except Exception:
                log.exception("model thread hook failed")

    def _chunks(self, rows: list[Any]) -> list[list[Any]]:
        """Split rows so that each forward respects the row and padded-token limits."""
        out: list[list[Any]] = []
        current: list[Any] = []
        longest = 0
        for row in rows:
            size = len(row.ids) + (row.max_new_tokens if isinstance(row, GenRow) else 0)
            grown = max(longest, size)
            if current and (len(current) + 1 > self.max_rows or grown * (len(current) + 1) > self.max_tokens):
                out.append(current)
                current, grown = [], size
            current.append(row)
            longest = grown
        if current:
            out.append(current)
        return out

    def _compute(self, kind: str, stack: ModelStack, rows: list[Any]) -> list[Any]:
        results: list[Any] = []
        for chunk in self._chunks(rows):
            if kind == "score":
                results += stack.score(chunk)
            else:
                results += stack.generate(chunk)
        return results

    def _execute(self, batch: list[Job]) -> None:
        kind, stack = batch[0].kind, batch[0].stack
        started = time.perf_counter()
        rows: list[Any] = [row for job in batch for row in job.rows]
        try:
            results = self._compute(kind, stack, rows)
        except Exception as err:
            if len(batch) == 1:
                self._deliver(batch[0], error=err)
                return
            log.warning("batch of %d %s jobs failed (%s): retrying one by one", len(batch), kind, err)
            for job in batch:
                self._execute([job])
            return
        elapsed = time.perf_counter() - started
        self.batches += 1
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * elapsed
        self.metrics.batch_rows.labels(kind=kind).observe(len(rows))
        self.metrics.batch_requests.labels(kind=kind).observe(len(batch))
        distinct = {id(job.adapter) for job in batch if job.adapter is not None}
        self.metrics.batch_adapters.labels(kind=kind).observe(len(distinct))
        self.metrics.batch_seconds.labels(kind=kind).observe(elapsed)
        offset = 0
        for job in batch:
            waited = started - job.enqueued
            self.metrics.queue_seconds.labels(kind=kind).observe(waited)
            mine = results[offset : offset + len(job.rows)]
            offset += len(job.rows)
            info = BatchInfo(waited, elapsed, len(rows), len(batch))
            self._deliver(job, result=(mine, info))

    @staticmethod
    def _deliver(
        job: Job, *, result: tuple[list[Any], BatchInfo] | None = None, error: BaseException | None = None
    ) -> None:
        def settle() -> None:
            if job.future.done():
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                assert result is not None
                job.future.set_result(result)

        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            job.loop.call_soon_threadsafe(settle)


__all__ = ["BatchInfo", "Batcher", "GenOut", "GenRow", "Job", "ScoreOut", "ScoreRow"]
