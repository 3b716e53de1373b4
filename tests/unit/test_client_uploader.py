"""The device's HTTP sender against a scripted service: what is retried, what is rejected for good."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx

from clients.outbox import Outbox, OutboxPublisher
from clients.uploader import HttpUpdateSender


class Service:
    """Answers the ingest route from a script of status codes (then 202); records what it got."""

    def __init__(self, *statuses: int) -> None:
        self.script = list(statuses)
        self.bodies: list[bytes] = []
        self.tokens: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/federations/fed/updates"
        self.tokens.append(request.headers["Authorization"])
        status = self.script.pop(0) if self.script else 202
        if status == 202:
            self.bodies.append(request.content)
            return httpx.Response(202, json={"update_id": "u", "partition": 0, "offset": len(self.bodies)})
        headers = {"Retry-After": "7"} if status in (429, 503) else {}
        return httpx.Response(
            status, json={"error": {"code": f"c{status}", "message": "no"}}, headers=headers
        )


def sender(
    service: Callable[[httpx.Request], httpx.Response], tokens: list[str] | None = None
) -> HttpUpdateSender:
    issued = iter(tokens or ["t1", "t2", "t3"])
    current = {"token": next(issued)}

    async def token() -> str:
        return current["token"]

    async def refresh() -> str:
        current["token"] = next(issued)
        return current["token"]

    client = httpx.AsyncClient(transport=httpx.MockTransport(service), base_url="http://svc")
    return HttpUpdateSender("http://svc", token, refresh=refresh, client=client)


async def test_retryable_answers_keep_the_update_and_a_retry_resumes_after_the_acknowledged_chunks(
    tmp_path: Path,
) -> None:
    service = Service(202, 429)  # chunk 0 stored, chunk 1 throttled
    outbox = Outbox(tmp_path / "outbox")
    outbox.put("u-1", "fed", [b"c0", b"c1", b"c2"])
    publisher = OutboxPublisher(outbox, sender(service), retry_initial_s=0.01)
    first = await publisher.drain()
    assert (first.sent, first.remaining) == (0, 1)
    assert first.error is not None
    assert "429" in first.error
    service.script = [503]
    second = await publisher.drain(force=True)
    assert (second.sent, second.remaining) == (0, 1)
    third = await publisher.drain(force=True)
    assert (third.sent, third.remaining, third.rejected) == (1, 0, 0)
    assert service.bodies == [b"c0", b"c1", b"c2"]  # c0 once: the retry resumed at c1


async def test_a_permanent_refusal_moves_the_update_aside_and_the_queue_goes_on(tmp_path: Path) -> None:
    service = Service(403)
    outbox = Outbox(tmp_path / "outbox")
    outbox.put("u-bad", "fed", [b"bad"])
    outbox.put("u-good", "fed", [b"good"])
    publisher = OutboxPublisher(outbox, sender(service))
    result = await publisher.drain()
    assert (result.sent, result.remaining, result.rejected, result.error) == (1, 0, 1, None)
    assert service.bodies == [b"good"]
    assert [p.name.endswith("u-bad.obx") for p in outbox.rejected()] == [True]
    assert publisher.rejected_total == 1


async def test_a_401_refreshes_the_token_once(tmp_path: Path) -> None:
    service = Service(401)
    up = sender(service)
    assert await up.send_raw("fed", [b"m"]) == 1
    assert service.tokens == ["Bearer t1", "Bearer t2"]
    service.script = [401, 401]  # still refused after a refresh: rejected for good
    outbox = Outbox(tmp_path / "outbox")
    outbox.put("u-2", "fed", [b"m2"])
    result = await OutboxPublisher(outbox, up).drain()
    assert result.rejected == 1


async def test_connection_errors_are_retryable(tmp_path: Path) -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async def token() -> str:
        return "t"

    client = httpx.AsyncClient(transport=httpx.MockTransport(down))
    outbox = Outbox(tmp_path / "outbox")
    outbox.put("u-1", "fed", [b"m"])
    result = await OutboxPublisher(outbox, HttpUpdateSender("http://svc", token, client=client)).drain()
    assert (result.sent, result.remaining, result.rejected) == (0, 1, 0)
    assert result.error is not None
    assert "ConnectError" in result.error


async def test_in_progress_is_retried_and_a_duplicate_answer_counts_as_stored(tmp_path: Path) -> None:
    service = Service(409)  # the same message is being stored by another request
    outbox = Outbox(tmp_path / "outbox")
    outbox.put("u-1", "fed", [b"m"])
    publisher = OutboxPublisher(outbox, sender(service), retry_initial_s=0.01)
    first = await publisher.drain()
    assert (first.sent, first.remaining, first.rejected) == (0, 1, 0)

    def duplicate(request: httpx.Request) -> httpx.Response:
        return httpx.Response(202, json={"update_id": "u", "partition": 0, "offset": 3, "duplicate": True})

    again = OutboxPublisher(outbox, sender(duplicate), retry_initial_s=0.01)
    second = await again.drain(force=True)
    assert (second.sent, second.remaining, second.rejected) == (1, 0, 0)
