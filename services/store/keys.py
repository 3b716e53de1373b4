"""Redis key names: the whole Redis layout of PFI (every key any service reads or writes is named here;
the Lua scripts that touch them are in services/store/lua/, loaded by :mod:`services.store.scripts`).
Every per-federation key carries the hash tag ``{fed}`` so that a Redis Cluster keeps a federation in
one slot and the atomic commit (a Lua script) can touch all of them."""

from __future__ import annotations

FEDERATIONS = "pfi:federations"  # set of federation names
TOKENS_REVOKED = "pfi:tokens:revoked"  # zset: revoked bearer-token jti -> its exp (unix)
TOKENS_REVOKED_CLIENTS = "pfi:tokens:revoked-clients"  # zset "<fed>/<client_id>" -> revoked_at (unix)
TOKENS_EPOCH = "pfi:tokens:epoch"  # INCR on every change of the two above


def revoked_client_member(fed: str, client_id: str) -> str:
    """``<fed>/<client_id>``: a member of :data:`TOKENS_REVOKED_CLIENTS` (names never contain ``/``)."""
    return f"{fed}/{client_id}"


def prefix(fed: str) -> str:
    return f"pfi:{{{fed}}}:"


def spec(fed: str) -> str:
    return prefix(fed) + "spec"


def latest(fed: str) -> str:
    """The ``latest`` pointer: the version served and aggregated onto (rollback moves only this)."""
    return prefix(fed) + "version"


def head(fed: str) -> str:
    """The highest version number ever written; the next version is ``head + 1``."""
    return prefix(fed) + "head"


def adapter_prefix(fed: str) -> str:
    """What every version blob key of the federation starts with (the commit script prunes by it)."""
    return prefix(fed) + "adapter:"


def adapter(fed: str, version: int) -> str:
    return adapter_prefix(fed) + str(version)


def meta(fed: str, version: int) -> str:
    return prefix(fed) + f"meta:{version}"


def offsets(fed: str) -> str:
    return prefix(fed) + "offsets"


def seen(fed: str) -> str:
    """Set of :func:`seen_member` of the updates aggregated by releases before the seen window (read only,
    never pruned: delete it once ``max_staleness`` versions were made after an upgrade)."""
    return prefix(fed) + "seen"


def seen_window(fed: str) -> str:
    """Sorted set :func:`seen_member` -> lineage depth of the update's base version: the aggregated updates
    that could still be accepted (dedupe per client and update id). The version commit drops members too
    stale for every retained version (``lua/commit_version.lua``)."""
    return prefix(fed) + "seen-window"


def depths(fed: str) -> str:
    """Hash version -> lineage depth (v0: 0; a version: its parent's + 1), one small field per version."""
    return prefix(fed) + "depths"


def seen_member(client_id: str, update_id: str) -> str:
    """``client_id/update_id``: ids never contain ``/`` (``schemas.events.ID_PATTERN``), so no client can
    name another client's member. (Members of older data without a client are never matched again.)"""
    return f"{client_id}/{update_id}"


def retained(fed: str) -> str:
    """Sorted set of versions whose blob is kept (score = version)."""
    return prefix(fed) + "versions"


def pinned(fed: str) -> str:
    return prefix(fed) + "pinned"


def stats(fed: str) -> str:
    return prefix(fed) + "stats"


def optimizer(fed: str) -> str:
    return prefix(fed) + "opt"


def accountant(fed: str) -> str:
    return prefix(fed) + "privacy"


def events(fed: str) -> str:
    """Redis stream of version announcements (``GlobalVersionPublished`` as JSON)."""
    return prefix(fed) + "events"


def live(fed: str) -> str:
    """Informational hash the running aggregator refreshes: buffered updates, last poll time."""
    return prefix(fed) + "live"


def clients(fed: str) -> str:
    """The federation's client registry: hash client_id -> JSON record (key, status, ...)."""
    return prefix(fed) + "clients"


def clients_epoch(fed: str) -> str:
    """INCR on every change of :func:`clients` (verifiers poll it and reload on change)."""
    return prefix(fed) + "clients:epoch"


def enrollment(fed: str, token_id: str) -> str:
    """An enrollment token: hash {sha256, uses, expires_at}, with PEXPIRE at its expiry."""
    return prefix(fed) + f"enroll:{token_id}"


def token_proof(fed: str, digest: str) -> str:
    """A used key proof of the token-refresh route (SET NX with a TTL: a proof is good once)."""
    return prefix(fed) + f"proof:{digest}"


def ingested(fed: str, client_id: str, update_id: str, part: str) -> str:
    """The ingest's record of one stored message (:mod:`services.ingest.idempotency`), expiring: ``part``
    is ``u`` or a chunk index, with a payload digest (ids never contain ``/``)."""
    return prefix(fed) + f"ingested:{client_id}/{update_id}/{part}"


def user_adapter(fed: str, user: str) -> str:
    return prefix(fed) + f"user:{user}:adapter"


def user_documents(fed: str, user: str) -> str:
    """A user's private retrieval store, one hash (:mod:`services.personalization.documents`): ``g``
    generation, ``n`` chunks, ``b`` stored bytes, ``s`` a sequence, ``d:<doc>`` a document's record
    (JSON), ``t:<doc>:<i>`` chunk texts, ``v:<doc>:<i>`` chunk embeddings (float32 bytes)."""
    return prefix(fed) + f"user:{user}:documents"


def user_document_order(fed: str, user: str) -> str:
    """Sorted set of a user's document ids (score: insertion sequence), for listing pages."""
    return prefix(fed) + f"user:{user}:document-order"


def document_generation(fed: str) -> str:
    """Counter: INCR on every change of any user's documents; the value is that user's new generation
    (never reused, even after a delete-all removed the user's keys)."""
    return prefix(fed) + "document-generation"


def user_events(fed: str) -> str:
    """Redis stream of personal adapter uploads and deletes (users named by a digest only)."""
    return prefix(fed) + "user-events"


def user_generations(fed: str) -> str:
    """Hash user digest -> generation, HINCRBY on every upload and delete of that user's adapter (never
    reset, a tombstone across deletes): a replica inserts a loaded adapter only if it is unchanged."""
    return prefix(fed) + "user-generations"


def offset_field(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


def hwm_field(topic: str, partition: int) -> str:
    return f"{topic}:{partition}:hwm"


def watermark_field(topic: str, partition: int) -> str:
    """The federation's watermark on a partition, in its ``offsets`` hash (its slot): every message of
    the federation below it is durable. A partition's seek position is the minimum over the federations
    (see :meth:`services.store.versions.VersionStore.get_watermarks`)."""
    return f"{topic}:{partition}:wm"
