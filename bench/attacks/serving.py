"""Attacks on the serving routes: malformed JSON and the unauthenticated large-body flood."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import Any

from bench.attacks.rig import Rig
from bench.attacks.shared import Attacks
from bench.common import MIB
from services.stack.processes import rss_bytes

FLOOD_ANSWER_S = 5.0  # a refused flood body is answered within this
#: Refusals of a flood body: the answers, or the server dropping the connection with the body unread.
REFUSED = {"401", "413", "reset"}


async def malformed_json(rig: Rig, out: Attacks) -> None:
    fed = rig.main.name
    for route in ("generate", "score"):
        r = await rig.http.post(
            f"/v1/federations/{fed}/{route}",
            content=b"{not json",
            headers={"Content-Type": "application/json"},
        )
        out.http(f"malformed_json_no_token_{route}", "serving", r, 401)


# ---------------------------------------------------------------------------------------------- flood


async def _send_raw(port: int, head: bytes, total: int) -> tuple[str, int, float]:
    """Send ``head`` then up to ``total`` body bytes, stopping when the server answers or stops reading;
    (outcome, body bytes written, seconds until the outcome). The outcome is the HTTP status, ``reset``
    (the server closed the connection with our body unread: its RST can discard the answer before we read
    it), ``closed`` (end of stream, no answer) or ``timeout`` (no answer within 10 s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.perf_counter()
    writer.write(head)
    chunked = b"chunked" in head.lower()
    block = (b"%x\r\n" % MIB + b"x" * MIB + b"\r\n") if chunked else b"x" * MIB
    sent = 0
    outcome = "timeout"
    read = asyncio.create_task(reader.read(65536))
    try:
        while sent < total and not read.done():
            writer.write(block)
            sent += len(block)
            try:
                await asyncio.wait_for(writer.drain(), 0.5)
            except TimeoutError:
                break
            except (ConnectionError, OSError):
                break
        try:
            answer = await asyncio.wait_for(read, 10)
            if answer.startswith(b"HTTP/1.1 "):
                outcome = answer.split(b" ", 2)[1].decode()
            else:
                outcome = "closed" if not answer else "garbled"
        except TimeoutError:
            outcome = "timeout"
        except (ConnectionError, OSError):
            outcome = "reset"
    finally:
        if not read.done():
            read.cancel()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return outcome, sent, time.perf_counter() - started


async def flood(rig: Rig, out: Attacks, bodies: int, body_mib: int, concurrency: int) -> dict[str, Any]:
    """``bodies`` unauthenticated bodies of ``body_mib`` MiB each at the serve process (declared length,
    and chunked without a length, on the ingest and the generate routes): 413/401 fast, RSS flat."""
    fed = rig.main.name
    pid = rig.serve_pid
    rss_before = rss_bytes(pid)
    peak = rss_before
    stop = asyncio.Event()

    async def sampler() -> None:
        nonlocal peak
        while not stop.is_set():
            with contextlib.suppress(Exception):
                peak = max(peak, rss_bytes(pid))
            await asyncio.sleep(0.05)

    gate = asyncio.Semaphore(concurrency)
    total = body_mib * MIB
    results: list[tuple[str, str, float, int]] = []

    async def one(i: int) -> None:
        route = ("updates", "generate")[i % 2]
        ctype = "application/octet-stream" if route == "updates" else "application/json"
        length = f"Content-Length: {total}" if (i // 2) % 2 == 0 else "Transfer-Encoding: chunked"
        head = (
            f"POST /v1/federations/{fed}/{route} HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: {ctype}\r\n{length}\r\n\r\n"
        )
        async with gate:
            outcome, sent, seconds = await _send_raw(rig.serve_port, head.encode(), total)
        results.append((outcome, length.split(":")[0], seconds, sent))

    task = asyncio.create_task(sampler())
    began = time.perf_counter()
    try:
        await asyncio.gather(*(one(i) for i in range(bodies)))
    finally:
        stop.set()
        await task
    elapsed = time.perf_counter() - began
    await asyncio.sleep(0.5)
    rss_after = rss_bytes(pid)
    statuses = Counter(r[0] for r in results)
    slowest = max((r[2] for r in results), default=0.0)
    refused = all(r[0] in REFUSED for r in results)
    fast = slowest <= FLOOD_ANSWER_S
    out.add(
        "unauthenticated_large_body_flood", "serving", f"401/413 (or reset) within {FLOOD_ANSWER_S:.0f}s",
        f"{dict(statuses)}; slowest {slowest:.2f}s; RSS +{(rss_after - rss_before) / MIB:.1f} MiB",
        refused and fast and len(results) == bodies,
    )  # fmt: skip
    return {
        "bodies": bodies,
        "body_mib": body_mib,
        "concurrency": concurrency,
        "statuses": dict(statuses),
        "slowest_answer_s": slowest,
        "elapsed_s": elapsed,
        "body_bytes_written_max": max((r[3] for r in results), default=0),
        "rss_before_mib": rss_before / MIB,
        "rss_after_mib": rss_after / MIB,
        "rss_peak_mib": peak / MIB,
        "rss_growth_mib": (rss_after - rss_before) / MIB,
        "rss_peak_growth_mib": (peak - rss_before) / MIB,
    }
