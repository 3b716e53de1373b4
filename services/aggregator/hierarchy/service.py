"""The process of a hierarchical role: ``PFI_AGGREGATOR_ROLE`` / ``pfi aggregator --role leaf|root``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from services.aggregator.hierarchy.leaf import Leaf
from services.aggregator.hierarchy.root import Root
from services.settings import AggregatorSettings, PFISettings


def build(
    settings: PFISettings, agg: AggregatorSettings, registry: CollectorRegistry | None = None
) -> Leaf | Root:
    """The leaf or the root (both have ``run()`` and a ``stopping`` event)."""
    if agg.role == "leaf":
        return Leaf(settings, agg, registry)
    if agg.role == "root":
        return Root(settings, agg, registry)
    raise ValueError(f"role {agg.role!r} is not a hierarchical role")
