"""Pure aggregation math of the aggregator: no Kafka, Redis, asyncio or I/O.

One module per concern: :mod:`.staleness` (s(τ)), :mod:`.robust` (clipping, trimmed mean, median),
:mod:`.lora_modes` (FedIT vs FFA-LoRA), :mod:`.server_optimizer` (FedAvg/FedAvgM/FedAdam server
step and its serializable state), :mod:`.privacy` (server Gaussian noise, RDP accountant) and
:mod:`.fedbuff` (the buffer and :func:`aggregate`, which chains them).
"""

from services.aggregator.math.fedbuff import AggregationResult, BufferedUpdate, UpdateBuffer, aggregate
from services.aggregator.math.lora_modes import is_lora_a, is_lora_b, merged_product, project_delta
from services.aggregator.math.privacy import (
    DEFAULT_ORDERS,
    RdpAccountant,
    add_gaussian_noise,
    robust_sensitivity,
    sensitivity,
)
from services.aggregator.math.robust import (
    StateDict,
    clip_scale,
    clip_to_norm,
    coordinate_median,
    coordinate_trimmed_mean,
    l2_norm,
    trimmed_window,
)
from services.aggregator.math.server_optimizer import ServerOptState, apply_server_update
from services.aggregator.math.staleness import from_spec, staleness_weight

__all__ = [
    "DEFAULT_ORDERS",
    "AggregationResult",
    "BufferedUpdate",
    "RdpAccountant",
    "ServerOptState",
    "StateDict",
    "UpdateBuffer",
    "add_gaussian_noise",
    "aggregate",
    "apply_server_update",
    "clip_scale",
    "clip_to_norm",
    "coordinate_median",
    "coordinate_trimmed_mean",
    "from_spec",
    "is_lora_a",
    "is_lora_b",
    "l2_norm",
    "merged_product",
    "project_delta",
    "robust_sensitivity",
    "sensitivity",
    "staleness_weight",
    "trimmed_window",
]
