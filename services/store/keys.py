"""Redis key names. Every per-federation key carries the hash tag ``{fed}`` so that a Redis Cluster keeps
a federation in one slot and the atomic commit (a Lua script) can touch all of them."""

from __future__ import annotations

FEDERATIONS = "pfi:federations"  # set of federation names
CLIENT_KEYS = "pfi:clients:keys"  # hash client_id -> hex HMAC key


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


def adapter(fed: str, version: int) -> str:
    return prefix(fed) + f"adapter:{version}"


def meta(fed: str, version: int) -> str:
    return prefix(fed) + f"meta:{version}"


def offsets(fed: str) -> str:
    return prefix(fed) + "offsets"


def seen(fed: str) -> str:
    return prefix(fed) + "seen"


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


def user_adapter(fed: str, user: str) -> str:
    return prefix(fed) + f"user:{user}:adapter"


def partition_watermarks(topic: str) -> str:
    """Hash partition -> offset below which every message of ``topic`` is durably handled."""
    return f"pfi:watermarks:{topic}"


def offset_field(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


def hwm_field(topic: str, partition: int) -> str:
    return f"{topic}:{partition}:hwm"
