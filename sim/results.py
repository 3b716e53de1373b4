"""What a virtual-clock fleet run records (:mod:`sim.virtual`): the loss-vs-time curve (one point per
global version), every update, and the time-to-target comparison of two runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modeling.lora import StateDict


@dataclass(frozen=True)
class CurvePoint:
    version: int
    virtual_s: float
    wall_s: float
    updates: int  # updates published when the version appeared
    nll: float
    accuracy: float


@dataclass(frozen=True)
class UpdateRecord:
    user: str
    round: int
    base_version: int
    start_s: float  # virtual
    publish_s: float  # virtual
    train_s: float  # real seconds of training
    loss_before: float
    loss_after: float
    update_id: str


@dataclass
class RunResult:
    mode: str  # "async" | "sync"
    federation: str
    buffer_size: int
    points: list[CurvePoint] = field(default_factory=list)
    updates: list[UpdateRecord] = field(default_factory=list)
    personal: dict[str, StateDict] = field(default_factory=dict)
    rounds: dict[str, int] = field(default_factory=dict)
    trained_against: dict[str, int] = field(default_factory=dict)  # user -> base version of its last round
    reused_first_rounds: int = 0
    wall_s: float = 0.0
    train_s: float = 0.0
    wait_s: float = 0.0
    eval_s: float = 0.0

    @property
    def virtual_s(self) -> float:
        return max((u.publish_s for u in self.updates), default=0.0)

    @property
    def final_version(self) -> int:
        return self.points[-1].version if self.points else 0

    def summary(self) -> dict[str, Any]:
        first, last = (self.points[0], self.points[-1]) if self.points else (None, None)
        return {
            "mode": self.mode,
            "federation": self.federation,
            "buffer_size": self.buffer_size,
            "updates": len(self.updates),
            "versions": self.final_version,
            "virtual_s": self.virtual_s,
            "wall_s": self.wall_s,
            "train_s": self.train_s,
            "reused_first_rounds": self.reused_first_rounds,
            "aggregator_wait_s": self.wait_s,
            "eval_s": self.eval_s,
            "initial_nll": None if first is None else first.nll,
            "final_nll": None if last is None else last.nll,
            "best_nll": min((p.nll for p in self.points), default=None),
        }


# ------------------------------------------------------------------------------------ time to target


def first_at(points: list[CurvePoint], target: float) -> CurvePoint | None:
    """The first version whose held-out NLL is at or below ``target``."""
    for point in points:
        if point.nll <= target + 1e-9:
            return point
    return None


def speedup(async_run: RunResult, sync_run: RunResult) -> dict[str, Any]:
    """``async_vs_sync_speedup`` = (virtual time sync needs to reach the target) / (time async needs).

    The target is the best global held-out NLL *both* runs reach: the higher of the two runs' best
    losses. It is undefined (``None``) when a run never improved on v0."""
    if not async_run.points or not sync_run.points:
        return {"async_vs_sync_speedup": None, "reason": "a run has no evaluated version"}
    initial = async_run.points[0].nll
    best_async = min(p.nll for p in async_run.points)
    best_sync = min(p.nll for p in sync_run.points)
    target = max(best_async, best_sync)
    out: dict[str, Any] = {
        "definition": "t_sync(target) / t_async(target), virtual seconds to the first global version whose "
        "pooled held-out NLL <= target; target = max(best async NLL, best sync NLL), the best loss both "
        "runs reach",
        "initial_nll": initial,
        "best_nll_async": best_async,
        "best_nll_sync": best_sync,
        "target_nll": target,
        "time_to_target_async_s": None,
        "time_to_target_sync_s": None,
        "updates_to_target_async": None,
        "updates_to_target_sync": None,
        "async_vs_sync_speedup": None,
        "reason": None,
    }
    if target >= initial - 1e-9:
        out["reason"] = "one of the runs never got below the v0 loss, so there is no common target"
        return out
    p_async, p_sync = first_at(async_run.points, target), first_at(sync_run.points, target)
    if p_async is not None and p_sync is not None:
        out["time_to_target_async_s"], out["time_to_target_sync_s"] = p_async.virtual_s, p_sync.virtual_s
        out["updates_to_target_async"], out["updates_to_target_sync"] = p_async.updates, p_sync.updates
        if p_async.virtual_s > 0:
            out["async_vs_sync_speedup"] = p_sync.virtual_s / p_async.virtual_s
    return out
