"""Operator view of personalization quality (issue 16): what clients report about their own validation
loss, turned into bounded-cardinality metrics per federation.

With each update a client may report (``schemas.events.TrainingMetrics``, numbers only, each finite and
within ``0..MAX_REPORTED_LOSS``) its validation loss under the global version it trained from
(``val_loss_global``), under that global plus its personal adapter (``val_loss_personal``) and under the
global version it had before (``val_loss_prev_global``). From them, per accepted update:

* **personalization gain** ``(global - personal) / global``: how much lower the personal stack's loss is
  (positive: the personal adapter helps; negative: it harms);
* **global change** ``(global - prev_global) / prev_global``: how the new global moved the client's loss
  (positive: the new global is worse for this client).

Both are clamped to ``[-1, 1]`` (a report is a claim; an absurd one lands in the outermost bucket, where
it weighs as one client among the others). The histograms are labelled by federation only, never by client
or user. Their buckets go below zero, so prometheus_client exports no ``_sum`` (it must not decrease):
read them with ``histogram_quantile`` or bucket shares, not as a mean.

The two shares (**harmed by personalization**, **made worse by the latest global**) come from a window
per federation of the most recent report of each of the last ``window_clients`` distinct clients within
``window_s``: a client counts **once**, whatever it sends, so a flood from one client moves a share by at
most ``1 / n``. A client's repeated report about the same global version is not observed again (replays
after a state drop, or a client sending several updates from one version): in the histograms a client
weighs at most once per global version it reports on (and the aggregator accepts at most
``max_client_updates`` of its updates per buffer). A client is harmed / made worse when its relative
change exceeds ``margin`` (default 1 %: evaluation on a few sequences is noisy).

These reports are **monitoring only**: nothing here feeds aggregation weights, and a report that makes no
sense (a loss without the one it is relative to, a reference loss of ~0) is ignored and counted
(``outcome="invalid"``); it never rejects the update. What a lying client can do: see the README
("Reading the personalization-quality dashboard").

Thread safety: :meth:`QualityMonitor.observe` runs on the aggregator's event loop, ``collect`` on the
metrics server's thread: one lock guards the windows.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from schemas.events import MAX_REPORTED_LOSS, TrainingMetrics

log = logging.getLogger("pfi.aggregator.quality")

NS = "pfi_aggregator"
# Relative changes, clamped to [-1, 1]; finer around 0, where most clients are.
RATIO_BUCKETS = (-0.5, -0.2, -0.1, -0.05, -0.02, -0.01, 0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
MIN_REFERENCE_LOSS = 1e-6  # a reference loss below this makes a relative change meaningless
DEFAULT_MARGIN = 0.01
DEFAULT_WINDOW_CLIENTS = 256
DEFAULT_WINDOW_S = 3600.0
DEFAULT_MAX_FEDERATIONS = 1000

OUTCOMES = ("used", "absent", "invalid", "repeat", "error")


@dataclass(frozen=True)
class Assessment:
    """What one report says: the relative changes (clamped), ``None`` where the report has no basis."""

    gain: float | None  # (global - personal) / global; > 0: the personal adapter lowers the loss
    change: float | None  # (global - prev) / prev; > 0: the new global raised the client's loss


def clamp(value: float, bound: float = 1.0) -> float:
    return max(-bound, min(bound, value))


def _valid_loss(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and 0.0 <= value <= MAX_REPORTED_LOSS


def assess(metrics: TrainingMetrics) -> Assessment | None:
    """The relative changes a report claims; ``None`` when it is malformed or absurd (pure).

    A report without ``val_loss_global`` but with one of the others, a value outside
    ``0..MAX_REPORTED_LOSS`` or not finite (the schema refuses those already; this is the second line),
    or a reference loss of ~0 (a relative change of it means nothing) is malformed."""
    g, p, prev = metrics.val_loss_global, metrics.val_loss_personal, metrics.val_loss_prev_global
    present = [v for v in (g, p, prev) if v is not None]
    if not all(_valid_loss(v) for v in present) or g is None:
        return None
    gain = change = None
    if p is not None:
        if g < MIN_REFERENCE_LOSS:
            return None
        gain = clamp((g - p) / g)
    if prev is not None:
        if prev < MIN_REFERENCE_LOSS:
            return None
        change = clamp((g - prev) / prev)
    return Assessment(gain, change)


def has_report(metrics: TrainingMetrics) -> bool:
    return any(
        v is not None
        for v in (metrics.val_loss_global, metrics.val_loss_personal, metrics.val_loss_prev_global)
    )


@dataclass
class _Entry:
    version: int  # the global version judged (the update's base_version)
    harmed: bool | None  # by its personal adapter (None: no personal report)
    worse: bool | None  # by the new global (None: no previous global reported)
    at: float


@dataclass
class ClientWindow:
    """The latest verdicts of the last ``max_clients`` distinct clients within ``max_age_s`` (pure logic;
    the clock is passed in). Counts are kept incrementally: reading a share is O(1)."""

    max_clients: int = DEFAULT_WINDOW_CLIENTS
    max_age_s: float = DEFAULT_WINDOW_S
    entries: OrderedDict[str, _Entry] = field(default_factory=OrderedDict)
    personal: int = 0  # entries with a personal verdict
    harmed: int = 0
    judged: int = 0  # entries with a global-change verdict
    worse: int = 0
    last_at: float = 0.0

    def _count(self, entry: _Entry, sign: int) -> None:
        if entry.harmed is not None:
            self.personal += sign
            self.harmed += sign * entry.harmed
        if entry.worse is not None:
            self.judged += sign
            self.worse += sign * entry.worse

    def seen(self, client: str, version: int) -> bool:
        """Whether ``client``'s report about ``version`` is in the window already."""
        entry = self.entries.get(client)
        return entry is not None and entry.version == version

    def put(self, client: str, entry: _Entry) -> None:
        """``client``'s latest verdicts replace its earlier ones (one entry per client)."""
        old = self.entries.pop(client, None)
        if old is not None:
            self._count(old, -1)
        self.entries[client] = entry
        self._count(entry, +1)
        self.last_at = max(self.last_at, entry.at)
        while len(self.entries) > self.max_clients:
            self._count(self.entries.popitem(last=False)[1], -1)
        self.expire(entry.at)

    def expire(self, now: float) -> None:
        """Drop entries older than ``max_age_s`` (the oldest are first: entries move to the end on put)."""
        while self.entries:
            client, oldest = next(iter(self.entries.items()))
            if now - oldest.at <= self.max_age_s:
                break
            del self.entries[client]
            self._count(oldest, -1)

    def counts(self) -> WindowCounts:
        return WindowCounts(len(self.entries), self.personal, self.harmed, self.judged, self.worse)


