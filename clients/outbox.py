"""A bounded on-disk outbox: an update is written (atomically) before it is sent and removed only
after the ingest acknowledged every one of its messages. An outage or an agent restart therefore loses
nothing; an update whose acknowledgement was lost may be sent again, and the aggregator drops the copy
by (client, update id), so it is aggregated once.

An update the service refuses for good (:class:`RejectedUpdate`: a 4xx such as a bad signature or a
revoked device) is moved to ``rejected/`` and reported, so it never blocks the queue.
:class:`OutboxPublisher` drains an outbox through a :class:`Sender` with jittered exponential back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from schemas.errors import PFIError

log = logging.getLogger("pfi.edge.outbox")
MAGIC = b"PFIOBX1\n"
_LEN = struct.Struct(">I")


class OutboxFull(PFIError):
    """The outbox reached its byte or item bound; the agent must wait for the broker to drain it."""


class RejectedUpdate(PFIError):
    """The service refused an update for good (it would refuse it again): not retried."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Sender(Protocol):
    async def send_raw(self, federation: str, messages: list[bytes]) -> int: ...


@dataclass(frozen=True)
class OutboxItem:
    path: Path
    update_id: str
    federation: str
    size: int


@dataclass(frozen=True)
class DrainResult:
    sent: int
    remaining: int
    error: str | None = None
    rejected: int = 0


class Outbox:
    def __init__(self, directory: Path, *, max_bytes: int = 512 * 1024 * 1024, max_items: int = 1000) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_items = max_items
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "corrupt").mkdir(exist_ok=True)
        (self.directory / "rejected").mkdir(exist_ok=True)
        for leftover in self.directory.glob("*.tmp"):  # a crash mid-write: never renamed, never sent
            leftover.unlink(missing_ok=True)

    def pending(self) -> list[OutboxItem]:
        items = []
        for path in sorted(self.directory.glob("*.obx")):
            try:
                update_id, federation = self._header(path)
                size = path.stat().st_size
            except FileNotFoundError:
                continue  # sent and removed since the listing
            except (OSError, ValueError) as err:
                log.error("outbox file %s is corrupt (%s); moved aside", path.name, err)
                path.rename(self.directory / "corrupt" / path.name)
                continue
            items.append(OutboxItem(path, update_id, federation, size))
        return items

    def __len__(self) -> int:
        return sum(1 for _ in self.directory.glob("*.obx"))

    def size_bytes(self) -> int:
        # put() runs beside a drain that removes sent files: one may vanish between glob and stat (seen
        # as a spurious FileNotFoundError in 1 of 1000 rounds of `pfi bench edge-scale`).
        total = 0
        for path in self.directory.glob("*.obx"):
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    def put(self, update_id: str, federation: str, messages: list[bytes]) -> OutboxItem:
        """Persist an update's messages durably (write, fsync, rename); raises :class:`OutboxFull`."""
        header = json.dumps(
            {"update_id": update_id, "federation": federation, "count": len(messages)}
        ).encode()
        body = b"".join(_LEN.pack(len(m)) + m for m in messages)
        size = len(MAGIC) + _LEN.size + len(header) + len(body)
        if len(self) >= self.max_items or self.size_bytes() + size > self.max_bytes:
            raise OutboxFull(
                f"outbox {self.directory} is full ({len(self)} items, {self.size_bytes()} bytes); "
                "the broker has been unreachable for a while"
            )
        safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in update_id)
        final = self.directory / f"{time.time_ns():020d}-{safe_id}.obx"
        tmp = final.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            fh.write(MAGIC + _LEN.pack(len(header)) + header + body)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.rename(final)
        _fsync_dir(self.directory)
        return OutboxItem(final, update_id, federation, size)

    def read(self, item: OutboxItem) -> list[bytes]:
        data = item.path.read_bytes()
        offset = len(MAGIC)
        (hlen,) = _LEN.unpack_from(data, offset)
        header = json.loads(data[offset + _LEN.size : offset + _LEN.size + hlen])
        offset += _LEN.size + hlen
        messages = []
        for _ in range(int(header["count"])):
            (n,) = _LEN.unpack_from(data, offset)
            offset += _LEN.size
            messages.append(data[offset : offset + n])
            offset += n
        if offset != len(data) or any(len(m) == 0 for m in messages):
            raise ValueError("truncated or trailing bytes")
        return messages

    def remove(self, item: OutboxItem) -> None:
        item.path.unlink(missing_ok=True)
        _fsync_dir(self.directory)

    async def drain(self, sender: Sender, *, timeout_s: float = 30.0) -> DrainResult:
        """Send pending updates in order; stop at the first retryable failure (retry later). An update
        refused for good is moved to ``rejected/`` and the drain goes on."""
        sent = rejected = 0
        items = self.pending()
        for index, item in enumerate(items):
            try:
                messages = self.read(item)
            except (OSError, ValueError, KeyError, struct.error) as err:
                log.error("outbox item %s unreadable (%s); moved aside", item.path.name, err)
                item.path.rename(self.directory / "corrupt" / item.path.name)
                continue
            try:
                await asyncio.wait_for(sender.send_raw(item.federation, messages), timeout_s)
            except RejectedUpdate as err:
                log.error("update %s rejected by the service (%s); moved to rejected/", item.update_id, err)
                item.path.rename(self.directory / "rejected" / item.path.name)
                _fsync_dir(self.directory)
                rejected += 1
                continue
            except Exception as err:  # timeouts, transport and client errors: keep the item, retry later
                return DrainResult(sent, len(items) - index, f"{type(err).__name__}: {err}", rejected)
            self.remove(item)
            sent += 1
        return DrainResult(sent, 0, None, rejected)

    def rejected(self) -> list[Path]:
        """Updates the service refused for good (kept for inspection)."""
        return sorted((self.directory / "rejected").glob("*.obx"))

    @staticmethod
    def _header(path: Path) -> tuple[str, str]:
        with open(path, "rb") as fh:
            head = fh.read(len(MAGIC) + _LEN.size)
            if len(head) != len(MAGIC) + _LEN.size or not head.startswith(MAGIC):
                raise ValueError("bad magic")
            (hlen,) = _LEN.unpack_from(head, len(MAGIC))
            header = json.loads(fh.read(hlen))
        return str(header["update_id"]), str(header["federation"])


