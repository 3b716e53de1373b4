"""Run ``pfi aggregator`` as real OS processes (crash and rebalance tests), and audit what they wrote.

* :class:`AggregatorProcess`: one ``pfi aggregator`` subprocess in its own session, configured only through
  the environment (``PFI_*`` from a :class:`PFISettings`, ``PFI_AGGREGATOR_*`` overrides), stdout and
  stderr captured to a log file; ``kill9`` / ``terminate`` / ``wait_assigned`` / ``metrics``.
* :func:`aggregator_fleet`: an async context manager that starts processes on demand and, however the
  test ends, kills every one still alive and prints the tail of each log (pytest shows it on failure).
* :func:`audit_federation`: the exactly-once audit of one federation over Redis (status, metas, blobs);
  :func:`dead_letter_records`: the whole DLQ topic; :func:`wait_aggregated`: wait for a drained stream.
* :func:`names_on_partitions`: federation names whose Kafka key lands on chosen partitions (murmur2,
  as the default partitioner).
* :class:`UpdateStream`: several clients sending valid signed updates concurrently, in mixed encodings
  (so some travel as several chunks, interleaved with other uploads on the same partition).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import murmur2

from clients.updates import UpdateProducer
from schemas.codec import decode_tensors
from schemas.events import TensorEncoding
from schemas.frame import decode_frame
from services.federation.admin import federation_status
from services.settings import PFISettings
from services.stack.topics import DLQ_PARTITIONS
from services.store.versions import VersionStore
from services.versions_codec import BLOB_ENCODING
from tests.support.federations import Client, random_delta

ROOT = Path(__file__).resolve().parents[2]

#: ``PFISettings`` fields handed to the subprocess (everything a test may have changed).
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
    "keys_file",
    "signing_master_key",
)

#: Fast failure detection for tests: the broker's minimum session timeout is 6 s by default.
FAST_GROUP = {
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 1000,
    "poll_timeout_ms": 100,
    "progress_interval_s": 0.5,
    "shutdown_timeout_s": 20,
}

_ASSIGNED = re.compile(r"assigned partitions \[([0-9, ]*)\]")
_PORT = re.compile(r"metrics on :(\d+)")


def settings_env(settings: PFISettings, **aggregator: Any) -> dict[str, str]:
    """The environment of a ``pfi aggregator`` subprocess that sees exactly ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PFI_")}
    env["PFI_KAFKA_BOOTSTRAP_SERVERS"] = settings.kafka_bootstrap()
    env["PFI_REDIS_URL"] = settings.redis()
    for name in SETTINGS_FIELDS:
        value = getattr(settings, name)
        if value is not None:
            env[f"PFI_{name.upper()}"] = str(value)
    for name, value in aggregator.items():
        if value is not None:
            env[f"PFI_AGGREGATOR_{name.upper()}"] = str(value)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # The code of this checkout, whatever the virtual environment's editable install points at.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def aggregator_command() -> list[str]:
    script = Path(sys.executable).with_name("pfi")
    if script.is_file():
        return [str(script), "aggregator"]
    return [sys.executable, "-m", "services.cli", "aggregator"]


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when pytest dies (Linux), so no aggregator outlives a run
    that was itself killed before its cleanup could run."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class AggregatorProcess:
    """One ``pfi aggregator`` subprocess; its output goes to ``log_path``."""

    name: str
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    exit_signal: str | None = None  # how we ended it: "SIGKILL", "SIGTERM"
    _log_file: Any = field(default=None, repr=False)

    def start(self) -> AggregatorProcess:
        self._log_file = self.log_path.open("ab")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            aggregator_command(),
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # signals go to it alone, never to pytest
            preexec_fn=_die_with_parent,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- observing ----------------------------------------------------------------------------
    def assignments(self) -> list[list[int]]:
        """Every partition assignment the process logged so far, oldest first."""
        return [
            [int(p) for p in m.group(1).split(",") if p.strip()] for m in _ASSIGNED.finditer(self.log_text())
        ]

    def metrics_port(self) -> int | None:
        match = _PORT.search(self.log_text())
        return int(match.group(1)) if match else None

    async def wait_log(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:  # noqa: ASYNC109
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log_text())
            if match:
                return match
            if not self.alive():
                raise AssertionError(f"{self.name} exited ({self.returncode()}) before logging {pattern!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not log {pattern!r} within {timeout:.0f}s")
            await asyncio.sleep(0.1)

    async def wait_assigned(
        self,
        timeout: float = 60.0,  # noqa: ASYNC109
        *,
        after: int = 0,
        non_empty: bool = True,
    ) -> list[int]:
        """Wait for the ``after``-th (0-based) or a later logged assignment (non-empty unless told)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.assignments()[after:]
            for assignment in found:
                if assignment or not non_empty:
                    return assignment
            if not self.alive():
                raise AssertionError(f"{self.name} exited ({self.returncode()}) before an assignment")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no partition assignment within {timeout:.0f}s")
            await asyncio.sleep(0.1)

    async def wait_partitions(self, count: int, timeout: float = 60.0) -> list[int]:  # noqa: ASYNC109
        """Wait until the latest logged assignment holds ``count`` partitions; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.assignments()
            if found and len(found[-1]) == count:
                return found[-1]
            if not self.alive():
                raise AssertionError(f"{self.name} exited ({self.returncode()}) before owning {count}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: assignments {found}, none of {count} within {timeout:.0f}s"
                )
            await asyncio.sleep(0.1)

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as ``{"name{labels}": value}`` (unlabelled: just the name)."""
        port = self.metrics_port()
        assert port is not None, f"{self.name} has not logged its metrics port"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
        return out

    # -- ending -------------------------------------------------------------------------------
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def kill9(self) -> None:
        """SIGKILL (no shutdown code runs) and reap."""
        if self.alive():
            assert self.proc is not None
            self.exit_signal = "SIGKILL"
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
        self._reap(10.0)

    async def terminate(self, timeout: float = 30.0) -> int:  # noqa: ASYNC109
        """SIGTERM (graceful shutdown) and wait for the exit; SIGKILL if it does not come."""
        assert self.proc is not None
        if self.alive():
            self.exit_signal = "SIGTERM"
            self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive() or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        if self.alive():
            self.kill9()
            raise AssertionError(f"{self.name} ignored SIGTERM for {timeout:.0f}s (killed)")
        self._reap(1.0)
        code = self.returncode()
        assert code is not None
        return code

    def _reap(self, timeout: float) -> None:
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def describe(self, tail_lines: int = 150) -> str:
        lines = self.log_text().splitlines()
        shown = lines[-tail_lines:]
        head = (
            f"===== {self.name} pid={self.proc.pid if self.proc else None} rc={self.returncode()} "
            f"ended_by={self.exit_signal} log={self.log_path} ({len(lines)} lines"
            f"{', last ' + str(len(shown)) if len(shown) < len(lines) else ''}) ====="
        )
        return "\n".join([head, *shown])


class AggregatorFleet:
    """Starts aggregator processes of one consumer group; remembers all of them for cleanup."""

    def __init__(self, settings: PFISettings, log_dir: Path, group_id: str, **aggregator: Any) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.group_id = group_id
        self.aggregator = {**FAST_GROUP, **aggregator}
        self.processes: list[AggregatorProcess] = []

    def start(self, name: str | None = None, **aggregator: Any) -> AggregatorProcess:
        name = name or f"agg-{len(self.processes)}"
        env = settings_env(
            self.settings,
            group_id=self.group_id,
            port=0,
            instance_id=name,
            **{**self.aggregator, **aggregator},
        )
        process = AggregatorProcess(name, env, self.log_dir / f"{name}.log")
        self.processes.append(process)
        return process.start()

    def kill_all(self) -> None:
        for process in self.processes:
            process.kill9()

    def report(self, tail_lines: int = 150) -> str:
        return "\n".join(p.describe(tail_lines) for p in self.processes)


@contextlib.asynccontextmanager
async def aggregator_fleet(
    settings: PFISettings, log_dir: Path, group_id: str | None = None, **aggregator: Any
) -> AsyncIterator[AggregatorFleet]:
    """Yields a fleet; on exit every process still alive is SIGKILLed and every log tail printed."""
    await asyncio.to_thread(log_dir.mkdir, parents=True, exist_ok=True)
    fleet = AggregatorFleet(settings, log_dir, group_id or f"g-{settings.topic_prefix}", **aggregator)
    try:
        yield fleet
    finally:
        fleet.kill_all()
        print(fleet.report())


# ------------------------------------------------------------------------------ partitions, audit


def partition_of(key: str, partitions: int) -> int:
    """The partition the default (murmur2) partitioner picks for ``key``."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def names_on_partitions(targets: Iterable[int], partitions: int, prefix: str = "fed") -> list[str]:
    """One fresh federation name per entry of ``targets``, each hashing to that partition."""
    out: list[str] = []
    for target in targets:
        while True:
            name = f"{prefix}-{uuid.uuid4().hex[:8]}"
            if partition_of(name, partitions) == target:
                out.append(name)
                break
    return out