@dataclass(frozen=True)
class WindowCounts:
    """A copy of one window's counts (read under the lock, exported after it)."""

    clients: int
    personal: int  # clients with a personalization verdict
    harmed: int
    judged: int  # clients with a global-change verdict
    worse: int

    def harmed_share(self) -> float | None:
        return self.harmed / self.personal if self.personal else None

    def worse_share(self) -> float | None:
        return self.worse / self.judged if self.judged else None


class _WindowCollector(Collector):
    """Exports the windows' counts at scrape time (so that expiry shows without new reports). Counts,
    not ratios: several aggregators (hierarchical leaves) each hold a part of a federation's clients, and
    ``sum(harmed) / sum(reporting)`` over them is the federation's share (pfi.rules.yaml records it)."""

    def __init__(self, monitor: QualityMonitor) -> None:
        self.monitor = monitor

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = self._families()
        personal, harmed, judged, worse = families
        for name, counts in self.monitor.snapshot():
            if counts.personal:
                personal.add_metric([name], counts.personal)
                harmed.add_metric([name], counts.harmed)
            if counts.judged:
                judged.add_metric([name], counts.judged)
                worse.add_metric([name], counts.worse)
        return iter(families)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        labels = ["federation"]
        return (
            GaugeMetricFamily(
                f"{NS}_personalization_reporting_clients",
                "Distinct recent clients that reported their loss with and without their personal adapter "
                "(the window: each client once, its latest report)",
                labels=labels,
            ),
            GaugeMetricFamily(
                f"{NS}_personalization_harmed_clients",
                "Of those, clients whose personal adapter raised their validation loss by more than the "
                "margin (client-reported, monitoring only)",
                labels=labels,
            ),
            GaugeMetricFamily(
                f"{NS}_global_change_reporting_clients",
                "Distinct recent clients that reported their loss under the new and their previous global "
                "(the window: each client once, its latest report)",
                labels=labels,
            ),
            GaugeMetricFamily(
                f"{NS}_global_regressed_clients",
                "Of those, clients whose validation loss the new global raised by more than the margin "
                "(client-reported, monitoring only)",
                labels=labels,
            ),
        )