class OutboxPublisher:
    """Queues updates in an :class:`Outbox` and drains it through a sender, one drain at a time, with
    exponential back-off (jittered) after failures. Share one publisher between agents that share an
    outbox (a fleet): the lock makes sure no item is sent by two drains at once."""

    def __init__(
        self,
        outbox: Outbox,
        sender: Sender,
        *,
        send_timeout_s: float = 30.0,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 30.0,
    ) -> None:
        self.outbox = outbox
        self.sender = sender
        self.send_timeout_s = send_timeout_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.sent_total = 0
        self.rejected_total = 0
        self.failed_attempts = 0
        self.last_error: str | None = None
        self._backoff = retry_initial_s
        self._next_attempt = 0.0
        self._lock = asyncio.Lock()
        self._rng = random.Random()

    async def enqueue(self, update_id: str, federation: str, messages: list[bytes]) -> OutboxItem:
        """Persist an update (raises :class:`~clients.outbox.OutboxFull` when the bound is reached)."""
        return await asyncio.to_thread(self.outbox.put, update_id, federation, messages)

    def backing_off(self) -> float:
        """Seconds until the next drain attempt is due (0 when due)."""
        return max(0.0, self._next_attempt - time.monotonic())

    def _failed(self, error: str) -> None:
        self.failed_attempts += 1
        self.last_error = error
        wait = self._backoff * self._rng.uniform(0.8, 1.2)
        self._next_attempt = time.monotonic() + wait
        self._backoff = min(self._backoff * 2, self.retry_max_s)
        log.warning("outbox: send failed (%s); %d queued, retrying in %.1fs", error, len(self.outbox), wait)

    def _succeeded(self) -> None:
        self._backoff = self.retry_initial_s
        self._next_attempt = 0.0
        self.last_error = None

    async def drain(self, *, force: bool = False) -> DrainResult:
        """Send everything queued, in order, until empty or the first failure. Without ``force`` a drain
        inside the back-off window after a failure sends nothing (the update stays queued)."""
        async with self._lock:
            if not force and self.backing_off() > 0:
                return DrainResult(0, len(self.outbox), f"backing off after: {self.last_error}")
            sent = rejected = 0
            while True:
                result = await self.outbox.drain(self.sender, timeout_s=self.send_timeout_s)
                sent += result.sent
                rejected += result.rejected
                self.sent_total += result.sent
                self.rejected_total += result.rejected
                if result.error is not None:
                    self._failed(result.error)
                    return DrainResult(sent, result.remaining, result.error, rejected)
                if len(self.outbox) == 0:  # items queued meanwhile are sent in this drain too
                    self._succeeded()
                    return DrainResult(sent, 0, None, rejected)

    async def flush(self, timeout_s: float) -> DrainResult:
        """Drain until the outbox is empty or ``timeout_s`` passed, retrying with back-off."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        sent = rejected = 0
        while True:
            result = await self.drain(force=True)
            sent += result.sent
            rejected += result.rejected
            if result.remaining == 0:
                return DrainResult(sent, 0, None, rejected)
            left = deadline - loop.time()
            if left > 0:
                await asyncio.sleep(min(self.backing_off(), left))
            if loop.time() >= deadline:
                return DrainResult(sent, len(self.outbox), result.error, rejected)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