@dataclass
class Audit:
    """What :func:`audit_federation` found; ``problems`` is empty when exactly-once held."""

    name: str
    status: dict[str, Any]
    problems: list[str]

    @property
    def versions(self) -> int:
        return int(self.status["version"] or 0)


async def audit_federation(store: VersionStore, name: str, sent: Iterable[str]) -> Audit:
    """Check a federation against the update ids that were sent to it (all valid):

    every id in exactly one version and no other ids; Σ num_updates == aggregated == accepted == sent;
    nothing rejected or buffered; versions v0..head form a parent chain; every retained blob decodes
    and its SHA-256 is the digest in its metadata."""
    sent_ids = list(sent)
    status = await federation_status(store, name)
    problems: list[str] = []
    if len(set(sent_ids)) != len(sent_ids):
        problems.append("the test sent an update id twice")
    where: dict[str, list[int]] = {}
    for v in status["versions"]:
        for uid in v["update_ids"]:
            where.setdefault(uid, []).append(v["version"])
    missing = sorted(set(sent_ids) - set(where))
    twice = {uid: vs for uid, vs in where.items() if len(vs) > 1}
    unknown = sorted(set(where) - set(sent_ids))
    if missing:
        problems.append(f"{len(missing)} sent update(s) in no version: {missing[:10]}")
    if twice:
        problems.append(f"{len(twice)} update(s) in several versions: {dict(list(twice.items())[:10])}")
    if unknown:
        problems.append(f"{len(unknown)} version update id(s) never sent: {unknown[:10]}")
    total = sum(v["num_updates"] for v in status["versions"])
    n = len(sent_ids)
    for label, value in (
        ("sum of num_updates", total),
        ("updates_aggregated_total", status["updates_aggregated_total"]),
        ("updates_accepted_total", status["updates_accepted_total"]),
    ):
        if value != n:
            problems.append(f"{label} is {value}, sent {n}")
    if status["updates_rejected_total"].get("total", 0) != 0:
        problems.append(f"rejections recorded: {status['updates_rejected_total']}")
    if status["updates_buffered"]:
        problems.append(f"still buffered: {status['updates_buffered']}")
    # Parent chain: v0 (init) <- v1 <- ... <- head, latest == head (no rollback here).
    numbers = [v["version"] for v in status["versions"]]
    head = status["head"]
    if numbers != list(range(0, (head or 0) + 1)):
        problems.append(f"version metas are not 0..{head}: {numbers}")
    if status["version"] != head:
        problems.append(f"latest {status['version']} != head {head}")
    for v in status["versions"]:
        expected_parent = None if v["version"] == 0 else v["version"] - 1
        if v["parent"] != expected_parent:
            problems.append(f"v{v['version']} has parent {v['parent']}, expected {expected_parent}")
        if v["version"] > 0 and (v["kind"] != "aggregate" or v["num_updates"] < 1):
            problems.append(f"v{v['version']} is {v['kind']} with {v['num_updates']} update(s)")
    # Blobs: every retained one is intact.
    shapes: dict[str, tuple[int, ...]] | None = None
    for version in status["retained_versions"]:
        meta = next((v for v in status["versions"] if v["version"] == version), None)
        blob = await store.get_blob(name, version)
        if meta is None or blob is None:
            problems.append(f"retained v{version}: meta {meta is not None}, blob {blob is not None}")
            continue
        digest = hashlib.sha256(blob).hexdigest()
        if digest != meta["digest"] or len(blob) != meta["size_bytes"]:
            problems.append(
                f"v{version}: blob sha256 {digest[:12]}/{len(blob)} B != meta {meta['digest'][:12]}"
            )
            continue
        try:
            state = decode_tensors(blob, BLOB_ENCODING, max_decoded_bytes=1 << 30)
        except Exception as err:
            problems.append(f"v{version}: blob does not decode: {err!r}")
            continue
        got = {k: tuple(t.shape) for k, t in state.items()}
        if shapes is None:
            shapes = got
        elif got != shapes:
            problems.append(f"v{version}: tensor names/shapes differ from the other versions")
        if not all(bool(t.isfinite().all()) for t in state.values()):
            problems.append(f"v{version}: non-finite values")
    if head and head not in status["retained_versions"]:
        problems.append(f"the latest blob v{head} is not retained")
    return Audit(name, status, problems)