class QualityMonitor:
    """Turns clients' quality reports into metrics (registry injected; see the module doc).

    :meth:`observe` is the aggregator's hook, called once per accepted update; it never raises on a
    report's content."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        margin: float = DEFAULT_MARGIN,
        window_clients: int = DEFAULT_WINDOW_CLIENTS,
        window_s: float = DEFAULT_WINDOW_S,
        max_federations: int = DEFAULT_MAX_FEDERATIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (0.0 <= margin < 1.0) or window_clients < 1 or window_s <= 0 or max_federations < 1:
            raise ValueError("QualityMonitor: 0 <= margin < 1, window_clients >= 1, window_s > 0")
        self.margin = margin
        self.window_clients = window_clients
        self.window_s = window_s
        self.max_federations = max_federations
        self.clock = clock
        self._windows: OrderedDict[str, ClientWindow] = OrderedDict()
        self._lock = threading.Lock()
        self.reports = Counter(
            f"{NS}_quality_reports_total",
            "Quality reports of accepted updates by outcome: used, absent (none sent), invalid (ignored: "
            "malformed or absurd), repeat (this client's report about this version was counted already), "
            "error (a bug: see the logs)",
            ["federation", "outcome"],
            registry=registry,
        )
        self.gain = Histogram(
            f"{NS}_personalization_gain_ratio",
            "Clients' relative validation-loss reduction by their personal adapter, (global - personal) / "
            "global, clamped to [-1, 1] (client-reported, monitoring only)",
            ["federation"],
            buckets=RATIO_BUCKETS,
            registry=registry,
        )
        self.change = Histogram(
            f"{NS}_global_loss_change_ratio",
            "Relative change of clients' validation loss from their previous global to the new one, "
            "(new - previous) / previous, clamped to [-1, 1]; > 0 is worse (client-reported)",
            ["federation"],
            buckets=RATIO_BUCKETS,
            registry=registry,
        )
        registry.register(_WindowCollector(self))

    def observe(self, federation: str, client_id: str, base_version: int, metrics: TrainingMetrics) -> str:
        """Record one accepted update's report; returns its outcome (one of :data:`OUTCOMES`). Never raises:
        monitoring must not cost an update (an unforeseen failure is logged and counted as ``error``)."""
        try:
            outcome = self._observe(federation, client_id, base_version, metrics)
        except Exception:
            log.exception("quality report of %s in %s could not be recorded", client_id, federation)
            outcome = "error"
        self.reports.labels(federation, outcome).inc()
        return outcome

    def _observe(self, federation: str, client_id: str, base_version: int, metrics: TrainingMetrics) -> str:
        if not has_report(metrics):
            return "absent"
        verdict = assess(metrics)
        if verdict is None:
            return "invalid"
        now = self.clock()
        with self._lock:
            window = self._window(federation)
            if window.seen(client_id, base_version):
                return "repeat"
            window.put(
                client_id,
                _Entry(
                    version=base_version,
                    harmed=None if verdict.gain is None else verdict.gain < -self.margin,
                    worse=None if verdict.change is None else verdict.change > self.margin,
                    at=now,
                ),
            )
        if verdict.gain is not None:
            self.gain.labels(federation).observe(verdict.gain)
        if verdict.change is not None:
            self.change.labels(federation).observe(verdict.change)
        return "used"

    def _window(self, federation: str) -> ClientWindow:
        window = self._windows.get(federation)
        if window is None:
            window = self._windows[federation] = ClientWindow(self.window_clients, self.window_s)
            while len(self._windows) > self.max_federations:
                self._windows.popitem(last=False)  # the federation that reported least recently
        self._windows.move_to_end(federation)
        return window

    def snapshot(self) -> list[tuple[str, WindowCounts]]:
        """The counts of every non-empty window, after expiry (for the collector and tests)."""
        now = self.clock()
        with self._lock:
            for window in self._windows.values():
                window.expire(now)
            return [(name, w.counts()) for name, w in self._windows.items() if w.entries]

    def counts(self, federation: str) -> WindowCounts:
        """``federation``'s window now (all zero when it has none)."""
        return dict(self.snapshot()).get(federation, WindowCounts(0, 0, 0, 0, 0))
