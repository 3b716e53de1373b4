"""The stream: the default mixes and :class:`CaseGenerator`, which interleaves valid and bad cases."""

from __future__ import annotations

from collections import Counter

from tests.fuzz.cases.chunks import ChunkCases
from tests.fuzz.cases.forgery import ForgeryCases
from tests.fuzz.cases.framing import FramingCases
from tests.fuzz.cases.model import RAW, SDK, Case
from tests.fuzz.cases.schema import SchemaCases
from tests.fuzz.cases.sdk import SdkCases
from tests.fuzz.cases.tensors import TensorCases

#: How many bad cases of each category a default stream holds (raw path, then SDK path).
RAW_MIX: dict[str, int] = {
    "malformed": 150,
    "codec": 60,
    "schema": 130,
    "unknown_type": 40,
    "forged": 120,
    "spec_mismatch": 20,
    "shape": 60,
    "non_finite": 60,
    "poisoned": 50,
    "future_base": 25,
    "too_stale": 25,
    "oversized": 50,
    "replayed": 50,
    "unknown_federation": 30,
    "chunks": 90,
}
SDK_MIX: dict[str, int] = {
    "forged": 30,
    "non_finite": 30,
    "poisoned": 30,
    "shape": 20,
    "spec_mismatch": 10,
    "future_base": 10,
    "too_stale": 10,
    "unknown_federation": 10,
    "replayed": 20,
    "oversized": 10,
}
STATEFUL = {"too_stale", "replayed"}  # need earlier versions / accepted updates: placed late in the stream


class CaseGenerator(FramingCases, SchemaCases, ForgeryCases, SdkCases, TensorCases, ChunkCases):
    """Builds the case stream for ``spec`` (see :mod:`tests.fuzz.cases`). Deterministic for a seed."""

    def stream(
        self,
        *,
        valid: int,
        raw_mix: dict[str, int] | None = None,
        sdk_mix: dict[str, int] | None = None,
        stateful_after: float = 0.4,
    ) -> list[Case]:
        """``valid`` valid updates (a multiple of K) interleaved with the bad cases of both mixes."""
        if valid % self.K:
            raise ValueError(f"valid ({valid}) must be a multiple of buffer_size ({self.K})")
        plan = [(RAW, c) for c, n in (raw_mix or RAW_MIX).items() for _ in range(n)]
        plan += [(SDK, c) for c, n in (sdk_mix or SDK_MIX).items() for _ in range(n)]
        early = [p for p in plan if p[1] not in STATEFUL]
        late = [p for p in plan if p[1] in STATEFUL]
        self.rng.shuffle(early)
        cut = int(len(early) * stateful_after)
        tail = early[cut:] + late
        self.rng.shuffle(tail)
        bad = early[:cut] + tail
        # Valid updates spread evenly, alternating raw and SDK.
        every = max(1, len(bad) // valid)
        out: list[Case] = []
        made = 0
        for i, (path, category) in enumerate(bad):
            if made < valid and i % every == 0:
                out.append(self.valid_case(RAW if made % 2 == 0 else SDK))
                made += 1
            out.append(self.raw_case(category) if path == RAW else self.sdk_case(category))
        while made < valid:
            out.append(self.valid_case(RAW if made % 2 == 0 else SDK))
            made += 1
        return out

    def raw_case(self, category: str) -> Case:
        return {
            "malformed": self.raw_malformed,
            "codec": self.raw_codec,
            "schema": self.raw_schema,
            "unknown_type": self.raw_unknown_type,
            "forged": self.raw_forged,
            "spec_mismatch": self.raw_spec_mismatch,
            "shape": self.raw_shape,
            "non_finite": self.raw_non_finite,
            "poisoned": self.raw_poisoned,
            "future_base": self.raw_future_base,
            "too_stale": self.raw_too_stale,
            "oversized": self.raw_oversized,
            "replayed": self.raw_replayed,
            "unknown_federation": self.raw_unknown_federation,
            "chunks": self.raw_chunks,
        }[category]()


def summary(cases: list[Case]) -> dict[str, Counter[str]]:
    """Counts per category and per path (for the test's report)."""
    out: dict[str, Counter[str]] = {"category": Counter(), "path": Counter(), "variant": Counter()}
    for c in cases:
        out["category"][c.category] += 1
        out["path"][c.path] += 1
        out["variant"][c.label] += 1
    return out