async def dead_letter_records(settings: PFISettings, *, timeout: float = 30.0) -> list[Any]:  # noqa: ASYNC109
    """Every record of the DLQ topic (decoded ``UpdateRejected``), read up to its end offsets."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap(), enable_auto_commit=False, group_id=None
    )
    await consumer.start()
    out: list[Any] = []
    try:
        tps = [TopicPartition(settings.dlq_topic, p) for p in range(DLQ_PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends: Mapping[TopicPartition, int] = await consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            if time.monotonic() > deadline:
                raise AssertionError("could not read the DLQ topic to its end")
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                out += [decode_frame(r.value, max_frame_bytes=1 << 24).data for r in records]
    finally:
        await consumer.stop()
    return out


# ------------------------------------------------------------------------------------- producing

#: Update encodings the streams cycle through; with ``chunk_bytes=4096`` on the tiny adapter they travel
#: as 3, 2, 2 and 1 Kafka message(s) respectively.
ENCODINGS = (
    TensorEncoding(dtype="float32", quantization="none", compression="none"),
    TensorEncoding(dtype="float32", quantization="none", compression="zstd"),
    TensorEncoding(dtype="float16", quantization="none", compression="zstd"),
    TensorEncoding(dtype="float32", quantization="int8", compression="zstd"),
)


@dataclass
class UpdateStream:
    """Valid signed updates from several clients, concurrently (so chunks of different uploads interleave
    on a partition); ``sent`` holds the ids Kafka acknowledged, per federation."""

    store: VersionStore
    producer: UpdateProducer
    clients: list[Client]
    shapes: dict[str, tuple[int, ...]]
    seed: int
    sent: dict[str, list[str]] = field(default_factory=dict)
    messages: int = 0
    multi_chunk: int = 0

    async def run(self, per_client: int, gap_s: tuple[float, float]) -> None:
        await asyncio.gather(*(self._client(i, c, per_client, gap_s) for i, c in enumerate(self.clients)))

    async def _client(self, index: int, client: Client, count: int, gap_s: tuple[float, float]) -> None:
        rng = random.Random(self.seed * 1000 + index)
        fed = client.spec.name
        for i in range(count):
            latest = await self.store.latest(fed)
            envelope = client.update(
                random_delta(self.shapes, seed=rng.randrange(1 << 30)),
                base_version=latest or 0,
                num_samples=rng.randint(1, 64),
                encoding=ENCODINGS[(index + i) % len(ENCODINGS)],
            )
            sent = await self.producer.send(envelope)
            self.messages += sent
            self.multi_chunk += sent > 1
            self.sent.setdefault(fed, []).append(envelope.data.update_id)
            await asyncio.sleep(rng.uniform(*gap_s))

    @property
    def total(self) -> int:
        return sum(len(ids) for ids in self.sent.values())


async def wait_aggregated(
    store: VersionStore,
    sent: Mapping[str, list[str]],
    timeout: float = 90.0,  # noqa: ASYNC109
) -> bool:
    """Wait until every federation's ``aggregated_total`` reached the number of updates sent to it."""

    async def done() -> bool:
        for name, ids in sent.items():
            stats = await store.get_stats(name)
            if stats.get("aggregated_total", 0) < len(ids):
                return False
        return True

    deadline = time.monotonic() + timeout
    while True:
        if await done():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.25)


class Timeline:
    """Timestamped notes of a test, printed at the end (shown by pytest when the test fails)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(f"{time.monotonic() - self.started:6.1f}s {line}")

    def __str__(self) -> str:
        return "\n".join(self.lines)
