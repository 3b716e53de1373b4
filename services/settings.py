"""Settings: environment variables with the ``PFI_`` prefix (pydantic-settings).

``PFISettings`` is shared by every component; each service adds its own model with a longer prefix
(``PFI_AGGREGATOR_``, ``PFI_SERVE_``, ...). When ``PFI_KAFKA_BOOTSTRAP_SERVERS`` / ``PFI_REDIS_URL`` are
set, everything uses those; otherwise the local stack's loopback addresses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024
KIB = 1024


class PFISettings(BaseSettings):
    """Shared by every PFI process."""

    model_config = SettingsConfigDict(env_prefix="PFI_", extra="ignore")

    home: Path = Field(default=Path.home() / ".pfi", description="state, caches and logs of the local stack")
    kafka_bootstrap_servers: str | None = Field(
        default=None, description="external Kafka; unset: local stack"
    )
    redis_url: str | None = Field(default=None, description="external Redis; unset: local stack")

    # Kafka authentication (services/transport.py builds the client arguments from these).
    kafka_security_protocol: Literal["PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL", "SSL"] = Field(
        default="SASL_PLAINTEXT",
        description="SASL_PLAINTEXT: the local stack (loopback only); SASL_SSL for a broker off this host",
    )
    kafka_sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = "SCRAM-SHA-512"
    kafka_sasl_username: str | None = Field(
        default=None, description="this process's Kafka principal (k8s: its KafkaUser); unset: per principal"
    )
    kafka_sasl_password: str | None = Field(default=None, description="password of kafka_sasl_username")
    # One identity per principal, when a process uses several (k8s: the personalization pod serves and
    # ingests with two KafkaUsers). Each pair wins over the single pair above for its principal.
    kafka_aggregator_username: str | None = None
    kafka_aggregator_password: str | None = None
    kafka_ingest_username: str | None = None
    kafka_ingest_password: str | None = None
    kafka_serving_username: str | None = None
    kafka_serving_password: str | None = None
    kafka_credentials_file: Path | None = Field(
        default=None,
        description="JSON {principal: password} (0600); unset: the local stack's "
        "<home>/stack/kafka-credentials.json",
    )
    kafka_ssl_cafile: Path | None = Field(
        default=None, description="CA bundle of the broker's certificate (SSL / SASL_SSL); unset: system CAs"
    )

    # Local stack (used only when the two above are unset).
    kafka_version: str = "3.9.1"
    kafka_port: int = Field(default=19092, ge=1, le=65535)
    kafka_controller_port: int = Field(default=19093, ge=1, le=65535)
    kafka_heap: str = Field(default="512m", description="-Xmx/-Xms of the local broker (2-core, 24 GiB box)")
    redis_port: int = Field(default=16379, ge=1, le=65535)
    stack_start_timeout_s: float = Field(default=180.0, gt=0)
    redis_aof: bool = Field(
        default=False, description="local Redis: appendonly yes (durable across restarts)"
    )

    # Topics (created explicitly; never auto-created).
    topic_prefix: str = Field(default="pfi", pattern=r"^[A-Za-z0-9._-]+$")
    update_partitions: int = Field(default=6, ge=1)
    # Message size limits, kept consistent across topic, producer and consumer.
    max_update_bytes: int = Field(default=64 * MIB, ge=1024, description="cap of one framed update")
    max_decoded_bytes: int = Field(default=256 * MIB, ge=1024, description="cap after decompression")
    chunk_bytes: int = Field(default=1 * MIB, ge=1024, description="payload bytes per chunk message")
    kafka_max_message_bytes: int = Field(default=2 * MIB, ge=1024, description="topic max.message.bytes")
    chunk_ttl_s: float = Field(default=600.0, gt=0, description="incomplete chunked uploads expire after")
    max_inflight_chunk_bytes: int = Field(
        default=512 * MIB,
        ge=1024,
        description="reassembly bound of the whole aggregator process (all its federations): the total "
        "sizes of incomplete chunked uploads; when full, new uploads are refused, none evicted. Keep it "
        "well under the pod's memory limit (k8s: 512 MiB of a 3 GiB limit)",
    )
    chunk_uploads_per_client: int = Field(
        default=2, ge=1, description="incomplete chunked uploads one client may hold at once"
    )
    chunk_client_bytes: int | None = Field(
        default=None,
        ge=1024,
        description="total size of one client's incomplete uploads; unset: max_update_bytes",
    )
    redis_wait_replicas: int = Field(
        default=0,
        ge=0,
        description="after each version commit, WAIT for this many Redis replicas before announcing it",
    )
    redis_wait_timeout_ms: int = Field(default=1000, ge=1, description="timeout of that WAIT")

    def kafka_bootstrap(self) -> str:
        return self.kafka_bootstrap_servers or f"127.0.0.1:{self.kafka_port}"

    def redis(self) -> str:
        return self.redis_url or f"redis://127.0.0.1:{self.redis_port}/0"

    def uses_local_stack(self) -> bool:
        return self.kafka_bootstrap_servers is None or self.redis_url is None

    @property
    def updates_topic(self) -> str:
        return f"{self.topic_prefix}.adapter-updates"

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic_prefix}.updates.dlq"

    @property
    def versions_topic(self) -> str:
        return f"{self.topic_prefix}.global-versions"

    @property
    def partials_topic(self) -> str:
        """Partial aggregates of hierarchical federations: leaves write (transactionally), the root reads."""
        return f"{self.topic_prefix}.partials"

    @property
    def stack_dir(self) -> Path:
        return self.home / "stack"

    @property
    def kafka_credentials_path(self) -> Path:
        """The principals' passwords (generated by ``pfi stack up`` for the local broker)."""
        if self.kafka_credentials_file is not None:
            return self.kafka_credentials_file
        return self.stack_dir / "kafka-credentials.json"

    @property
    def log_dir(self) -> Path:
        return self.home / "stack" / "logs"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"


