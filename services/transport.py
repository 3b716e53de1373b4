"""How every service process connects to Kafka: one place for bootstrap servers, SASL and TLS.

``kafka_kwargs(settings, principal)`` returns the keyword arguments of ``AIOKafkaProducer``,
``AIOKafkaConsumer`` and ``AIOKafkaAdminClient`` for one of the service principals (``admin``,
``aggregator``, ``ingest``, ``serving``). No PFI code builds a Kafka client without it.
"""

from __future__ import annotations

from typing import Any, Literal

from services.settings import PFISettings

Principal = Literal["admin", "aggregator", "ingest", "serving"]


def kafka_kwargs(settings: PFISettings, principal: Principal) -> dict[str, Any]:
    """Connection arguments for ``principal`` (bootstrap servers, security protocol, SASL, TLS)."""
    del principal  # TODO(transport): SASL/SCRAM credentials per principal
    return {"bootstrap_servers": settings.kafka_bootstrap()}
