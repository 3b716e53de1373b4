"""Pure aggregation math of the aggregator: no Kafka, Redis, asyncio or I/O.

One module per concern: :mod:`.staleness` (s(τ)), :mod:`.robust` (clipping, trimmed mean, median),
:mod:`.lora_modes` (FedIT vs FFA-LoRA), :mod:`.server_optimizer` (FedAvg/FedAvgM/FedAdam server
step and its serializable state), :mod:`.privacy` (server Gaussian noise, RDP accountant) and
:mod:`.fedbuff` (the buffer and :func:`aggregate`, which chains them) and :mod:`.bounds` (how far one
client can move the global under a spec). The pluggable pieces (combiners, server optimizers, the DP
wrapper) and their registry: :mod:`.strategies`, one file each.
"""

from services.aggregator.math.bounds import influence_bound, max_share, step_influence
from services.aggregator.math.fedbuff import (
    AggregationResult,
    BufferedUpdate,
    UpdateBuffer,
    aggregate,
    effective_samples,
)
from services.aggregator.math.lora_modes import is_lora_a, is_lora_b, merged_product, project_delta
from services.aggregator.math.privacy import (
    DEFAULT_ORDERS,
    RdpAccountant,
    add_gaussian_noise,
    robust_sensitivity,
    sensitivity,
)
from services.aggregator.math.robust import (
    MIN_TRIM,
    StateDict,
    clip_scale,
    clip_to_norm,
    coordinate_median,
    coordinate_trimmed_mean,
    l2_norm,
    scaled,
    trim_count,
    trimmed_window,
)
from services.aggregator.math.server_optimizer import ServerOptState, apply_server_update
from services.aggregator.math.staleness import from_spec, staleness_weight
from services.aggregator.math.strategies import (
    COMBINERS,
    SERVER_OPTIMIZERS,
    check_spec,
    combiner_for,
    get_combiner,
    get_server_optimizer,
)

__all__ = [
    "COMBINERS",
    "DEFAULT_ORDERS",
    "MIN_TRIM",
    "SERVER_OPTIMIZERS",
    "AggregationResult",
    "BufferedUpdate",
    "RdpAccountant",
    "ServerOptState",
    "StateDict",
    "UpdateBuffer",
    "add_gaussian_noise",
    "aggregate",
    "apply_server_update",
    "check_spec",
    "clip_scale",
    "clip_to_norm",
    "combiner_for",
    "coordinate_median",
    "coordinate_trimmed_mean",
    "effective_samples",
    "from_spec",
    "get_combiner",
    "get_server_optimizer",
    "influence_bound",
    "is_lora_a",
    "is_lora_b",
    "l2_norm",
    "max_share",
    "merged_product",
    "project_delta",
    "robust_sensitivity",
    "scaled",
    "sensitivity",
    "staleness_weight",
    "step_influence",
    "trim_count",
    "trimmed_window",
]