class AggregatorSettings(BaseSettings):
    """``pfi aggregator`` (env prefix ``PFI_AGGREGATOR_``)."""

    model_config = SettingsConfigDict(env_prefix="PFI_AGGREGATOR_", extra="ignore")

    group_id: str = Field(
        default="pfi-aggregator",
        description="Kafka consumer group; starts with pfi-aggregator (the aggregator principal's group ACL)",
    )
    instance_id: str | None = Field(default=None, description="defaults to host-pid")
    host: str = "127.0.0.1"
    port: int = Field(default=9108, ge=0, le=65535, description="/healthz, /readyz, /metrics; 0 = any free")
    poll_timeout_ms: int = Field(default=200, ge=1)
    max_poll_records: int = Field(default=32, ge=1)
    max_poll_interval_ms: int = Field(default=300_000, ge=1000)
    session_timeout_ms: int = Field(default=10_000, ge=1000)
    heartbeat_interval_ms: int = Field(default=3_000, ge=100)
    progress_interval_s: float = Field(
        default=2.0, gt=0, description="offset/stat commits of idle federations"
    )
    shutdown_timeout_s: float = Field(default=20.0, gt=0)
    worker_threads: int = Field(default=2, ge=1)
    torch_threads: int = Field(
        default=1,
        ge=0,
        description="torch intra-op threads of each worker thread (0: torch's default). Adapter tensors are "
        "small and the workers already run in parallel: more threads per op oversubscribe the cores",
    )
    unknown_federation_ttl_s: float = Field(default=2.0, ge=0, description="cache of 'no such federation'")
    # Issue 15: hierarchical aggregation (services/aggregator/hierarchy). "single" is the embedded default.
    role: Literal["single", "leaf", "root"] = Field(
        default="single",
        description="single: one aggregator per federation; leaf/root: hierarchical federations "
        "(leaves fold partials of their partitions, one root per federation makes versions)",
    )
    partial_max_updates: int = Field(
        default=16, ge=1, description="leaf: most updates in one partial (a version may exceed K by this - 1)"
    )
    partial_interval_s: float = Field(
        default=0.5, gt=0, description="leaf: emit partials (and commit offsets) at least this often"
    )


class ServeSettings(BaseSettings):
    """``pfi serve``: the personalization service (env prefix ``PFI_SERVE_``)."""

    model_config = SettingsConfigDict(env_prefix="PFI_SERVE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535, description="HTTP port; 0 = any free port")
    token_secret: str | None = Field(
        default=None,
        description="HMAC secret of bearer tokens; unset: a development secret generated under PFI_HOME",
    )
    federations: str = Field(
        default="", description="comma-separated federations to load at start ('*' = all); others lazily"
    )
    cache_bytes: int = Field(default=256 * MIB, ge=0, description="personal adapter cache budget")
    max_prompt_chars: int = Field(default=16_384, ge=1)
    max_prompt_tokens: int = Field(default=1024, ge=1)
    max_new_tokens: int = Field(default=256, ge=1, description="cap of max_new_tokens per request")
    max_score_texts: int = Field(default=64, ge=1)
    max_upload_bytes: int = Field(default=64 * MIB, ge=1024, description="cap of a personal adapter upload")
    request_timeout_s: float = Field(default=60.0, gt=0)
    max_batch: int = Field(default=16, ge=1, description="rows (and distinct personal adapters) per batch")
    max_batch_tokens: int = Field(default=16_384, ge=1, description="padded tokens per batch")
    backend: str = Field(
        default="torch-slots",
        description="serving backend (services/personalization/backends): torch-slots",
    )
    adapter_slots: int = Field(
        default=8, ge=1, description="personal adapter slots per merged copy (distinct adapters per batch)"
    )
    batch_wait_ms: float = Field(
        default=2.0, ge=0, description="max linger for requests already on their way (never when idle)"
    )
    max_merged_copies: int = Field(default=2, ge=2, description="merged base+global copies per federation")
    pin_wait_s: float = Field(default=10.0, gt=0, description="wait for a merged-copy slot (pinned versions)")
    kafka_check_interval_s: float = Field(default=5.0, gt=0, description="readiness: Kafka probe cache")
    torch_threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads while serving (unset: half the CPUs, >= 1)"
    )
    max_queue: int = Field(
        default=256, ge=1, description="requests waiting for the model thread (beyond: 429 + Retry-After)"
    )
    max_user_in_flight: int = Field(
        default=8, ge=1, description="requests of one user queued or running on the model thread (429 beyond)"
    )
    adapter_revalidate_s: float = Field(
        default=5.0,
        gt=0,
        description="a cached personal adapter is revalidated against Redis after this age",
    )
    # -- private retrieval (per-user documents, services/personalization/documents.py) ---------------
    doc_max_chars: int = Field(
        default=256 * KIB, ge=1, le=1 << 20, description="characters of one document (413 beyond)"
    )
    doc_max_per_request: int = Field(default=64, ge=1, le=1024, description="documents per add request")
    doc_max_request_chars: int = Field(
        default=1 << 20, ge=1, description="characters of all documents of one add request (413 beyond)"
    )
    doc_max_chunks_per_user: int = Field(
        default=20_000, ge=1, description="stored chunks of one user (413 beyond; a 10k-chunk user fits)"
    )
    doc_max_bytes_per_user: int = Field(
        default=64 * MIB, ge=1, description="stored bytes of one user: chunk texts + embeddings (413 beyond)"
    )
    doc_index_cache_bytes: int = Field(
        default=256 * MIB, ge=0, description="in-memory search indexes of users' documents (LRU, per replica)"
    )
