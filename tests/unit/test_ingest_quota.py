"""The ingest's per-client admission: in-flight cap, byte-rate token bucket, process-wide cap."""

from __future__ import annotations

from services.ingest.quota import Quotas


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def quotas(clock: Clock, **kw: float) -> Quotas:
    values = {"client_in_flight": 2, "total_in_flight": 3, "bytes_per_s": 100.0, "burst_bytes": 1000}
    values.update(kw)
    return Quotas(clock=clock, **values)  # type: ignore[arg-type]


def test_in_flight_caps_per_client_and_per_process() -> None:
    q = quotas(Clock())
    a, b = ("f", "a"), ("f", "b")
    assert q.admit(a, 1) is None
    assert q.admit(a, 1) is None
    refusal = q.admit(a, 1)
    assert refusal is not None
    assert refusal.reason == "client_in_flight"
    assert q.admit(b, 1) is None
    refusal = q.admit(b, 1)
    assert refusal is not None
    assert refusal.reason == "total_in_flight"
    q.release(a)
    assert q.admit(b, 1) is None


def test_byte_bucket_refills_at_the_rate_and_refunds_unused_bytes() -> None:
    clock = Clock()
    q = quotas(clock)
    key = ("f", "a")
    assert q.admit(key, 900) is None
    q.release(key, refund=400)  # declared 900, used 500
    assert q.admit(key, 500) is None
    q.release(key)
    refusal = q.admit(key, 300)
    assert refusal is not None
    assert refusal.reason == "client_bytes"
    assert refusal.retry_after_s == 3  # 300 missing bytes at 100 bytes/s
    clock.now = 3.0
    assert q.admit(key, 300) is None


def test_the_number_of_tracked_clients_is_bounded() -> None:
    q = quotas(Clock(), max_clients=2)
    for name in "abcd":
        assert q.admit(("f", name), 1) is None
        q.release(("f", name))
    assert len(q._clients) == 2
