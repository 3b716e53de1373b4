"""The demo's federations and what its report records of the two federated runs."""

from __future__ import annotations

import os
import statistics
from typing import Any

from demo.config import DemoConfig
from schemas.events import AggregationSpec, FederationSpec, LoraSpec
from services.store.versions import VersionStore
from sim.devices import DeviceModel
from sim.results import RunResult


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def federation_specs(cfg: DemoConfig, users: int) -> tuple[FederationSpec, FederationSpec]:
    lora = LoraSpec(rank=cfg.rank, alpha=cfg.alpha, target_modules=cfg.target_modules)
    common: dict[str, Any] = {
        "flush_timeout_s": 86_400.0,  # versions only from full buffers: the virtual clock decides
        "max_staleness": 1_000_000,  # slow clients are discounted, never dropped
        "keep_versions": 1000,
    }
    name = cfg.run_name.lower()
    async_spec = FederationSpec(
        name=f"{name}-async",
        base_model=cfg.base_model,
        lora=lora,
        seed=cfg.seed,
        aggregation=AggregationSpec(
            buffer_size=cfg.async_buffer,
            staleness="polynomial",
            staleness_a=cfg.staleness_a,
            # The simulated fleet is trusted and a fast device may finish twice within K updates; the demo
            # expects a version every K updates, so it lifts the one-update-per-client-per-buffer limit.
            max_client_updates=cfg.async_buffer,
            **common,
        ),
    )
    sync_spec = FederationSpec(
        name=f"{name}-sync",
        base_model=cfg.base_model,
        lora=lora,
        seed=cfg.seed,
        aggregation=AggregationSpec(buffer_size=users, staleness="constant", **common),
    )
    return async_spec, sync_spec


async def version_meta(store: VersionStore, fed: str, last: int) -> list[dict[str, Any]]:
    out = []
    for version in range(1, last + 1):
        meta = await store.get_meta(fed, version)
        if meta is None:
            continue
        out.append(
            {
                "version": version,
                "created_at": meta.created_at.isoformat(),
                "aggregation_seconds": meta.aggregation_seconds,
                "updates": [
                    {
                        "client_id": u.client_id,
                        "base_version": u.base_version,
                        "staleness": u.staleness,
                        "staleness_weight": u.staleness_weight,
                        "weight": u.weight,
                        "norm": u.norm,
                        "clipped": u.clipped,
                    }
                    for u in meta.updates
                ],
            }
        )
    return out


def run_dict(run: RunResult, versions: list[dict[str, Any]]) -> dict[str, Any]:
    staleness = [u["staleness"] for v in versions for u in v["updates"]]
    return {
        **run.summary(),
        "curve": [p.__dict__ for p in run.points],
        "version_meta": versions,
        "rounds": run.rounds,
        "staleness": {
            "mean": statistics.fmean(staleness) if staleness else None,
            "max": max(staleness, default=0),
            "histogram": {str(k): staleness.count(k) for k in sorted(set(staleness))},
        },
        "update_records": [u.__dict__ for u in run.updates],
    }


def fastest_share(run: RunResult, devices: DeviceModel) -> float:
    """Fraction of ``run``'s updates sent by the fastest quarter of the clients."""
    ranked = sorted(devices.speeds, key=lambda u: devices.speeds[u])
    fastest = set(ranked[: max(1, len(ranked) // 4)])
    return sum(1 for u in run.updates if u.user in fastest) / max(1, len(run.updates))
